"""The Admin tab: loop health, rounds, people's verdict, annotator quality, and the buttons that
steer them.

Every action is a module-level function of an ``Admin`` (the services it acts on) that first
checks, on the server, that the request comes from an admin: the tab being hidden is only a
convenience, and every event can be reached through Gradio's queue by its index. ``view`` computes
everything the tab shows as a dict keyed by component name; ``build`` only lays out components and
wires events. Both are callable without a browser.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from collector.quality import (
    annotator_quality,
    judge_agreement,
    outcomes_from_votes,
    win_rate_vs_base,
    win_rates_with_intervals,
)
from collector.serving import AdapterRejected, Serving
from collector.users import Access, Person, UsersError, check_name
from storage.errors import StorageError
from storage.export import export_all
from storage.hub import HubSync
from storage.pairs import training_rows
from storage.votes import VoteStore
from trainer.publish import Publisher
from trainer.rounds import RoundError, Rounds
from trainer.schedule import Scheduler
from ui import figures
from ui.errors import refused

logger = logging.getLogger(__name__)

ROUND_COLUMNS = ["round", "status", "adapter", "pairs (train/held-out)", "held-out acc", "KL/token", "verdict",
                 "started", "minutes", "votes of"]
JUDGE_COLUMNS = ["who", "kind", "pairs compared", "agreement with ties", "95% CI", "without ties", "95% CI",
                 "orders disagree", "first answer when they do"]
QUALITY_COLUMNS = ["annotator", "votes", "share 'A'", "p (position bias)", "tie rate", "median s/vote",
                   "repeats", "agreement", "kappa", "flag"]
PROMPT_COLUMNS = ["id", "typed by", "prompt"]


@dataclass
class Admin:
    """What the Admin tab acts on."""

    store: VoteStore
    rounds: Rounds
    scheduler: Scheduler
    serving: Serving
    hub: HubSync
    access: Access
    exports: Path
    publisher: Publisher | None = None
    # the figures computed from every vote, and the state they were computed at (vote_figures)
    figures_cache: dict[str, Any] = field(default_factory=dict, repr=False)
    figures_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def require_admin(admin: Admin, request: Any) -> Person:
    """The admin making this request; gr.Error for anyone else (checked for every event)."""
    try:
        return admin.access.admin(request)
    except PermissionError as e:
        raise refused(str(e), title="Forbidden") from None


def _fmt(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def publish_pending(publisher: Publisher, store: VoteStore, hub: HubSync) -> list:
    """Push the votes first (the card cites the dataset revision that holds them), then publish every
    promoted round not published yet, with people's win rate against the base on its card. Used on
    promotion (app.py) and by the Admin tab's button; a failure is logged and kept for the tab."""
    hub.push()
    rows = store.votes_with_pairs()
    try:
        return publisher.publish_pending(win_rate=lambda name: win_rate_vs_base(rows, name),
                                         dataset=hub.revision_holding)
    except Exception as e:  # the round stays promoted and served; the Admin tab shows the error
        logger.error("publishing to %s failed: %s", publisher.repo, e)
        return []


# -- actions: each checks the role itself, then acts -------------------------------------------


def run_round(admin: Admin, request: Any) -> str:
    person = require_admin(admin, request)
    try:
        admin.scheduler.trigger(f"started by {person.name}")
    except RoundError as e:
        raise refused(str(e)) from None
    return "round started"


def rollback(admin: Admin, request: Any) -> str:
    require_admin(admin, request)
    return f"now serving {admin.serving.rollback()}"


def serve(admin: Admin, name: str | None, request: Any) -> str:
    person = require_admin(admin, request)
    if not name or name not in {r["adapter"] for r in admin.rounds.promoted()}:
        raise refused("pick a promoted version")
    try:
        seconds = admin.serving.serve_on_purpose(name)
    except AdapterRejected as e:
        raise refused(str(e)) from None
    return f"{person.name}: now serving {name} ({seconds:.1f} s)"


def pause(admin: Admin, request: Any) -> str:
    require_admin(admin, request)
    admin.scheduler.paused = not admin.scheduler.paused
    return "schedule paused" if admin.scheduler.paused else "schedule resumed"


def push(admin: Admin, request: Any) -> str:
    require_admin(admin, request)
    n = admin.hub.push()
    return f"pushed {n} files" if not admin.hub.status.last_error else f"push failed: {admin.hub.status.last_error}"


def publish(admin: Admin, request: Any) -> str:
    """Publish every promoted round not published yet to the model repo (--hub-model)."""
    require_admin(admin, request)
    if admin.publisher is None:
        raise refused("no model repo: start the app with --hub-model REPO and HF_TOKEN")
    done = publish_pending(admin.publisher, admin.store, admin.hub)
    if admin.publisher.last_error:
        return f"publishing failed: {admin.publisher.last_error}"
    return f"published {', '.join(p.name for p in done if p.new) or 'nothing new'} to {admin.publisher.repo}"


def set_excluded(admin: Admin, annotator: str | None, excluded: bool, request: Any) -> str:
    person = require_admin(admin, request)
    if not annotator:
        raise refused("pick an annotator")
    admin.store.set_excluded(annotator, excluded, by=person.name)
    shown = admin.store.people().get(annotator, annotator)
    return f"{shown}'s votes are {'left out of' if excluded else 'back in'} training (all kept)"


def add_person(admin: Admin, name: str | None, password: str | None, request: Any) -> str:
    """Password mode: a new user (a random password unless one is given, shown once); hf mode: a
    Hugging Face user name or ``org:NAME`` on the list of annotators."""
    person = require_admin(admin, request)
    try:
        new_password = admin.access.add_annotator(name or "", person, password or None)
    except UsersError as e:
        raise refused(str(e)) from None
    if new_password is None:
        return f"{name.strip()} may annotate now"
    return (f"{name.strip()} may log in now with the password **{new_password}** (shown once: hand it over "
            "now; only its hash is kept)") if not password else f"{name.strip()} may log in now"


def remove_person(admin: Admin, name: str | None, request: Any) -> str:
    person = require_admin(admin, request)
    try:
        admin.access.remove_annotator(name or "", person)
    except UsersError as e:
        raise refused(str(e)) from None
    return f"{name.strip()} may no longer annotate (their votes are kept)"


def set_admin_role(admin: Admin, name: str | None, on: bool, request: Any) -> str:
    person = require_admin(admin, request)
    try:
        admin.access.set_admin(name or "", on, person)
    except UsersError as e:
        raise refused(str(e)) from None
    return f"{name.strip()} is {'now' if on else 'no longer'} an admin"


def _known_account(admin: Admin, name: str | None) -> str:
    """A judge or token name: a valid name; in password mode, a user of the users file (a judge logs
    in like anyone)."""
    try:
        name = check_name(name)
    except UsersError as e:
        raise refused(str(e)) from None
    users = admin.access.users
    if admin.access.mode == "password" and users is not None and name not in users.hashes:
        raise refused(f"{name} is not a user; add them first (a judge logs in with a password like anyone)")
    return name


def set_judge(admin: Admin, name: str | None, on: bool, request: Any) -> str:
    """Mark an account as an AI judge (its votes are marked and left out of training) or unmark it."""
    person = require_admin(admin, request)
    name = _known_account(admin, name)
    if on:
        if name in admin.access.admins:
            raise refused(f"{name} is an admin; a judge is an account of its own")
        if admin.access.mode == "hf" and name in {n for k, n in admin.store.people().items() if k.startswith("hf:")}:
            raise refused(f"{name} is a Hugging Face account (its votes are stored under its account id); a judge "
                          "is an account of its own: pick another name and issue it an API token")
        admin.store.set_judge(name, True, by=person.name, trained=admin.store.judges().get(name, False))
        token = " Issue it an API token to vote with." if admin.access.mode == "hf" else ""
        return (f"{name} is a judge: its votes from now on are marked as a judge's and do not train unless you "
                f"include it.{token}")
    if name not in admin.store.judges():
        raise refused(f"{name} is not a judge")
    admin.store.set_judge(name, False, by=person.name)
    return f"{name} is no longer a judge (its past votes stay a judge's)"


def set_judge_trained(admin: Admin, name: str | None, trained: bool, request: Any) -> str:
    """Let a judge's votes train beside people's, or leave them out again (the default)."""
    person = require_admin(admin, request)
    name = (name or "").strip()
    if name not in admin.store.judges():
        raise refused(f"{name or 'that name'} is not a judge; mark it as a judge first")
    admin.store.set_judge(name, True, by=person.name, trained=trained)
    return f"{name}'s votes {'train beside people' if trained else 'are left out of training'}"


def set_bootstrap(admin: Admin, votes: float | int | str | None, request: Any) -> str:
    """Rounds train on the judges' votes until this many usable votes of people exist (0: off)."""
    require_admin(admin, request)
    try:
        n = int(float(votes or 0))
        admin.store.set_judge_bootstrap(n)
    except (ValueError, StorageError) as e:
        raise refused(f"the number of people's votes is a whole number, 0 (off) or more: {e}") from None
    if n == 0:
        return "bootstrap off: rounds train on people (and on judges you include)"
    return (f"rounds train on the judges' votes until people cast {n} usable votes "
            f"({admin.store.people_usable_votes()} so far), then on people")


def issue_token(admin: Admin, name: str | None, request: Any) -> str:
    """A new API token bound to ``name``, shown once (only its hash is kept)."""
    person = require_admin(admin, request)
    if admin.access.mode != "hf":
        raise refused("scripts and judges log in with a password here (PREFLOOP_PASSWORD); API tokens are for "
                      "Sign in with Hugging Face, where there are no passwords")
    name = _known_account(admin, name)
    if name in admin.access.admins:
        raise refused(f"{name} is an admin; a token is for a script or judge account of its own")
    token = admin.store.issue_token(name, by=person.name)
    return (f"API token for **{name}** (shown once: copy it now; only its hash is kept): `{token}`. "
            "Scripts send it in the header `X-PrefLoop-Token`; the judge reads it from PREFLOOP_TOKEN.")


def revoke_tokens(admin: Admin, name: str | None, request: Any) -> str:
    person = require_admin(admin, request)
    n = admin.store.revoke_tokens((name or "").strip(), by=person.name)
    if n == 0:
        raise refused(f"{(name or '').strip() or 'that name'} has no live token")
    return f"{n} token{'s' if n > 1 else ''} of {name.strip()} revoked: refused from the next request"


def decide(admin: Admin, promote: bool, request: Any) -> str:
    """Promote (then serve) or reject the round that waits for a decision."""
    person = require_admin(admin, request)
    waiting = admin.rounds.awaiting()
    if waiting is None:
        raise refused("no round is waiting for a decision")
    try:
        if not promote:
            admin.rounds.reject(waiting["id"], person.name)
            return f"round {waiting['id']} rejected"
        name = admin.rounds.approve(waiting["id"], person.name)
    except RoundError as e:
        raise refused(str(e)) from None
    admin.serving.sync([r["adapter"] for r in admin.rounds.promoted()])
    return f"round {waiting['id']} promoted; now serving {admin.serving.current}" if admin.serving.current == name \
        else f"round {waiting['id']} promoted, but not served: see the log"


def share_prompt(admin: Admin, prompt_id: str | int | None, request: Any) -> str:
    person = require_admin(admin, request)
    if prompt_id in (None, ""):
        raise refused("pick a typed prompt")
    if not admin.store.share_prompt(int(prompt_id), by=person.name):
        raise refused(f"prompt {prompt_id} is not a private typed prompt")
    return f"prompt {prompt_id} is in the shared pool now"


def export(admin: Admin, request: Any) -> Path:
    """The whole dataset as a zip; only the newest export is kept on disk."""
    require_admin(admin, request)
    for old in admin.exports.glob("*"):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    out = admin.exports / time.strftime("export-%Y%m%d-%H%M%S")
    export_all(admin.store, out / "dataset", salt=admin.hub.salt)
    return Path(shutil.make_archive(str(out / f"prefloop-dataset-{out.name[7:]}"), "zip", out / "dataset"))


# -- the view ------------------------------------------------------------------------------------


INLINE_FIGURES_S = 0.5  # figures that took longer than this are recomputed in the background


def _compute_figures(store: VoteStore, key: tuple, last: int) -> dict[str, Any]:
    facts = store.vote_facts()
    since = [f for f in facts if f["vote_id"] > last]
    selected, kind = training_rows(facts, store.judge_bootstrap())
    usable = {f["vote_id"] for f in selected if f["choice"] != "both_bad"}
    return {
        "key": key,
        "rates": win_rates_with_intervals(outcomes_from_votes(facts), anchor="base", samples=100),
        "people": annotator_quality(facts), "by_choice": Counter(f["choice"] for f in facts), "total": len(facts),
        "since": len(since), "usable": sum(f["vote_id"] in usable for f in since), "kind": kind,
        "judges": judge_agreement(facts),
        "plot_votes": figures.votes_over_time((f["created_at"], f["choice"]) for f in facts),
    }


def vote_figures(admin: Admin, last: int, excluded: set[str]) -> dict[str, Any]:
    """Counts, win rates, annotator quality and the votes plot, computed from every vote and kept
    until the log changes (a new or changed vote moves the largest vote id; an exclusion or a
    round changes the rest of the key): a refresh while nothing changed (every 2 s during a round)
    reads them back. Where computing them took longer than INLINE_FIGURES_S (a large log), a
    change is recomputed in the background, one pass at a time with a rest between passes, and
    the refresh shows the last figures with the vote they are as of: a refresh never waits on a
    full pass over the log.
    bench/admin_refresh.py measures both paths."""
    store = admin.store
    key = (store.max_vote_id(), tuple(sorted(excluded)), last, tuple(store.judges().items()),
           store.judge_bootstrap())
    cache = admin.figures_cache
    with admin.figures_lock:
        current = cache.get("figures")
        if current is not None and current["key"] == key:
            return current
        if current is None or cache.get("seconds", 0.0) <= INLINE_FIGURES_S:
            started = time.monotonic()
            cache["figures"] = _compute_figures(store, key, last)
            cache["seconds"] = time.monotonic() - started
            return cache["figures"]
        # One background pass at a time, and a rest after each (at least 30 s, ten times its own
        # length), so that a steady stream of votes does not keep the interpreter busy with it.
        rest = max(30.0, 10 * cache.get("seconds", 0.0))
        if not cache.get("computing") and time.monotonic() - cache.get("finished", 0.0) >= rest:
            cache["computing"] = True

            def compute() -> None:
                started = time.monotonic()
                try:
                    fresh = _compute_figures(store, key, last)
                except Exception:
                    logger.exception("the Admin tab's figures could not be computed")
                    fresh = None
                with admin.figures_lock:
                    if fresh is not None:
                        cache["figures"], cache["seconds"] = fresh, time.monotonic() - started
                    cache["computing"], cache["finished"] = False, time.monotonic()  # failures rest too

            threading.Thread(target=compute, name="admin-figures", daemon=True).start()
        return current


def view(admin: Admin, request: Any) -> dict[str, Any]:
    """Everything the tab shows, by component name (admins only)."""
    require_admin(admin, request)
    store, rounds, scheduler = admin.store, admin.rounds, admin.scheduler
    names = store.people()
    last = rounds.last_watermark()
    excluded = store.excluded_annotators()
    fig = vote_figures(admin, last, excluded)
    by_choice = fig["by_choice"]
    choice_line = ", ".join(f"{by_choice.get(c, 0)} {c.replace('_', ' ')}"
                            for c in ("left", "right", "tie", "both_bad"))
    as_of = "" if fig["key"][0] == store.max_vote_id() else f" (as of vote {fig['key'][0]}; updating)"
    lines = [
        f"**Votes:** {fig['total']} in total ({choice_line}); {fig['since']} since the "
        f"last round, {fig['usable']} of them usable for training"
        f"{' (judges: bootstrapping)' if fig['kind'] == 'judge' else ''}{as_of}",
        f"**Serving:** `{admin.serving.current}` · **Next round:** {scheduler.next_trigger()}",
        f"**Dataset:** {admin.hub.refresh_status().line()}",
        f"**Who may annotate:** {admin.access.describe()}",
    ]
    if admin.publisher is not None:
        published = [r for r in rounds.promoted() if r.get("published_revision")]
        err = f"; last error: {admin.publisher.last_error}" if admin.publisher.last_error else ""
        lines.append(f"**Model repo:** {admin.publisher.repo}: {len(published)} of {len(rounds.promoted())} "
                     f"promoted rounds published{err}")
    if excluded:
        lines.append(f"**Excluded from training:** {', '.join(sorted(names.get(k, k) for k in excluded))}")
    waiting = rounds.awaiting()
    decision = ""
    if waiting is not None:
        decision = (f"**Round {waiting['id']} passed the gate and waits for your decision:** "
                    f"{waiting['reason']}")
    job = scheduler.job
    prog, live = "", None
    if job is not None:
        steps = [r for r in job.progress if "loss" in r]
        if steps:
            r = steps[-1]
            ipo = f" (IPO term {r['ipo/loss']:.3f})" if "ipo/loss" in r else ""
            prog = (f"Round ({job.reason}): step {r['step']}/{r['max_steps']}, loss {r['loss']:.3f}{ipo}, "
                    f"accuracy {r.get('ipo/accuracy', r.get('rewards/accuracies', 0)):.2f}, "
                    f"margin/token {r.get('ipo/margin', 0):.3f}")
        else:
            prog = f"Round ({job.reason}): preparing..."
        if job.done:
            m = job.manifest or {}
            prog = f"Last round: **{m.get('status', 'failed')}** — {m.get('reason') or job.error}"
        else:
            live = ("running", job.progress)
    mans = {m["round"]: m for m in figures.manifests(rounds.manifests)}
    rows = []
    for r in reversed(rounds.all_rounds()):
        m = mans.get(r["id"], {})
        metrics = m.get("metrics") or {}
        pairs = f"{m.get('train_pairs', '?')}/{metrics.get('heldout_pairs', m.get('heldout_pairs', '?'))}" if m else ""
        rows.append([
            r["id"], r["status"], r["adapter"] or "", pairs, _fmt(figures.manifest_accuracy(m)),
            _fmt(metrics.get("kl_per_token"), 4), r["reason"] or "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"])),
            round(((r["finished_at"] or time.time()) - r["started_at"]) / 60, 1), r.get("votes_kind") or "",
        ])
    rates, people = fig["rates"], fig["people"]
    rate_rows = [[m, round(e, 3), round(lo, 3), round(hi, 3)] for m, (e, lo, hi) in sorted(rates.items())]
    q_rows = [[names.get(q.annotator, q.annotator), q.votes, round(q.left_share, 2), f"{q.left_p_value:.3g}",
               round(q.tie_rate, 2), q.median_seconds, q.repeats, _fmt(q.agreement), _fmt(q.kappa),
               "; ".join(f for f in ("always one side?" if q.position_biased else "",
                                     "excluded from training" if q.excluded else "") if f)]
              for q in people]
    steps_df = figures.round_steps(rounds.manifests, live)

    def ci(x) -> str:
        return "" if x is None else f"{x[1]:.2f}-{x[2]:.2f}"

    judge_rows = [[names.get(j.who, j.who), "judge" if j.judge else ("people" if j.who.startswith("people ")
                                                                         else "person"),
                   j.compared, _fmt(j.with_ties and j.with_ties[0]), ci(j.with_ties),
                   _fmt(j.without_ties and j.without_ties[0]), ci(j.without_ties),
                   _fmt(j.inconsistent and j.inconsistent[0]), _fmt(j.first_position and j.first_position[0])]
                  for j in fig["judges"]]
    typed = store.private_prompts()
    return {
        "summary": "\n\n".join(lines), "progress": prog, "decision": decision, "rounds": rows, "win_rates": rate_rows,
        "quality": q_rows, "timer": gr.Timer(active=scheduler.running),
        "plot_loss": steps_df[steps_df.metric == "loss"],
        "plot_accuracy": steps_df[steps_df.metric == figures.STEP_METRICS["ipo/accuracy"]],
        "plot_rounds": figures.by_round(list(mans.values())), "plot_votes": fig["plot_votes"],
        "plot_winrate": figures.win_rates(rates),
        "version": gr.Dropdown(choices=[r["adapter"] for r in rounds.promoted()]),
        "person": gr.Dropdown(choices=[(names.get(q.annotator, q.annotator), q.annotator) for q in people]),
        "decide_row": gr.Row(visible=waiting is not None),
        "typed": [[p["id"], names.get(p["owner"], p["owner"]), p["text"][:200]] for p in typed],
        "typed_pick": gr.Dropdown(choices=[(f"{p['id']}: {p['text'][:60]}", str(p["id"])) for p in typed]),
        "roster": admin.access.roster(),
        "judges": judge_rows, "judge_status": judge_status(admin),
    }


def judge_status(admin: Admin) -> str:
    """Judges, whether they train, the bootstrap, and live API tokens (never their secrets)."""
    store = admin.store
    judges = store.judges()
    parts = ["**Judges:** " + (", ".join(f"{n} ({'trained on' if t else 'not trained on'})"
                                          for n, t in judges.items()) or "none")]
    n = store.judge_bootstrap()
    if n:
        have = store.people_usable_votes()
        parts.append(f"**Bootstrap:** rounds train on judges until people cast {n} usable votes ({have} so far: "
                     f"{'judges now' if have < n else 'people now'})")
    tokens = store.tokens()
    if tokens:
        parts.append("**API tokens:** " + ", ".join(
            f"{t['name']} (by {t['created_by']}, {time.strftime('%Y-%m-%d', time.localtime(t['created_at']))}"
            f"{', used ' + time.strftime('%Y-%m-%d %H:%M', time.localtime(t['used_at'])) if t['used_at'] else ''})"
            for t in tokens))
    return "\n\n".join(parts)


# -- layout and wiring ----------------------------------------------------------------------------


def build(demo: gr.Blocks, tab: gr.Tab, admin: Admin) -> None:
    """The Admin tab's components and events, inside the current Blocks context. Dropdowns take any
    value (``allow_custom_value``): each action checks its input itself, after the role check."""
    c: dict[str, Any] = {}
    c["summary"] = gr.Markdown(elem_id="admin-summary")
    with gr.Row():
        run_btn = gr.Button("Run a round now", elem_id="run-round", variant="primary")
        rollback_btn = gr.Button("Roll back the serving adapter", elem_id="rollback")
        pause_btn = gr.Button("Pause / resume the schedule", elem_id="pause")
        push_btn = gr.Button("Push to the Hub now", elem_id="push")
        download_btn = gr.Button("Export the dataset", elem_id="export")
        publish_btn = gr.Button("Publish promoted rounds", elem_id="publish")
    c["progress"] = gr.Markdown(elem_id="round-progress")
    c["decision"] = gr.Markdown(elem_id="round-decision")
    with gr.Row(visible=False) as c["decide_row"]:
        promote_btn = gr.Button("Promote and serve it", elem_id="promote-round", variant="primary")
        reject_btn = gr.Button("Reject it", elem_id="reject-round")
    download = gr.File(label="Dataset export (zip: votes + preferences configs and a card)", visible=False,
                       elem_id="export-file")
    with gr.Row():
        c["plot_loss"] = gr.LinePlot(x="step", y="value", color="round", title="Training loss by step",
                                     elem_id="plot-loss", height=260)
        c["plot_accuracy"] = gr.LinePlot(x="step", y="value", color="round", elem_id="plot-accuracy", height=260,
                                         title="Accuracy (per-token margin > 0) by step", y_lim=[0, 1])
    with gr.Row():
        c["plot_rounds"] = gr.ScatterPlot(x="round", y="value", color="metric", elem_id="plot-rounds", height=260,
                                          title="Held-out accuracy and KL by round")
        c["plot_votes"] = gr.LinePlot(x="time", y="votes", color="choice", title="Votes over time",
                                      elem_id="plot-votes", height=260)
    c["rounds"] = gr.Dataframe(headers=ROUND_COLUMNS, interactive=False, elem_id="rounds-table", wrap=True)
    with gr.Row():
        c["version"] = gr.Dropdown(label="Promoted version", choices=[], elem_id="version", scale=2,
                                   allow_custom_value=True)
        serve_btn = gr.Button("Serve this version", elem_id="serve-version", scale=1)
    gr.Markdown("#### People's verdict: win rate against the base (arena pairs, Bradley-Terry, ties as half)")
    with gr.Row():
        c["plot_winrate"] = gr.ScatterPlot(x="version", y="win rate", color="series", elem_id="plot-winrate",
                                           title="Win rate vs base (95% bootstrap)", height=260, y_lim=[0, 1])
        c["win_rates"] = gr.Dataframe(headers=["version", "win rate vs base", "95% low", "95% high"],
                                      interactive=False, elem_id="win-rates")
    gr.Markdown("#### Annotators (agreement and kappa on pairs shown again)")
    c["quality"] = gr.Dataframe(headers=QUALITY_COLUMNS, interactive=False, elem_id="annotator-quality")
    with gr.Row():
        c["person"] = gr.Dropdown(label="Annotator", choices=[], elem_id="person", scale=2,
                                  allow_custom_value=True)
        exclude_btn = gr.Button("Exclude from training", elem_id="exclude", scale=1)
        include_btn = gr.Button("Include again", elem_id="include", scale=1)
    gr.Markdown("#### People (changes apply at once and outlive a restart)")
    c["roster"] = gr.Markdown(elem_id="roster")
    hf = admin.access.mode == "hf"
    with gr.Row():
        who = gr.Textbox(label="Hugging Face user name, or org:NAME" if hf else "Name", elem_id="people-name",
                         scale=2, max_length=80)
        secret = gr.Textbox(label="Password (empty: a random one, shown once)", type="password", visible=not hf,
                            elem_id="people-password", scale=2, max_length=200)
    with gr.Row():
        add_btn = gr.Button("Add annotator", elem_id="people-add")
        remove_btn = gr.Button("Remove annotator", elem_id="people-remove")
        make_admin_btn = gr.Button("Make admin", elem_id="people-make-admin")
        unmake_admin_btn = gr.Button("Remove admin role", elem_id="people-remove-admin")
    people_note = gr.Markdown(elem_id="people-note")
    gr.Markdown("#### AI judges against people (pairs both voted on; MT-Bench's two figures)")
    c["judges"] = gr.Dataframe(headers=JUDGE_COLUMNS, interactive=False, elem_id="judge-agreement")
    c["judge_status"] = gr.Markdown(elem_id="judge-status")
    with gr.Row():
        judge_name = gr.Textbox(label="Judge or script account", elem_id="judge-name", scale=2, max_length=80)
        bootstrap_n = gr.Number(label="Bootstrap: train on judges until people cast N votes (0: off)", precision=0,
                                minimum=0, elem_id="judge-bootstrap", scale=2)
    with gr.Row():
        judge_on_btn = gr.Button("Mark as judge", elem_id="judge-mark")
        judge_off_btn = gr.Button("Unmark judge", elem_id="judge-unmark")
        judge_train_btn = gr.Button("Train on its votes", elem_id="judge-include")
        judge_untrain_btn = gr.Button("Leave its votes out", elem_id="judge-exclude")
        bootstrap_btn = gr.Button("Set bootstrap", elem_id="judge-bootstrap-set")
        token_btn = gr.Button("Issue API token", elem_id="token-issue", visible=hf)
        revoke_btn = gr.Button("Revoke its tokens", elem_id="token-revoke", visible=hf)
    token_note = gr.Markdown(elem_id="token-note")
    gr.Markdown("#### Typed prompts (each stays with its author until you share it)")
    c["typed"] = gr.Dataframe(headers=PROMPT_COLUMNS, interactive=False, elem_id="typed-prompts", wrap=True)
    with gr.Row():
        c["typed_pick"] = gr.Dropdown(label="Typed prompt", choices=[], elem_id="typed-pick", scale=2,
                                      allow_custom_value=True)
        share_btn = gr.Button("Move into the shared pool", elem_id="share-prompt", scale=1)
    c["timer"] = gr.Timer(2.0, active=False)
    outputs = list(c.values())

    def refresh(request: gr.Request) -> dict[Any, Any]:
        return {c[k]: v for k, v in view(admin, request).items()}

    def after(message: str | None, request: gr.Request) -> dict[Any, Any]:
        if message:
            gr.Info(message)
        return refresh(request)

    def wire(event, action, inputs, name: str) -> None:
        """An event: the action (its own role check first), a notice, then the refreshed view."""
        if inputs:
            def handler(value, request: gr.Request):
                return after(action(admin, value, request), request)
        else:
            def handler(request: gr.Request):
                return after(action(admin, request), request)
        event(handler, inputs, outputs, api_name=name, api_visibility="private")

    wire(run_btn.click, run_round, None, "admin_run_round")
    wire(push_btn.click, push, None, "admin_push")
    wire(rollback_btn.click, rollback, None, "admin_rollback")
    wire(pause_btn.click, pause, None, "admin_pause")
    wire(serve_btn.click, serve, [c["version"]], "admin_serve")
    wire(exclude_btn.click, lambda a, who, r: set_excluded(a, who, True, r), [c["person"]], "admin_exclude")
    wire(include_btn.click, lambda a, who, r: set_excluded(a, who, False, r), [c["person"]], "admin_include")
    wire(promote_btn.click, lambda a, r: decide(a, True, r), None, "admin_promote")
    wire(reject_btn.click, lambda a, r: decide(a, False, r), None, "admin_reject")
    wire(share_btn.click, share_prompt, [c["typed_pick"]], "admin_share_prompt")
    wire(publish_btn.click, publish, None, "admin_publish")
    wire(remove_btn.click, remove_person, [who], "admin_remove_person")
    wire(make_admin_btn.click, lambda a, name, r: set_admin_role(a, name, True, r), [who], "admin_make_admin")
    wire(unmake_admin_btn.click, lambda a, name, r: set_admin_role(a, name, False, r), [who], "admin_remove_admin")
    wire(judge_on_btn.click, lambda a, name, r: set_judge(a, name, True, r), [judge_name], "admin_judge_mark")
    wire(judge_off_btn.click, lambda a, name, r: set_judge(a, name, False, r), [judge_name], "admin_judge_unmark")
    wire(judge_train_btn.click, lambda a, name, r: set_judge_trained(a, name, True, r), [judge_name],
         "admin_judge_include")
    wire(judge_untrain_btn.click, lambda a, name, r: set_judge_trained(a, name, False, r), [judge_name],
         "admin_judge_exclude")
    wire(bootstrap_btn.click, set_bootstrap, [bootstrap_n], "admin_judge_bootstrap")
    wire(revoke_btn.click, revoke_tokens, [judge_name], "admin_token_revoke")

    def token(name: str, request: gr.Request) -> dict[Any, Any]:
        """The token is shown under the buttons, once (a notice would vanish before it is copied)."""
        message = issue_token(admin, name, request)
        return {**refresh(request), token_note: message}

    token_btn.click(token, [judge_name], [*outputs, token_note], api_name="admin_token_issue",
                    api_visibility="private")

    def add(name: str, password: str, request: gr.Request) -> dict[Any, Any]:
        """A new password is shown under the buttons (a notice would vanish before it is copied)."""
        message = add_person(admin, name, password, request)
        return {**refresh(request), people_note: message, secret: ""}

    add_btn.click(add, [who, secret], [*outputs, people_note, secret], api_name="admin_add_person",
                  api_visibility="private")
    c["timer"].tick(refresh, None, outputs, api_name="admin_tick", api_visibility="private")
    tab.select(refresh, None, outputs, api_name="admin_refresh", api_visibility="private")

    def download_export(request: gr.Request):
        return gr.File(value=str(export(admin, request)), visible=True)

    download_btn.click(download_export, None, download, api_name="admin_export", api_visibility="private")

    def show_tab(request: gr.Request):
        return gr.Tab(visible=admin.access.is_admin(admin.access.person(request)))

    demo.load(show_tab, None, tab, api_visibility="private")
