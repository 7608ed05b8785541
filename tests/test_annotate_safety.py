"""What annotators and scripts send, and what model text can do in the browser.

    .venv/bin/python -m pytest tests/test_annotate_safety.py
"""

import sqlite3

import pytest
from playwright.sync_api import Error as PlaywrightError

from storage.votes import VoteStore
from tests.test_browser import browser, login  # noqa: F401  (fixture)

XSS = """Here are some tricks:

<script>window.__xss = 'script'</script>
<img src="x" onerror="window.__xss = 'img-onerror'">
<svg onload="window.__xss = 'svg-onload'"><circle r="4"/></svg>
<iframe src="http://evil.invalid/frame" onload="window.__xss = 'iframe'"></iframe>
<style>body { display: none !important; }</style>
<a id="jslink" href="javascript:window.__xss='js-link'">click me</a>
[markdown js link](javascript:window.__xss='md-link')
<img src="http://evil.invalid/pixel.png">
![tracking pixel](http://evil.invalid/md.png)
"""


def test_model_output_with_an_xss_corpus_renders_inert(browser, app):  # noqa: F811
    # Injected through a stored pair, not the model: bob's unvoted pair is resumed on page load.
    store = VoteStore(app.data_dir / "votes.db")
    pid = store.issue_pair(annotator="bob", prompt_id=None, messages=[{"role": "user", "content": "<b>hi</b>"}],
                           answer_left=XSS, answer_right="A plain answer.", model_left="base", model_right="base",
                           seed=1, params={}, timings={})
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
    page.wait_for_selector("#answer-a [data-testid=markdown]:has-text('Here are some tricks')", timeout=60_000)
    page.wait_for_selector("#vote-a:not([disabled])", timeout=60_000)
    assert page.is_visible("#vote-a")  # the <style> did not hide the page
    for link in page.locator("#answer-a a").all():
        # A target=_blank link opens a tab in front: a background page gets no animation frames, and
        # Playwright's "stable" check before a click waits on them (a CI run timed out there).
        page.bring_to_front()
        link.click(timeout=2_000, no_wait_after=True)
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__xss") is None
    assert page.locator("#answer-a script, #answer-a iframe, #answer-a svg[onload], #answer-a [onerror]").count() == 0
    assert not [u for u in external if "evil.invalid" in u], external
    page.click("#vote-b")
    page.wait_for_selector("#status:has-text('recorded')", timeout=60_000)
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        assert conn.execute("SELECT choice FROM votes WHERE pair_id = ?", (pid,)).fetchone() == ("right",)
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
  const md = document.querySelector('#answer-a [data-testid="markdown"]');
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


def test_safe_markdown_keeps_code_and_formatting_but_not_html_or_images():
    from ui.render import safe_markdown

    out = safe_markdown("**bold** <b>x</b> ![p](http://e.invalid/a.png)\n```py\nif a < b:\n    pass\n```\n`x<y`")
    assert "**bold**" in out and "&lt;b&gt;x&lt;/b&gt;" in out
    assert "![" not in out and "[image: p](http://e.invalid/a.png)" in out
    assert "if a < b:" in out and "`x<y`" in out


def test_a_cut_answer_is_shown_with_a_note_under_it_even_inside_an_open_code_fence():
    from ui.annotate import CUT_NOTE, answer_md
    from ui.render import safe_markdown

    text = "Here is the code:\n```python\nfor i in range(3):\n    print(i <"
    assert answer_md(text, cut=False) == safe_markdown(text)
    shown = answer_md(text, cut=True)
    assert shown.endswith(f"```\n\n{CUT_NOTE}")  # the fence the cut left open is closed first
    assert shown.count("```") == 2
    assert answer_md("A finished `x`.", cut=True) == f"A finished `x`.\n\n{CUT_NOTE}"


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
