"""User- and model-written text -> HTML that is safe to show in anyone's browser.

Everything people or the model wrote (prompts, answers, earlier turns) takes this one path:

1. Markdown is rendered on the server by markdown-it-py (CommonMark plus tables and strikethrough)
   with raw HTML off (tags show as text) and images off (``![alt](url)`` becomes a link).
2. The HTML passes nh3 (the ammonia sanitizer) with an allowlist of formatting tags. No image,
   svg, iframe, style, form, script or event handler can survive, whatever trick produced it;
   links keep only http(s) URLs, open in a new tab and send no referrer.
3. ``$``, braces and backticks are written as character references, so a client-side template
   engine (Gradio's HTML component fills ``${...}`` and ``{{...}}``) sees no syntax in the text.

The browser shows the result with ``gr.HTML``, which renders it as given: the server decides.
"""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
_MD.enable(["table", "strikethrough"]).disable("image")

TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "b", "i", "del", "s",
    "code", "pre", "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "a",
}
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https"}
_TEMPLATE_CHARS = str.maketrans({"$": "&#36;", "{": "&#123;", "}": "&#125;", "`": "&#96;"})


def clean_html(html: str) -> str:
    """Keep only the allowlisted tags and attributes; links become inert http(s) links."""
    cleaned = nh3.clean(
        html, tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES, link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank", "referrerpolicy": "no-referrer"}},
        strip_comments=True,
    )
    return cleaned.translate(_TEMPLATE_CHARS)


def render(text: str | None) -> str:
    """Markdown written by a person or a model, as safe HTML."""
    return clean_html(_MD.render(text or ""))
