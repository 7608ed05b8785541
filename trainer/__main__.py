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
import shlex
import sys
import time
from pathlib import Path

from storage.errors import StorageError
from storage.votes import VoteStore
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, RoundError, Rounds


def _round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", choices=["previous", "fresh"], default="previous",
                   help="previous: continue the serving adapter on new votes; fresh: new adapter on all votes")
    p.add_argument("--loss", choices=["ipo", "sigmoid"], default="ipo", help="ipo, or sigmoid for DPO")
    p.add_argument("--beta", type=float, default=TrainConfig.beta)
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate,
                   help="learning rate of a round from the base (the first, or --init fresh)")
    p.add_argument("--continue-learning-rate", type=float, default=RoundConfig.continue_learning_rate,
                   help="learning rate of a round that continues the serving adapter (README, 'A round, in brief')")
    p.add_argument("--sft-weight", type=float, default=TrainConfig.sft_weight,
                   help="weight of the chosen answers' NLL added to the preference loss (README, 'A round, in brief')")
    p.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    p.add_argument("--lora-r", type=int, default=TrainConfig.lora_r)
    p.add_argument("--lora-alpha", type=int, default=TrainConfig.lora_alpha)
    p.add_argument("--quantize", choices=["4bit"], default=None, help="QLoRA with bitsandbytes nf4")
    p.add_argument("--min-pairs", type=int, default=RoundConfig.min_pairs)
    p.add_argument("--heldout-fraction", type=float, default=RoundConfig.heldout_fraction)
    p.add_argument("--min-heldout-accuracy", type=float, default=RoundConfig.min_heldout_accuracy,
                   help="gate: refuse when the held-out votes show accuracy below this floor")
    p.add_argument("--heldout-confidence", type=float, default=RoundConfig.heldout_confidence,
                   help="gate: the confidence with which they must show it (one-sided bound)")
    p.add_argument("--model", default=None, help="base model (default: the one the app serves)")
    p.add_argument("--launcher", default=os.environ.get("PREFLOOP_TRAINER_LAUNCHER", ""),
                   help='run training under a launcher, e.g. "accelerate launch --num_processes 4" for 4 GPUs '
                   "(env PREFLOOP_TRAINER_LAUNCHER)")


def _config(args: argparse.Namespace) -> RoundConfig:
    train = TrainConfig(loss=args.loss, beta=args.beta, learning_rate=args.learning_rate, epochs=args.epochs,
                        sft_weight=args.sft_weight, max_steps=args.max_steps, batch_size=args.batch_size,
                        max_length=args.max_length, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        quantize=args.quantize)
    return RoundConfig(init=args.init, continue_learning_rate=args.continue_learning_rate,
                       min_pairs=args.min_pairs, heldout_fraction=args.heldout_fraction,
                       min_heldout_accuracy=args.min_heldout_accuracy,
                       heldout_confidence=args.heldout_confidence, launcher=shlex.split(args.launcher),
                       train=train)


def _serving(store: VoteStore) -> str | None:
    history = json.loads(store.get_setting("serving_history", "[]"))
    return history[-1] if history else None


def _run_round(args, store: VoteStore, rounds: Rounds, seeds=None) -> int:
    from tqdm.auto import tqdm

    bar = tqdm(desc="IPO round" if args.loss == "ipo" else "DPO round", unit="step")

    def progress(row: dict) -> None:
        if "loss" in row:
            bar.total = row.get("max_steps") or bar.total
            bar.n = row["step"]
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('rewards/accuracies', 0):.2f}")
            bar.refresh()

    serving = _serving(store)
    init = str(rounds.adapters / serving) if serving and args.init == "previous" else None
    try:
        manifest = rounds.run(_config(args), on_progress=progress, init_adapter=init, seed_pairs=seeds)
    finally:
        bar.close()
    print(f"round {manifest['round']}: {manifest['status']} — {manifest['reason']}")
    if manifest["status"] == "promoted":
        print(f"adapter {manifest['adapter']} promoted; a running app hot-swaps it within seconds")
        return 0
    return 1


def _status(store: VoteStore, rounds: Rounds, as_json: bool) -> int:
    rows = rounds.all_rounds()
    info = {"serving": _serving(store) or "base", "votes": store.count_votes(),
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


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        store = VoteStore(args.data_dir / "votes.db")
        if args.command == "rollback":
            store.set_setting("rollback_request", "1")
            print(f"rollback requested: the running app leaves {_serving(store) or 'base'} within seconds")
            return 0
        model = getattr(args, "model", None) or store.get_setting("base_model")
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
    except (RoundError, StorageError, ValueError) as e:
        print(f"prefloop trainer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
