"""The Annotate tab and the `/next_pair`, `/vote` API endpoints (same checks for both)."""

import html
from typing import Any

import gradio as gr

from collector.annotate import Annotation
from collector.users import Access
from storage.errors import UserError
from ui.errors import refused
from ui.render import render

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

USER_ERRORS = (UserError, PermissionError)  # shown as a notice; anything else is a bug

def _user(access: Access, request: gr.Request) -> str:
    """The annotator's key, checked on the server for this event; gr.Error if they may not annotate."""
    try:
        return access.annotator(request)
    except PermissionError as e:
        raise refused(str(e), title="Not allowed") from None


def _counts_md(svc: Annotation, user: str) -> str:
    c = svc.counts(user)
    return f"Your votes today: **{c['today']}** · all time: **{c['mine']}** · everyone: **{c['total']}**"


NOT_LISTED = ("<p><strong>You are signed in as {name}, who is not among this app's annotators.</strong> "
              "Ask an admin to add you.</p>")
SIGN_IN = "<p><strong>Sign in with your Hugging Face account (button above) to start.</strong></p>"
CUT_NOTE = "[cut at the length limit: the model had not finished]"


def answer_html(text: str, cut: bool = False) -> str:
    """An answer as shown (ui.render: sanitized on the server), with a note under it when it stopped
    at the token limit. Rendering closes whatever the cut left open (a code fence, a list)."""
    note = f'<p class="cut-note"><em>{CUT_NOTE}</em></p>' if cut else ""
    return f'<div class="pl-text">{render(text)}{note}</div>'


def prompt_html(text: str) -> str:
    return f'<div class="pl-text"><p><strong>Prompt:</strong></p>{render(text)}</div>'


def _html(elem_id: str, value: str = "") -> gr.HTML:
    """A pane for text written by a person or a model: ui.render made it safe; no click handler."""
    return gr.HTML(value, elem_id=elem_id, js_on_load=None, apply_default_css=True)


def build(demo: gr.Blocks, svc: Annotation, access: Access) -> None:
    """The Annotate tab's components and events, inside the current Blocks context."""
    pair_id = gr.State(None)
    prompt = _html("prompt", "<p>Loading a prompt...</p>")
    with gr.Row(equal_height=True):
        with gr.Column(variant="panel"):
            gr.Markdown("#### A")
            left = _html("answer-a")
        with gr.Column(variant="panel"):
            gr.Markdown("#### B")
            right = _html("answer-b")
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
        return [prompt_html(upd["prompt"]), answer_html(upd["left"], upd["cut_left"]),
                answer_html(upd["right"], upd["cut_right"]), upd["pair_id"],
                *[gr.Button(interactive=True) for _ in buttons], _counts_md(svc, user), ""]

    def first_pair(request: gr.Request):
        """On page load: resume an unvoted pair (a reload loses nothing), else a new one."""
        person = access.person(request)
        if person is None:  # Sign in with Hugging Face: the page reloads once signed in
            yield [SIGN_IN, "", "", None, *disabled(), "", gr.skip()]
            return
        if not access.may_annotate(person):
            yield [NOT_LISTED.format(name=html.escape(person.name)), "", "", None, *disabled(), "", gr.skip()]
            return
        user = person.key
        pending = svc.resume(user)
        if pending is not None:
            yield show(pending, user)
            return
        yield from load_pair("", request)

    def skip_pair(pid: str | None, request: gr.Request):
        svc.skip(_user(access, request), pid)
        yield from load_pair("", request)

    def load_pair(own_text: str, request: gr.Request):
        user = _user(access, request)
        try:
            for upd in svc.stream_pair(user, own_text or None):
                if upd["done"]:
                    yield show(upd, user)
                else:
                    yield [prompt_html(upd["prompt"]), answer_html(upd["left"]),
                           answer_html(upd["right"]), None,
                           *disabled(), gr.skip(), gr.skip()]
        except USER_ERRORS as e:
            raise refused(str(e)) from None

    pair_outputs = [prompt, left, right, pair_id, *buttons, status, own]

    def make_vote(choice: str):
        def record(user: str, pid: str) -> str:
            out = svc.vote(user, pid, choice)
            return f"Vote #{out['vote_id']} recorded. {_counts_md(svc, user)}"

        async def vote(pid: str | None, request: gr.Request):
            user = _user(access, request)
            if not pid:
                raise refused("wait for both answers to finish before voting")
            try:
                line = await svc.off_loop(record, user, pid)
            except USER_ERRORS as e:
                raise refused(str(e)) from None
            return [None, *disabled(), line]

        return vote

    no_own = gr.State("")
    for button, (_, choice, _, _) in zip(buttons, VOTES, strict=True):
        # Explicit ui_* names keep the public names /next_pair and /vote free for build_api.
        button.click(
            make_vote(choice), [pair_id], [pair_id, *buttons, status], trigger_mode="once",
            api_name=f"ui_vote_{choice}", api_visibility="private", concurrency_limit=None,
        ).success(load_pair, [no_own], pair_outputs, api_name=f"ui_next_after_{choice}", api_visibility="private",
                  concurrency_limit=None)
    # Generation events have no per-event limit: the service's GenerationGate bounds them all together.
    skip.click(skip_pair, [pair_id], pair_outputs, api_name="ui_skip", api_visibility="private", trigger_mode="once",
               concurrency_limit=None)
    own_btn.click(load_pair, [own], pair_outputs, api_name="ui_own_prompt", api_visibility="private",
                  trigger_mode="once", concurrency_limit=None)
    demo.load(first_pair, None, pair_outputs, api_name="ui_first_pair", api_visibility="private",
              concurrency_limit=None)


def build_api(svc: Annotation, access: Access) -> None:
    """`/next_pair` and `/vote` for scripts (gradio_client), with the same login and checks."""

    def next_pair(prompt: str, request: gr.Request) -> dict:
        """Sample a new pair for the logged-in annotator; pass a prompt, or "" for the queue's next."""
        user = _user(access, request)
        try:
            return svc.next_pair(user, prompt or None)
        except USER_ERRORS as e:
            raise refused(str(e)) from None

    async def vote(pair_id: str, choice: str, request: gr.Request) -> dict:
        """Record a vote on a pair issued to you: choice is left, right, tie or both_bad."""
        user = _user(access, request)
        try:
            return await svc.off_loop(svc.vote, user, pair_id, choice)
        except USER_ERRORS as e:
            raise refused(str(e)) from None

    gr.api(next_pair, api_name="next_pair", concurrency_limit=None)
    gr.api(vote, api_name="vote", concurrency_limit=None)
