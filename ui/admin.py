"""The Admin tab: loop health, rounds, people's verdict, annotator quality, and the buttons that
steer them. Every event re-checks the admin role on the server; the tab being hidden is only a
convenience."""

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from collector.quality import annotator_quality, outcomes_from_votes, win_rates_with_intervals
from collector.serving import AdapterRejected, Serving
from storage.export import export_all
from storage.hub import HubSync
from storage.votes import VoteStore
from trainer.rounds import RoundError, Rounds
from trainer.schedule import Scheduler
from ui import figures

Identity = Callable[[gr.Request], str | None]

ROUND_COLUMNS = ["round", "status", "adapter", "pairs (train/held-out)", "held-out acc", "KL/token", "verdict",
                 "started", "minutes"]
QUALITY_COLUMNS = ["annotator", "votes", "share 'A'", "p (position bias)", "tie rate", "median s/vote",
                   "repeats", "agreement", "kappa", "flag"]


def _fmt(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


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
        download_btn = gr.Button("Export the dataset", elem_id="export")
    progress = gr.Markdown(elem_id="round-progress")
    download = gr.File(label="Dataset export (zip: votes + preferences configs and a card)", visible=False,
                       elem_id="export-file")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="round", title="Training loss by step",
                                elem_id="plot-loss", height=260)
        acc_plot = gr.LinePlot(x="step", y="value", color="round", title="Accuracy (per-token margin > 0) by step",
                               elem_id="plot-accuracy", height=260, y_lim=[0, 1])
    with gr.Row():
        round_plot = gr.ScatterPlot(x="round", y="value", color="metric", title="Held-out accuracy and KL by round",
                                 elem_id="plot-rounds", height=260)
        votes_plot = gr.LinePlot(x="time", y="votes", color="choice", title="Votes over time",
                                 elem_id="plot-votes", height=260)
    table = gr.Dataframe(headers=ROUND_COLUMNS, interactive=False, elem_id="rounds-table", wrap=True)
    with gr.Row():
        version = gr.Dropdown(label="Promoted version", choices=[], elem_id="version", scale=2)
        serve_btn = gr.Button("Serve this version", elem_id="serve-version", scale=1)
    gr.Markdown("#### People's verdict: win rate against the base (arena pairs, Bradley-Terry, ties as half)")
    with gr.Row():
        win_plot = gr.ScatterPlot(x="version", y="win rate", color="series", title="Win rate vs base (95% bootstrap)",
                                elem_id="plot-winrate", height=260, y_lim=[0, 1])
        winrates = gr.Dataframe(headers=["version", "win rate vs base", "95% low", "95% high"], interactive=False,
                                elem_id="win-rates")
    gr.Markdown("#### Annotators (agreement and kappa on pairs shown again)")
    quality = gr.Dataframe(headers=QUALITY_COLUMNS, interactive=False, elem_id="annotator-quality")
    with gr.Row():
        person = gr.Dropdown(label="Annotator", choices=[], elem_id="person", scale=2)
        exclude_btn = gr.Button("Exclude from training", elem_id="exclude", scale=1)
        include_btn = gr.Button("Include again", elem_id="include", scale=1)
    timer = gr.Timer(2.0, active=False)

    def refresh(request: gr.Request):
        require_admin(request)
        last = rounds.last_watermark()
        by_choice = store.counts_by_choice()
        choice_line = ", ".join(f"{by_choice.get(c, 0)} {c.replace('_', ' ')}"
                                for c in ("left", "right", "tie", "both_bad"))
        lines = [
            f"**Votes:** {store.count_votes()} in total ({choice_line}); {store.count_votes(last)} since the "
            f"last round, {store.count_votes(last, usable_only=True)} of them usable for training",
            f"**Serving:** `{serving.current}` · **Next round:** {scheduler.next_trigger()}",
            f"**Dataset:** {hub.refresh_status().line()}",
        ]
        excluded = store.excluded_annotators()
        if excluded:
            lines.append(f"**Excluded from training:** {', '.join(sorted(excluded))}")
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
            pairs = f"{m['train_pairs']}/{metrics.get('heldout_pairs', m.get('heldout_pairs'))}" if m else ""
            rows.append([
                r["id"], r["status"], r["adapter"] or "", pairs, _fmt(figures.manifest_accuracy(m)),
                _fmt(metrics.get("kl_per_token"), 4), r["reason"] or "",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"])),
                round(((r["finished_at"] or time.time()) - r["started_at"]) / 60, 1),
            ])
        votes = store.votes_with_pairs()
        rates = win_rates_with_intervals(outcomes_from_votes(votes), anchor="base", samples=100)
        rate_rows = [[m, round(e, 3), round(lo, 3), round(hi, 3)] for m, (e, lo, hi) in sorted(rates.items())]
        people = annotator_quality(votes)
        q_rows = [[q.annotator, q.votes, round(q.left_share, 2), f"{q.left_p_value:.3g}", round(q.tie_rate, 2),
                   q.median_seconds, q.repeats, _fmt(q.agreement), _fmt(q.kappa),
                   "; ".join(f for f in ("always one side?" if q.position_biased else "",
                                         "excluded from training" if q.excluded else "") if f)]
                  for q in people]
        steps_df = figures.round_steps(rounds.manifests, live)
        promoted = [r["adapter"] for r in rounds.promoted()]
        return [
            "\n\n".join(lines), prog, rows, rate_rows, q_rows, gr.Timer(active=scheduler.running),
            steps_df[steps_df.metric == "loss"], steps_df[steps_df.metric == figures.STEP_METRICS["ipo/accuracy"]],
            figures.by_round(list(mans.values())), figures.votes_over_time(store.vote_times()),
            figures.win_rates(rates),
            gr.Dropdown(choices=promoted), gr.Dropdown(choices=[q.annotator for q in people]),
        ]

    outputs = [summary, progress, table, winrates, quality, timer, loss_plot, acc_plot, round_plot, votes_plot,
               win_plot, version, person]

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

    def serve(name: str | None, request: gr.Request):
        user = require_admin(request)
        if not name or name not in {r["adapter"] for r in rounds.promoted()}:
            raise gr.Error("pick a promoted version")
        store.set_setting(f"rolled_back:{name}", "")  # served on purpose: the schedule may keep it
        try:
            seconds = serving.swap(name)
        except AdapterRejected as e:
            raise gr.Error(str(e)) from None
        gr.Info(f"{user}: now serving {name} ({seconds:.1f} s)")
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

    def set_excluded(excluded: bool):
        def handler(annotator: str | None, request: gr.Request):
            user = require_admin(request)
            if not annotator:
                raise gr.Error("pick an annotator")
            store.set_excluded(annotator, excluded, by=user)
            gr.Info(f"{annotator}'s votes are {'left out of' if excluded else 'back in'} training (all kept)")
            return refresh(request)

        return handler

    def export(request: gr.Request):
        require_admin(request)
        exports = rounds.data_dir / "exports"
        for old in exports.glob("*"):  # only the newest export is kept (Gradio serves its own copy)
            shutil.rmtree(old, ignore_errors=True)
        exports.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="export-", dir=exports))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        export_all(store, out / "dataset", salt=hub.salt)
        archive = shutil.make_archive(str(out / f"prefloop-dataset-{stamp}"), "zip", out / "dataset")
        return gr.File(value=archive, visible=True)

    for event, fn, inputs, name in (
        (run_btn.click, run_now, None, "admin_run_round"), (push_btn.click, push, None, "admin_push"),
        (rollback_btn.click, rollback, None, "admin_rollback"), (pause_btn.click, pause, None, "admin_pause"),
        (timer.tick, refresh, None, "admin_tick"), (tab.select, refresh, None, "admin_refresh"),
        (serve_btn.click, serve, [version], "admin_serve"),
        (exclude_btn.click, set_excluded(True), [person], "admin_exclude"),
        (include_btn.click, set_excluded(False), [person], "admin_include"),
    ):
        event(fn, inputs, outputs, api_name=name, api_visibility="private")
    download_btn.click(export, None, download, api_name="admin_export", api_visibility="private")

    def show_tab(request: gr.Request):
        user = who(request)
        return gr.Tab(visible=bool(user and user in admins))

    demo.load(show_tab, None, tab, api_visibility="private")

