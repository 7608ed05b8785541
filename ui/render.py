"""Model output -> Markdown that is safe to render: formatting stays, raw HTML and remote loads go.

Gradio's Markdown sanitizer removes scripts and event handlers but keeps ``<img src=...>``, so a
model answer could make every annotator's browser fetch a remote URL. Outside code, ``<`` and
``>`` are escaped (raw HTML shows as text) and Markdown images become plain links (nothing loads
by itself). Code spans and fences are left alone, where Markdown already shows ``<`` literally.
"""

import html
import re

_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)", re.DOTALL)
_IMAGE = re.compile(r"!\[([^\]]*)\]\(")


def safe_markdown(text: str) -> str:
    parts = _CODE.split(text or "")
    for i in range(0, len(parts), 2):  # even indexes: outside code
        parts[i] = _IMAGE.sub(r"[image: \1](", html.escape(parts[i], quote=False))
    return "".join(parts)
