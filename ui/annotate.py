"""The Annotate tab and the `/next_pair`, `/vote`, `/follow_up` API endpoints (same checks for both)."""

import html
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import gradio as gr

from collector.annotate import Annotation
from collector.users import Access
from storage.errors import UserError
from storage.votes import MAX_REASON_CHARS
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
               x: 'vote-bad', '4': 'vote-bad', s: 'skip', u: 'change-vote'};
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
    line = f"Your votes today: **{c['today']}** · all time: **{c['mine']}** · everyone: **{c['total']}**"
    agreed, compared = c["agreement"]
    if compared:
        line += f" · you agree with others on **{agreed} of {compared}** pairs shown twice"
    if c["to_next_round"] is not None:
        line += (" · next round: **starting**" if c["to_next_round"] == 0
                 else f" · next round in **{c['to_next_round']}** votes")
    return line


NOT_LISTED = ("<p><strong>You are signed in as {name}, who is not among this app's annotators.</strong> "
              "Ask an admin to add you.</p>")
SIGN_IN = "<p><strong>Sign in with your Hugging Face account (button above) to start.</strong></p>"
CUT_NOTE = "[cut at the length limit: the model had not finished]"


def answer_html(text: str, cut: bool = False) -> str:
    """An answer as shown (ui.render: sanitized on the server), with a note under it when it stopped
    at the token limit. Rendering closes whatever the cut left open (a code fence, a list)."""
    note = f'<p class="cut-note"><em>{CUT_NOTE}</em></p>' if cut else ""
    return f'<div class="pl-text">{render(text)}{note}</div>'


ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def prompt_html(text: str, history: list[dict[str, str]] | None = None) -> str:
    """The prompt, with the conversation before it (a system prompt, earlier turns) above it:
    every message through ui.render, like the answers."""
    turns = "".join(f'<div class="pl-turn pl-{html.escape(m["role"])}"><p><strong>'
                    f'{ROLE_LABELS.get(m["role"], "Message")}:</strong></p>{render(m["content"])}</div>'
                    for m in history or [])
    return f'<div class="pl-text">{turns}<p><strong>Prompt:</strong></p>{render(text)}</div>'


def _html(elem_id: str, value: str = "") -> gr.HTML:
    """A pane for text written by a person or a model: ui.render made it safe; no click handler."""
    return gr.HTML(value, elem_id=elem_id, js_on_load=None, apply_default_css=True)


# -- the handlers: module-level, testable without a browser; each returns (or yields) a dict of
# component name -> new value, and the wiring below maps the names to the components.

PAIR_VIEW = ("prompt", "left", "right", "pair_id", *(eid for _, _, eid, _ in VOTES), "status", "own")


def _buttons(enabled: bool) -> dict[str, Any]:
    return {eid: gr.Button(interactive=enabled) for _, _, eid, _ in VOTES}


def _shown(svc: Annotation, upd: dict[str, Any], user: str) -> dict[str, Any]:
    """A finished pair: both answers, its id, the vote buttons on, the counts; the prompt box cleared."""
    return {"prompt": prompt_html(upd["prompt"], upd.get("history")),
            "left": answer_html(upd["left"], upd["cut_left"]),
            "right": answer_html(upd["right"], upd["cut_right"]), "pair_id": upd["pair_id"],
            **_buttons(True), "status": _counts_md(svc, user), "own": ""}


def guidelines_view(svc: Annotation, user: str | None) -> dict[str, Any]:
    """The guidelines pane: open for someone who has not voted under this version yet."""
    if svc.guideline_version is None:
        return {"guidelines": gr.Accordion(visible=False)}
    return {"guidelines": gr.Accordion(visible=True, open=user is None or svc.guidelines_unread(user))}


def _blocked(message: str) -> dict[str, Any]:
    return {"prompt": message, "left": "", "right": "", "pair_id": None, **_buttons(False), "status": "",
            "own": gr.skip()}


_latest: dict[str, int] = {}  # browser session -> the newest pair request it made
_latest_lock = threading.Lock()
_requests = itertools.count(1)


def _claim(request: Any) -> Callable[[], bool]:
    """Register a new pair request of this browser session; the returned check says whether it is
    still the newest. A follow-up sent while the next pair still streams makes that stream stale:
    it stops (nothing stored) instead of overwriting the follow-up on screen, whichever finishes last."""
    session = getattr(request, "session_hash", None) or ""
    mine = next(_requests)
    with _latest_lock:
        _latest[session] = mine
        if len(_latest) > 10_000:  # sessions come and go: forget the oldest
            for old in sorted(_latest, key=_latest.__getitem__)[:5_000]:
                del _latest[old]
    return lambda: _latest.get(session, mine) == mine


def _streamed(svc: Annotation, user: str, updates: Iterator[dict[str, Any]],
              request: Any = None) -> Iterator[dict[str, Any]]:
    current = _claim(request)
    try:
        for upd in updates:
            if not current():
                updates.close()  # a newer request of this session took over the screen
                return
            if upd["done"]:
                yield _shown(svc, upd, user)
            else:
                yield {"prompt": prompt_html(upd["prompt"], upd.get("history")), "left": answer_html(upd["left"]),
                       "right": answer_html(upd["right"]), "pair_id": None, **_buttons(False),
                       "status": gr.skip(), "own": gr.skip()}
    except USER_ERRORS as e:
        raise refused(str(e)) from None


def load_pair(svc: Annotation, access: Access, own_text: str, request: Any) -> Iterator[dict[str, Any]]:
    """A new pair (from the queue, or for the annotator's own prompt), streamed as it generates."""
    user = _user(access, request)
    yield from _streamed(svc, user, svc.stream_pair(user, own_text or None), request)


def follow_up_pair(svc: Annotation, access: Access, last: str | None, text: str,
                   request: Any) -> Iterator[dict[str, Any]]:
    """A new pair that continues the conversation of the pair voted last from the answer chosen
    there, with the annotator's message, streamed as it generates."""
    user = _user(access, request)
    yield from _streamed(svc, user, svc.follow_up(user, last, text), request)


def first_pair(svc: Annotation, access: Access, request: Any) -> Iterator[dict[str, Any]]:
    """On page load: resume an unvoted pair (a reload loses nothing), else a new one."""
    person = access.person(request)
    if person is None:  # Sign in with Hugging Face: the page reloads once signed in
        yield _blocked(SIGN_IN)
        return
    if not access.may_annotate(person):
        yield _blocked(NOT_LISTED.format(name=html.escape(person.name)))
        return
    guide = guidelines_view(svc, person.key)
    pending = svc.resume(person.key)
    if pending is not None:
        yield {**_shown(svc, pending, person.key), **guide}
        return
    for i, view in enumerate(load_pair(svc, access, "", request)):
        yield {**view, **guide} if i == 0 else view


def skip_pair(svc: Annotation, access: Access, pair_id: str | None, request: Any) -> Iterator[dict[str, Any]]:
    svc.skip(_user(access, request), pair_id)
    yield from load_pair(svc, access, "", request)


async def vote(svc: Annotation, access: Access, choice: str, pair_id: str | None, reason: str | None,
               request: Any) -> dict[str, Any]:
    """Record the vote and its optional reason (off the event loop; no vote waits for a
    generation); the buttons go off, the reason box is cleared, the guidelines fold away."""
    user = _user(access, request)
    if not pair_id:
        raise refused("wait for both answers to finish before voting")

    def record() -> str:
        out = svc.vote(user, pair_id, choice, reason)
        return f"Vote #{out['vote_id']} recorded. {_counts_md(svc, user)}"

    try:
        line = await svc.off_loop(record)
    except USER_ERRORS as e:
        raise refused(str(e)) from None
    return {"pair_id": None, **_buttons(False), "status": line, "reason": "", "last": pair_id,
            **guidelines_view(svc, user)}


CHOICE_NAMES = {"left": "A is better", "right": "B is better", "tie": "a tie", "both_bad": "both are bad"}


def change_vote(svc: Annotation, access: Access, last: str | None, request: Any) -> dict[str, Any]:
    """The pair voted last, shown again with the buttons on: a different choice replaces the vote
    (the old one is kept, marked), the same one leaves it as it was."""
    user = _user(access, request)
    try:
        view = svc.reshow(user, last)
    except USER_ERRORS as e:
        raise refused(str(e)) from None
    said = CHOICE_NAMES.get(view.pop("voted") or "", "nothing")
    return {**_shown(svc, view, user), "status": f"You said **{said}** on this pair. Pick again to change it."}


def api_next_pair(svc: Annotation, access: Access, prompt: str, request: Any) -> dict[str, Any]:
    user = _user(access, request)
    try:
        return svc.next_pair(user, prompt or None)
    except USER_ERRORS as e:
        raise refused(str(e)) from None


def api_follow_up(svc: Annotation, access: Access, pair_id: str, message: str, request: Any) -> dict[str, Any]:
    user = _user(access, request)
    try:
        return svc.next_follow_up(user, pair_id, message)
    except USER_ERRORS as e:
        raise refused(str(e)) from None


async def api_vote(svc: Annotation, access: Access, pair_id: str, choice: str, reason: str | None,
                   request: Any, orders: str | None = None) -> dict[str, Any]:
    user = _user(access, request)
    try:
        return await svc.off_loop(svc.vote, user, pair_id, choice, reason, orders)
    except USER_ERRORS as e:
        raise refused(str(e)) from None


# -- the wiring ---------------------------------------------------------------------------


def build(demo: gr.Blocks, svc: Annotation, access: Access) -> None:
    """The Annotate tab's components and events, inside the current Blocks context."""
    c: dict[str, Any] = {"pair_id": gr.State(None), "last": gr.State(None)}
    text = svc.config.guidelines
    with gr.Accordion("Guidelines: what makes an answer better here", open=True, visible=bool(text.strip()),
                      elem_id="guidelines") as c["guidelines"]:
        _html("guidelines-text", f'<div class="pl-text">{render(text)}</div>' if text.strip() else "")
    c["prompt"] = _html("prompt", "<p>Loading a prompt...</p>")
    with gr.Row(equal_height=True):
        with gr.Column(variant="panel"):
            gr.Markdown("#### A")
            c["left"] = _html("answer-a")
        with gr.Column(variant="panel"):
            gr.Markdown("#### B")
            c["right"] = _html("answer-b")
    with gr.Row():
        for label, choice, eid, keys in VOTES:
            c[eid] = gr.Button(f"{label} ({keys})", elem_id=eid, interactive=False,
                               variant="primary" if choice in ("left", "right") else "secondary")
        skip = gr.Button("Skip (S)", elem_id="skip", variant="secondary")
        change = gr.Button("Change my last vote (U)", elem_id="change-vote", variant="secondary")
    c["reason"] = gr.Textbox(label="Why? (optional: a few words kept with your vote)", lines=1,
                             max_length=MAX_REASON_CHARS, elem_id="reason")
    c["status"] = gr.Markdown(elem_id="status")
    with gr.Accordion("Follow up on the answer you chose (after an A or B vote)", open=False):
        c["follow"] = gr.Textbox(label="Your next message", lines=2, elem_id="follow-up",
                                 max_length=svc.config.max_prompt_chars)
        follow_btn = gr.Button("Continue the conversation", elem_id="follow-up-go")
    with gr.Accordion("Write your own prompt", open=False):
        c["own"] = gr.Textbox(label="Your prompt", lines=3, elem_id="own-prompt")
        own_btn = gr.Button("Get two answers", elem_id="own-prompt-go")
    pair_outputs = [c[k] for k in PAIR_VIEW]
    vote_outputs = [c["pair_id"], *(c[eid] for _, _, eid, _ in VOTES), c["status"], c["reason"], c["guidelines"],
                    c["last"]]

    def keyed(view: dict[str, Any]) -> dict[Any, Any]:
        return {c[k]: v for k, v in view.items()}

    def on_load(request: gr.Request):
        for view in first_pair(svc, access, request):
            yield keyed(view)

    def on_next(own_text: str, request: gr.Request):
        for view in load_pair(svc, access, own_text, request):
            yield keyed(view)

    def on_skip(pid: str | None, request: gr.Request):
        for view in skip_pair(svc, access, pid, request):
            yield keyed(view)

    def on_vote(choice: str):
        async def handler(pid: str | None, reason: str | None, request: gr.Request):
            return keyed(await vote(svc, access, choice, pid, reason, request))
        return handler

    no_own = gr.State("")
    next_after_vote = []  # a follow-up cancels the next pair still loading, so that neither overwrites the other
    for _, choice, eid, _ in VOTES:
        # Explicit ui_* names keep the public names /next_pair and /vote free for build_api.
        next_after_vote.append(c[eid].click(
            on_vote(choice), [c["pair_id"], c["reason"]], vote_outputs, trigger_mode="once",
            api_name=f"ui_vote_{choice}", api_visibility="private", concurrency_limit=None,
        ).success(on_next, [no_own], pair_outputs, api_name=f"ui_next_after_{choice}", api_visibility="private",
                  concurrency_limit=None))
    # Generation events have no per-event limit: the service's GenerationGate bounds them all together.
    skip.click(on_skip, [c["pair_id"]], pair_outputs, api_name="ui_skip", api_visibility="private",
               trigger_mode="once", concurrency_limit=None)
    def on_follow_up(last: str | None, text: str, request: gr.Request):
        for i, view in enumerate(follow_up_pair(svc, access, last, text, request)):
            yield {**keyed(view), c["follow"]: ""} if i == 0 else keyed(view)

    follow_btn.click(on_follow_up, [c["last"], c["follow"]], [*pair_outputs, c["follow"]], api_name="ui_follow_up",
                     api_visibility="private", trigger_mode="once", concurrency_limit=None, cancels=next_after_vote)

    def on_change(last: str | None, request: gr.Request):
        return keyed(change_vote(svc, access, last, request))

    change.click(on_change, [c["last"]], pair_outputs, api_name="ui_change_vote", api_visibility="private",
                 trigger_mode="once")
    own_btn.click(on_next, [c["own"]], pair_outputs, api_name="ui_own_prompt", api_visibility="private",
                  trigger_mode="once", concurrency_limit=None)
    demo.load(on_load, None, [*pair_outputs, c["guidelines"]], api_name="ui_first_pair", api_visibility="private",
              concurrency_limit=None)


def build_api(svc: Annotation, access: Access) -> None:
    """`/next_pair` and `/vote` for scripts (gradio_client), with the same login and checks."""

    def next_pair(request: gr.Request, prompt: str = "") -> dict:
        """Sample a new pair for the logged-in annotator: the queue's next prompt, or your own."""
        return api_next_pair(svc, access, prompt, request)

    async def vote(pair_id: str, choice: Literal["left", "right", "tie", "both_bad"], request: gr.Request,
                   reason: str = "", orders: str = "") -> dict:
        """Record a vote on a pair issued to you (left, right, tie or both_bad), with an optional reason.
        ``orders`` (judge accounts only): the verdicts with the answers as shown and swapped, both
        as sides of the pair shown, e.g. "left,right"."""
        return await api_vote(svc, access, pair_id, choice, reason, request, orders)

    def follow_up(pair_id: str, message: str, request: gr.Request) -> dict:
        """Continue from the answer you chose on a pair you voted A or B on: a new pair whose prompt
        is that conversation, the chosen answer and your message (``history`` holds the turns)."""
        return api_follow_up(svc, access, pair_id, message, request)

    gr.api(next_pair, api_name="next_pair", concurrency_limit=None)
    gr.api(follow_up, api_name="follow_up", concurrency_limit=None)
    gr.api(vote, api_name="vote", concurrency_limit=None)
