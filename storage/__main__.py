"""Storage commands.

    python -m storage export --data-dir data --out export/      # a dataset folder (2 configs + card)
    python -m storage import trl-lib/ultrafeedback_binarized    # seed pairs for a warm start
    python -m storage import prefs.jsonl --data-dir data
    python -m storage push --data-dir data --hub-dataset me/prefs   # push staged segments now (HF_TOKEN)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from storage.errors import StorageError, UserError
from storage.export import export_all
from storage.importer import import_pairs
from storage.pairs import HELDOUT_FRACTION
from storage.votes import VoteStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storage", description="PrefLoop vote storage")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the votes as a Hugging Face dataset folder")
    e.add_argument("--out", type=Path, required=True, help="new folder to write")
    e.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION,
                   help="share of prompts in the test split: the rounds' held-out slice (default: %(default)s)")
    i = sub.add_parser("import", help="load a preference dataset as seed pairs")
    i.add_argument("source", help="a parquet/json(l) file, a PrefLoop export folder, or a Hub dataset id")
    i.add_argument("--split", default="train")
    h = sub.add_parser("push", help="stage and push new votes to the Hub dataset now")
    h.add_argument("--hub-dataset", required=True, help="dataset repo id, e.g. me/prefloop-votes")
    for s in (e, i, h):
        s.add_argument("--data-dir", type=Path, default=Path(os.environ.get("PREFLOOP_DATA_DIR", "data")))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        store = VoteStore(args.data_dir / "votes.db")
        if args.command == "export":
            counts = export_all(store, args.out, store.annotator_salt(), heldout_fraction=args.heldout_fraction)
            print(f"wrote {args.out}: {counts['votes']} votes, {counts['train']} training pairs, "
                  f"{counts['test']} held-out pairs")
        elif args.command == "import":
            n = import_pairs(store, args.source, args.split)
            print(f"imported {n} new seed pairs from {args.source}")
        else:
            from huggingface_hub import HfApi

            from storage.hub import HubSync

            token = os.environ.get("HF_TOKEN")
            if not token:
                raise StorageError("set HF_TOKEN to push to the Hub")
            hub = HubSync(store, args.data_dir / "hub", args.hub_dataset, HfApi(token=token),
                          salt=store.annotator_salt())
            n = hub.push()
            print(hub.status.line() if n or not hub.status.last_error else f"push failed: {hub.status.last_error}")
            return 0 if not hub.status.last_error else 1
    except (UserError, FileExistsError) as err:
        print(f"prefloop storage: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
