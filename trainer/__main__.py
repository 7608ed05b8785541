"""Alignment rounds from the command line.

    python -m trainer round --data-dir data                    # iterative IPO on the votes since the last round
    python -m trainer round --init fresh --beta 0.2 --epochs 3 # a new adapter from the base on all votes
    python -m trainer round --quantize 4bit                    # QLoRA (CUDA)
    python -m trainer status [--json]
    python -m trainer rollback                                 # the running app serves the previous version
    python -m trainer publish --hub-model me/prefloop-adapters # promoted rounds -> a Hub model repo (HF_TOKEN)
    python -m trainer from-dataset trl-lib/ultrafeedback_binarized --loss sigmoid

A promoted round is picked up and hot-swapped by the running app within seconds.
Exit codes: 0 promoted (or done), 1 rejected or failed, 2 bad input or another round running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from storage.errors import UserError
from storage.flags import add_flags, from_flags, parse
from storage.serving import ServingLog
from storage.votes import VoteStore
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, RoundError, Rounds


def _round_args(p: argparse.ArgumentParser) -> None:
    """Every round and training setting, from the config dataclasses (storage/flags.py)."""
    add_flags(p, RoundConfig, exclude=("promote",))  # a round from the shell is promoted by its gate
    add_flags(p, TrainConfig)
    p.add_argument("--model", default=None, help="base model (default: the one the app serves)")


def _config(args: argparse.Namespace) -> RoundConfig:
    return from_flags(RoundConfig, args, train=from_flags(TrainConfig, args))


def _run_round(args, store: VoteStore, rounds: Rounds, seeds=None) -> int:
    from tqdm.auto import tqdm

    bar = tqdm(desc="IPO round" if args.loss == "ipo" else "DPO round", unit="step")

    def progress(row: dict) -> None:
        if "loss" in row:
            bar.total = row.get("max_steps") or bar.total
            bar.n = row["step"]
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('rewards/accuracies', 0):.2f}")
            bar.refresh()

    try:
        manifest = rounds.run(_config(args), on_progress=progress, seed_pairs=seeds)
    finally:
        bar.close()
    print(f"round {manifest['round']}: {manifest['status']} — {manifest['reason']}")
    if manifest["status"] == "promoted":
        print(f"adapter {manifest['adapter']} promoted; a running app hot-swaps it within seconds")
        return 0
    return 1


def _status(store: VoteStore, rounds: Rounds, as_json: bool) -> int:
    rows = rounds.all_rounds()
    info = {"serving": ServingLog(store).current(), "votes": store.count_votes(),
            "votes_since_last_round": store.count_votes(rounds.last_watermark()), "rounds": rows}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"serving: {info['serving']} · votes: {info['votes']} "
          f"({info['votes_since_last_round']} since the last round)")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"]))
        reason = (r["reason"] or "").splitlines()[0][:70] if r["reason"] else ""
        print(f"  round {r['id']:>4}  {r['status']:<9} {r['adapter'] or '-':<11} votes<= {r['watermark']:<6} "
              f"{when}  {reason}")
    return 0


def _publish(args, store: VoteStore, rounds: Rounds) -> int:
    """Publish every promoted round not published yet, as the app does on promotion."""
    from huggingface_hub import HfApi

    from collector.quality import win_rate_vs_base  # the card's win rate, as the app computes it
    from storage.hub import HubSync
    from trainer.publish import Publisher

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RoundError("set HF_TOKEN to a token with write access to the model repo")
    publisher = Publisher(rounds.log, args.data_dir, args.hub_model, HfApi(token=token))
    hub = HubSync(store, args.data_dir / "hub", args.hub_dataset, None)  # reads where the votes were pushed
    rows = store.votes_with_pairs()
    done = publisher.publish_pending(win_rate=lambda name: win_rate_vs_base(rows, name),
                                     dataset=hub.revision_holding)
    for p in done:
        print(f"{p.name}: {'published' if p.new else 'already published'} at {p.repo}@{p.revision}")
    if not done:
        print("every promoted round is published already")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    help_dir = "the app's data dir (default: $PREFLOOP_DATA_DIR or ./data)"
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("PREFLOOP_DATA_DIR", "data")), help=help_dir)
    # --data-dir is accepted before or after the command: `python -m trainer round --data-dir D`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=help_dir)
    sub = p.add_subparsers(dest="command", required=True)
    _round_args(sub.add_parser("round", help="run one round now", parents=[common]))
    st = sub.add_parser("status", help="rounds, serving adapter, votes", parents=[common])
    st.add_argument("--json", action="store_true")
    sub.add_parser("rollback", help="ask the running app to serve the previous version", parents=[common])
    pb = sub.add_parser("publish", help="publish promoted rounds to a Hub model repo (HF_TOKEN)", parents=[common])
    pb.add_argument("--hub-model", default=os.environ.get("PREFLOOP_HUB_MODEL"), required="PREFLOOP_HUB_MODEL"
                    not in os.environ, help="the model repo, e.g. me/prefloop-adapters (env PREFLOOP_HUB_MODEL)")
    pb.add_argument("--hub-dataset", default=os.environ.get("PREFLOOP_HUB_DATASET"),
                    help="the dataset repo the votes are pushed to, cited on each card (env PREFLOOP_HUB_DATASET)")
    fd = sub.add_parser("from-dataset", help="a warm-start round on an existing preference dataset",
                        parents=[common])
    fd.add_argument("source", help="parquet/json(l) file, a PrefLoop export, or a Hub dataset id")
    fd.add_argument("--split", default="train")
    _round_args(fd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse(parser(), argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        store = VoteStore(args.data_dir / "votes.db")
        if args.command == "rollback":
            ServingLog(store).request_rollback()
            print(f"rollback requested: the running app leaves {ServingLog(store).current()} within seconds")
            return 0
        model = getattr(args, "model", None) or ServingLog(store).base_model()
        if model is None:
            from collector.models import resolve_model

            model = resolve_model(None, args.data_dir)
        rounds = Rounds(store, args.data_dir, model)
        if args.command == "publish":
            return _publish(args, store, rounds)
        if args.command == "status":
            rounds.cleanup()
            return _status(store, rounds, args.json)
        if args.command == "round":
            return _run_round(args, store, rounds)
        from storage.importer import import_pairs, seed_pairs

        n = import_pairs(store, args.source, args.split)
        print(f"{n} new seed pairs from {args.source}")
        return _run_round(args, store, rounds, seeds=seed_pairs(store, args.source))
    except (UserError, ValueError) as e:
        print(f"prefloop trainer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
