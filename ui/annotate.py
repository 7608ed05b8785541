"""The Annotate tab and the `/next_pair`, `/vote` API endpoints (same checks for both)."""

from collections.abc import Callable
from typing import Any

import gradio as gr

from collector.annotate import Annotation, RateLimited
from collector.errors import EngineError
from collector.prompts import PromptError
from storage.errors import VoteRejected
from ui.render import safe_markdown

# label, choice, element id, keyboard keys
VOTES = [
    ("A is better", "left", "vote-a", "A / 1"),
    ("B is better", "right", "vote-b", "B / 2"),
    ("Tie", "tie", "vote-tie", "T / 3"),
    ("Both are bad", "both_bad", "vote-bad", "X / 4"),
]

SHORTCUTS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  const typing = t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName));
  if (e.ctrlKey || e.metaKey || e.altKey || typing) return;
  const map = {a: 'vote-a', '1': 'vote-a', b: 'vote-b', '2': 'vote-b', t: 'vote-tie', '3': 'vote-tie',
               x: 'vote-bad', '4': 'vote-bad', s: 'skip'};
  const id = map[e.key.toLowerCase()];
  const btn = id && document.getElementById(id);
  if (btn && !btn.disabled) { e.preventDefault(); btn.click(); }
});
</script>
"""

USER_ERRORS = (PromptError, RateLimited, PermissionError, EngineError, VoteRejected)

Identity = Callable[[gr.Request], str | None]


def _user(who: Identity, request: gr.Request) -> str:
    user = who(request)
    if not user:
        raise gr.Error("log in first", title="Not logged in")
    return user


def _counts_md(svc: Annotation, user: str) -> str:
    c = svc.counts(user)
    return f"Your votes today: **{c['today']}** · all time: **{c['mine']}** · everyone: **{c['total']}**"


CUT_NOTE = "*[cut at the length limit: the model had not finished]*"


def answer_md(text: str, cut: bool) -> str:
    """An answer as shown, with a note under it when it stopped at the token limit (after closing a
    code fence the cut left open, which would otherwise swallow the note)."""
    if not cut:
        return safe_markdown(text)
    fence = "\n```" if text.count("```") % 2 else ""
    return f"{safe_markdown(text)}{fence}\n\n{CUT_NOTE}"


def build(demo: gr.Blocks, svc: Annotation, who: Identity) -> None:
    """The Annotate tab's components and events, inside the current Blocks context."""
    pair_id = gr.State(None)
    prompt = gr.Markdown("Loading a prompt...", elem_id="prompt")
    with gr.Row(equal_height=True):
        with gr.Column(variant="panel"):
            gr.Markdown("#### A")
            left = gr.Markdown(elem_id="answer-a", sanitize_html=True)
        with gr.Column(variant="panel"):
            gr.Markdown("#### B")
            right = gr.Markdown(elem_id="answer-b", sanitize_html=True)
    with gr.Row():
        buttons = [
            gr.Button(f"{label} ({keys})", elem_id=eid, interactive=False,
                      variant="primary" if c in ("left", "right") else "secondary")
            for label, c, eid, keys in VOTES
        ]
        skip = gr.Button("Skip (S)", elem_id="skip", variant="secondary")
    status = gr.Markdown(elem_id="status")
    with gr.Accordion("Write your own prompt", open=False):
        own = gr.Textbox(label="Your prompt", lines=3, elem_id="own-prompt")
        own_btn = gr.Button("Get two answers", elem_id="own-prompt-go")

    def disabled() -> list[Any]:
        return [gr.Button(interactive=False) for _ in buttons]

    def show(upd: dict[str, Any], user: str) -> list[Any]:
        return [f"**Prompt:** {safe_markdown(upd['prompt'])}", answer_md(upd["left"], upd["cut_left"]),
                answer_md(upd["right"], upd["cut_right"]), upd["pair_id"],
                *[gr.Button(interactive=True) for _ in buttons], _counts_md(svc, user), ""]

    def first_pair(request: gr.Request):
        """On page load: resume an unvoted pair (a reload loses nothing), else a new one."""
        user = who(request)
        if not user:  # Sign in with Hugging Face: the page reloads once signed in
            yield ["**Sign in with your Hugging Face account (button above) to start.**", "", "", None,
                   *disabled(), "", gr.skip()]
            return
        pending = svc.resume(user)
        if pending is not None:
            yield show(pending, user)
            return
        yield from load_pair("", request)

    def skip_pair(pid: str | None, request: gr.Request):
        svc.skip(_user(who, request), pid)
        yield from load_pair("", request)

    def load_pair(own_text: str, request: gr.Request):
        user = _user(who, request)
        try:
            for upd in svc.stream_pair(user, own_text or None):
                if upd["done"]:
                    yield show(upd, user)
                else:
                    yield [f"**Prompt:** {safe_markdown(upd['prompt'])}", safe_markdown(upd["left"]),
                           safe_markdown(upd["right"]), None,
                           *disabled(), gr.skip(), gr.skip()]
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    pair_outputs = [prompt, left, right, pair_id, *buttons, status, own]

    def make_vote(choice: str):
        def vote(pid: str | None, request: gr.Request):
            user = _user(who, request)
            if not pid:
                raise gr.Error("wait for both answers to finish before voting")
            try:
                out = svc.vote(user, pid, choice)
            except USER_ERRORS as e:
                raise gr.Error(str(e)) from None
            return [None, *disabled(), f"Vote #{out['vote_id']} recorded. {_counts_md(svc, user)}"]

        return vote

    no_own = gr.State("")
    for button, (_, choice, _, _) in zip(buttons, VOTES, strict=True):
        # Explicit ui_* names keep the public names /next_pair and /vote free for build_api.
        button.click(
            make_vote(choice), [pair_id], [pair_id, *buttons, status], trigger_mode="once",
            api_name=f"ui_vote_{choice}", api_visibility="private",
        ).success(load_pair, [no_own], pair_outputs, api_name=f"ui_next_after_{choice}", api_visibility="private")
    skip.click(skip_pair, [pair_id], pair_outputs, api_name="ui_skip", api_visibility="private", trigger_mode="once")
    own_btn.click(load_pair, [own], pair_outputs, api_name="ui_own_prompt", api_visibility="private",
                  trigger_mode="once")
    demo.load(first_pair, None, pair_outputs, api_name="ui_first_pair", api_visibility="private")


def build_api(svc: Annotation, who: Identity) -> None:
    """`/next_pair` and `/vote` for scripts (gradio_client), with the same login and checks."""

    def next_pair(prompt: str, request: gr.Request) -> dict:
        """Sample a new pair for the logged-in annotator; pass a prompt, or "" for the queue's next."""
        user = _user(who, request)
        try:
            return svc.next_pair(user, prompt or None)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    def vote(pair_id: str, choice: str, request: gr.Request) -> dict:
        """Record a vote on a pair issued to you: choice is left, right, tie or both_bad."""
        user = _user(who, request)
        try:
            return svc.vote(user, pair_id, choice)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    gr.api(next_pair, api_name="next_pair", concurrency_limit=None)
    gr.api(vote, api_name="vote", concurrency_limit=None)
