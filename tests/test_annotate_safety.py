"""What annotators and scripts send, and what model text can do in the browser.

    .venv/bin/python -m pytest tests/test_annotate_safety.py
"""

import sqlite3

import pytest
from playwright.sync_api import Error as PlaywrightError

from storage.votes import VoteStore
from tests.test_browser import browser, login  # noqa: F401  (fixture)

# Tricks to run code or load a resource from rendered text. The first five got past the earlier
# regex-based renderer; the rest are the usual suspects of HTML sanitizer bypasses.
BYPASSES = """Here are some tricks:

![ref style][r]

[r]: http://evil.invalid/ref.png

![alt [with] nested [brackets]](http://evil.invalid/nested.png)

\\`<img src="http://evil.invalid/after-escaped-tick.png">

<svg><image href="http://evil.invalid/svg-image.png"/></svg>

<script>window.__xss = 'script'</script>
<img src="x" onerror="window.__xss = 'img-onerror'">
<img srcset="http://evil.invalid/srcset.png 1x">
<svg onload="window.__xss = 'svg-onload'"><circle r="4"/></svg>
<svg><use href="http://evil.invalid/use.svg#x"/></svg>
<iframe src="http://evil.invalid/frame" onload="window.__xss = 'iframe'"></iframe>
<iframe srcdoc="<img src=http://evil.invalid/srcdoc.png>"></iframe>
<style>body { display: none !important; } @import url(http://evil.invalid/import.css);</style>
<link rel="stylesheet" href="http://evil.invalid/link.css">
<div style="background:url(http://evil.invalid/bg.png)">styled</div>
<video poster="http://evil.invalid/poster.png"><source src="http://evil.invalid/v.mp4"></video>
<audio src="http://evil.invalid/a.mp3" autoplay></audio>
<picture><source srcset="http://evil.invalid/picture.png"><img></picture>
<object data="http://evil.invalid/object"></object><embed src="http://evil.invalid/embed">
<input type="image" src="http://evil.invalid/input.png">
<table background="http://evil.invalid/table.png"><tr><td>t</td></tr></table>
<form action="http://evil.invalid/form"><button>send</button></form>
<meta http-equiv="refresh" content="0;url=http://evil.invalid/meta">
<base href="http://evil.invalid/">
<details open ontoggle="window.__xss = 'details'"><summary>s</summary></details>
<noscript><p title="</noscript><img src=x onerror=window.__xss='mxss'>"></noscript>
<math><mi xlink:href="javascript:window.__xss='math'">m</mi></math>
<a id="jslink" href="javascript:window.__xss='js-link'">click me</a>
<a href="http://evil.invalid/page" ping="http://evil.invalid/ping">ping on click</a>
[markdown js link](javascript:window.__xss='md-link')
[mixed case](JaVaScRiPt:window.__xss='md-case')
[data link](data:text/html,<script>alert(1)</script>)
![angle](<http://evil.invalid/angle.png>)
![titled](http://evil.invalid/titled.png "title")
${window.__xss = 'template'}
{{constructor.constructor('window.__xss = "handlebars"')()}}

```
unclosed fence <img src="http://evil.invalid/after-fence.png">
"""

PANES = ("#prompt", "#answer-a", "#answer-b")
ACTIVE = ("img, svg, image, iframe, frame, object, embed, video, audio, source, picture, style, link, script, "
          "form, input, button, meta, base, math, details, noscript, [style], [onerror], [onload], [ontoggle], "
          "[background], [srcset], [ping]")


def test_a_corpus_of_bypasses_in_prompt_and_answers_renders_inert_and_loads_nothing(browser, app):  # noqa: F811
    # Injected through a stored pair (prompt and both answers), not the model: bob's unvoted pair is
    # resumed on page load.
    store = VoteStore(app.data_dir / "votes.db")
    pid = store.issue_pair(annotator="bob", prompt_id=None, messages=[{"role": "user", "content": BYPASSES}],
                           answer_left=BYPASSES, answer_right="A plain *answer*.\n\n" + BYPASSES,
                           model_left="base", model_right="base", seed=1, params={}, timings={})
    page = browser.new_page()
    external: list[str] = []

    def guard(route):
        url = route.request.url
        if url.startswith(app.url.rstrip("/")) or url.startswith(("data:", "blob:")):
            return route.continue_()
        try:
            own = route.request.frame.page == page
        except PlaywrightError:  # a new tab's first navigation: its frame does not exist yet
            own = False
        if own:
            external.append(url)  # what the page asked for by itself (a clicked link's new tab is not)
        return route.abort()  # nothing leaves the machine, from this page or a tab a click opened

    page.context.route("**/*", guard)
    page.goto(app.url)
    page.fill("input[type=text]", "bob")
    page.fill("input[type=password]", app.users["bob"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#answer-a .pl-text:has-text('Here are some tricks')", timeout=60_000)
    page.wait_for_selector("#vote-a:not([disabled])", timeout=60_000)
    assert page.is_visible("#vote-a")  # no <style> hid the page
    for pane in PANES:
        assert "Here are some tricks" in page.inner_text(pane)
        found = page.locator(f"{pane} .pl-text").locator(ACTIVE)
        assert found.count() == 0, [found.nth(i).evaluate("e => e.outerHTML") for i in range(found.count())]
        for href in page.locator(f"{pane} .pl-text a").evaluate_all("as => as.map(a => a.getAttribute('href'))"):
            assert href.startswith(("http://", "https://")), href  # no javascript:, data: or relative links
    assert "${" in page.inner_text("#answer-a") and "{{constructor" in page.inner_text("#answer-a")  # shown as text
    for link in page.locator("#answer-a .pl-text a").all():
        # A target=_blank link opens a tab in front: a background page gets no animation frames, and
        # Playwright's "stable" check before a click waits on them (a CI run timed out there).
        page.bring_to_front()
        link.click(timeout=2_000, no_wait_after=True)
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__xss") is None
    assert external == [], external
    page.click("#vote-b")
    page.wait_for_selector("#status:has-text('recorded')", timeout=60_000)
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        assert conn.execute("SELECT choice FROM votes WHERE pair_id = ?", (pid,)).fetchone() == ("right",)
    page.close()


def test_the_page_policy_keeps_even_an_injected_image_from_loading(browser, app):  # noqa: F811
    # The second wall behind the sanitizer: the Content-Security-Policy header lets the page load
    # images only from the app. An <img> put into the page by script (as a sanitizer bug would) loads nothing.
    page = login(browser, app, "alice")
    page.wait_for_selector("#vote-a", timeout=60_000)
    asked: list[str] = []  # requests that reached the network layer (the policy stops them before it)

    def record(route):
        asked.append(route.request.url)
        route.abort()

    page.context.route("http://evil.invalid/**", record)
    page.evaluate("""() => { const i = document.createElement('img'); i.src = 'http://evil.invalid/injected.png';
                             document.body.appendChild(i); }""")
    page.wait_for_timeout(1000)
    assert not [u for u in asked if "evil.invalid" in u], asked
    page.close()


@pytest.mark.parametrize(
    "prompt, refused",
    [
        ("x" * 1_000_000, "the limit is 4,000"),
        ("What is\x00 this?", "NUL bytes"),
        ("", None),  # the queue's next prompt
        ("ما هي عاصمة فرنسا؟", None),  # right-to-left
        ("Explain 🌍🚀 in one line 👩‍🚀", None),  # emoji, including a ZWJ sequence
    ],
)
def test_odd_prompts_are_refused_with_a_message_or_kept_intact(app, prompt, refused):
    from gradio_client.exceptions import AppError

    client = app.client("alice")
    if refused:
        with pytest.raises(AppError, match=refused):
            client.predict(prompt, api_name="/next_pair")
        return
    pair = client.predict(prompt, api_name="/next_pair")
    if prompt:
        assert pair["prompt"] == prompt
        with sqlite3.connect(app.data_dir / "votes.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM prompts WHERE text = ?", (prompt,)).fetchone()[0] == 1


SETTLED = """(previous) => {
  const md = document.querySelector('#answer-a .pl-text');
  const tracker = document.querySelector('#answer-a [data-testid="status-tracker"]');
  const button = document.querySelector('#vote-a');
  if (!md || !button) return false;
  const text = md.innerText;
  const ready = (!tracker || tracker.classList.contains('hide')) && !button.disabled;
  return ready && text.trim() && text !== previous ? text : false;
}"""


def settled(page, previous: str | None = None) -> str:
    """The answer A of a complete pair (no progress overlay, buttons enabled), other than ``previous``."""
    return page.wait_for_function(SETTLED, arg=previous, timeout=120_000).json_value()


def test_a_reload_resumes_the_unvoted_pair_and_skip_moves_on(browser, app):  # noqa: F811
    page = login(browser, app, "alice")
    shown = settled(page)
    page.reload()
    assert settled(page) == shown  # nothing lost on reload
    page.click("#skip")
    skipped_to = settled(page, previous=shown)
    page.reload()
    assert settled(page) == skipped_to  # the skipped pair does not come back
    page.close()


def test_render_keeps_formatting_and_code_but_no_html_or_images():
    from ui.render import render

    out = render("**bold** <b>x</b> ![p](http://e.invalid/a.png)\n```py\nif a < b:\n    pass\n```\n`x<y`")
    assert "<strong>bold</strong>" in out and "&lt;b&gt;x&lt;/b&gt;" in out
    assert "<img" not in out and ">p</a>" in out and 'href="http://e.invalid/a.png"' in out
    assert "if a &lt; b:" in out and "<code>x&lt;y</code>" in out
    assert 'rel="noopener noreferrer nofollow"' in render("[a](https://example.org)")
    assert "href" not in render("[a](javascript:alert(1))") and "href" not in render("[a](data:text/html,x)")


def test_a_cut_answer_is_shown_with_a_note_under_it_even_inside_an_open_code_fence():
    from ui.annotate import CUT_NOTE, answer_html

    text = "Here is the code:\n```python\nfor i in range(3):\n    print(i <"
    assert CUT_NOTE not in answer_html(text, cut=False)
    shown = answer_html(text, cut=True)
    # the fence the cut left open is closed: the note is outside the code block
    assert shown.index("</pre>") < shown.index(CUT_NOTE)
    assert shown.endswith(f'<p class="cut-note"><em>{CUT_NOTE}</em></p></div>')


def test_the_per_user_rate_limit_refuses_with_the_wait_and_spares_others(engine, tmp_path, smollm2_dir):
    from collector.annotate import AnnotateConfig, Annotation, RateLimited
    from collector.prompts import PromptQueue
    from collector.sampling import SamplingParams
    from collector.serving import Serving

    store = VoteStore(tmp_path / "votes.db")
    queue = PromptQueue(store)
    queue.load_file()
    svc = Annotation(store, queue, Serving(engine, store, tmp_path / "adapters", str(smollm2_dir), 16),
                     AnnotateConfig(sampling=SamplingParams(max_tokens=8), pairs_per_minute=2, repeat_rate=0.0))
    for _ in range(2):
        svc.next_pair("carol")
    with pytest.raises(RateLimited, match=r"at most 2 per 60 s; try again in \d+ s"):
        svc.next_pair("carol")
    assert svc.next_pair("dave")["pair_id"]  # the limit is per person
    assert store.count_votes() == 0 and len(store.prompts_seen_by("carol")) == 2  # the refusal issued nothing


def test_a_pair_keeps_why_each_answer_ended_cut_or_finished(engine, tmp_path, smollm2_dir):
    from collector.annotate import AnnotateConfig, Annotation
    from collector.prompts import PromptQueue
    from collector.sampling import SamplingParams
    from collector.serving import Serving

    store = VoteStore(tmp_path / "votes.db")
    serving = Serving(engine, store, tmp_path / "adapters", str(smollm2_dir), 16)

    def pair(max_tokens: int, prompt: str):
        svc = Annotation(store, PromptQueue(store), serving,
                         AnnotateConfig(sampling=SamplingParams(max_tokens=max_tokens), repeat_rate=0.0))
        shown = svc.next_pair("erin", prompt=prompt)
        stored = store.get_pair(shown["pair_id"])
        # what the annotator is told (cut_left / cut_right) is what was stored
        assert (shown["cut_left"], shown["cut_right"]) == tuple(f == "length" for f in stored.finish_reasons)
        return stored

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    def tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    assert pair(6, "Tell me about the ocean.").finish_reasons == ("length", "length")
    # With room to finish, each side's reason must match its own answer: "length" only for an
    # answer that used the whole budget (give or take re-tokenisation), "stop" for one that
    # ended early. Sampling decides which; a few short prompts until one answer has stopped.
    reasons: list[str] = []
    for prompt in ("Say hello.", "Say hi in one word.", "What is 2 + 2?", "Name one colour."):
        got = pair(128, prompt)
        for answer, reason in zip((got.answer_left, got.answer_right), got.finish_reasons, strict=True):
            n = tokens(answer)
            assert reason == ("length" if n >= 118 else "stop"), (reason, n, answer)  # 10 tokens slack
            reasons.append(reason)
        if "stop" in reasons:
            break
    assert "stop" in reasons, reasons
