"""The Admin tab: loop health, rounds, and the buttons that steer them. Every event re-checks
the admin role on the server; the tab being hidden is only a convenience."""

import time
from collections.abc import Callable

import gradio as gr

from collector.quality import annotator_quality, outcomes_from_votes, win_rates_with_intervals
from collector.serving import Serving
from storage.hub import HubSync
from storage.votes import VoteStore
from trainer.rounds import RoundError, Rounds
from trainer.schedule import Scheduler

Identity = Callable[[gr.Request], str | None]

ROUND_COLUMNS = ["round", "status", "adapter", "watermark", "reason", "started", "minutes"]


def build(demo: gr.Blocks, tab: gr.Tab, store: VoteStore, rounds: Rounds, scheduler: Scheduler,
          serving: Serving, hub: HubSync, who: Identity, admins: set[str]) -> None:
    def require_admin(request: gr.Request) -> str:
        user = who(request)
        if not user or user not in admins:
            raise gr.Error("admins only", title="Forbidden")
        return user

    summary = gr.Markdown(elem_id="admin-summary")
    with gr.Row():
        run_btn = gr.Button("Run a round now", elem_id="run-round", variant="primary")
        rollback_btn = gr.Button("Roll back the serving adapter", elem_id="rollback")
        pause_btn = gr.Button("Pause / resume the schedule", elem_id="pause")
        push_btn = gr.Button("Push to the Hub now", elem_id="push")
    progress = gr.Markdown(elem_id="round-progress")
    table = gr.Dataframe(headers=ROUND_COLUMNS, interactive=False, elem_id="rounds-table", wrap=True)
    gr.Markdown("#### People's verdict: win rate against the base (arena pairs, Bradley-Terry, ties as half)")
    winrates = gr.Dataframe(headers=["version", "win rate vs base", "95% low", "95% high"], interactive=False,
                            elem_id="win-rates")
    gr.Markdown("#### Annotators")
    quality = gr.Dataframe(headers=["annotator", "votes", "share 'A'", "p (position bias)", "tie rate",
                                    "median s/vote", "flag"], interactive=False, elem_id="annotator-quality")
    timer = gr.Timer(2.0, active=False)

    def refresh(request: gr.Request):
        require_admin(request)
        last = rounds.last_watermark()
        lines = [
            f"**Votes:** {store.count_votes()} in total, {store.count_votes(last)} since the last round",
            f"**Serving:** `{serving.current}` · **Next round:** {scheduler.next_trigger()}",
            f"**Dataset:** {hub.refresh_status().line()}",
        ]
        job = scheduler.job
        prog = ""
        if job is not None:
            steps = [r for r in job.progress if "loss" in r]
            if steps:
                r = steps[-1]
                prog = (f"Round ({job.reason}): step {r['step']}/{r['max_steps']}, loss {r['loss']:.3f}, "
                        f"rewards/accuracies {r.get('rewards/accuracies', 0):.2f}")
            else:
                prog = f"Round ({job.reason}): preparing..."
            if job.done:
                m = job.manifest or {}
                prog = f"Last round: **{m.get('status', 'failed')}** — {m.get('reason') or job.error}"
        rows = [
            [r["id"], r["status"], r["adapter"] or "", r["watermark"], r["reason"] or "",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"])),
             round(((r["finished_at"] or time.time()) - r["started_at"]) / 60, 1)]
            for r in reversed(rounds.all_rounds())
        ]
        votes = store.votes_with_pairs()
        rates = win_rates_with_intervals(outcomes_from_votes(votes), anchor="base", samples=100)
        rate_rows = [[m, round(e, 3), round(lo, 3), round(hi, 3)] for m, (e, lo, hi) in sorted(rates.items())]
        q_rows = [[q.annotator, q.votes, round(q.left_share, 2), f"{q.left_p_value:.3g}", round(q.tie_rate, 2),
                   q.median_seconds, "always one side?" if q.position_biased else ""]
                  for q in annotator_quality(votes)]
        return "\n\n".join(lines), prog, rows, rate_rows, q_rows, gr.Timer(active=scheduler.running)

    outputs = [summary, progress, table, winrates, quality, timer]

    def run_now(request: gr.Request):
        user = require_admin(request)
        try:
            scheduler.trigger(f"started by {user}")
        except RoundError as e:
            raise gr.Error(str(e)) from None
        return refresh(request)

    def rollback(request: gr.Request):
        require_admin(request)
        name = serving.rollback()
        gr.Info(f"now serving {name}")
        return refresh(request)

    def pause(request: gr.Request):
        require_admin(request)
        scheduler.paused = not scheduler.paused
        return refresh(request)

    def push(request: gr.Request):
        require_admin(request)
        n = hub.push()
        gr.Info(f"pushed {n} files" if not hub.status.last_error else f"push failed: {hub.status.last_error}")
        return refresh(request)

    for event, fn, name in ((run_btn.click, run_now, "admin_run_round"), (push_btn.click, push, "admin_push"),
                            (rollback_btn.click, rollback, "admin_rollback"), (pause_btn.click, pause, "admin_pause"),
                            (timer.tick, refresh, "admin_tick"), (tab.select, refresh, "admin_refresh")):
        event(fn, None, outputs, api_name=name, api_visibility="private")

    def show_tab(request: gr.Request):
        user = who(request)
        return gr.Tab(visible=bool(user and user in admins))

    demo.load(show_tab, None, tab, api_visibility="private")
