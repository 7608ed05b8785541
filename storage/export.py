"""Votes -> a Hugging Face dataset folder with two configs.

- ``votes``: the log, one row per vote with its provenance (models, seed, sampling params,
  latency, why each answer ended), the annotator's reason and guideline version, whether an AI
  judge cast it, and whether the vote was superseded by a change or its author excluded when the
  row was written. Append-only segments named ``<boot id>-<sequence>.v3.parquet``: each app
  start (boot) writes its own, so replicas never collide; readers dedupe on ``pair_id`` keeping
  the newest vote (``vote_id`` is unique only within one app's database).
- ``preferences``: exactly the pairs PrefLoop's rounds train on (storage.pairs decides), in
  TRL's conversational format (``prompt``, ``chosen``, ``rejected``) with the cut flags, and the
  held-out slice the gate scores as the ``test`` split. It is derived from the log, so it is a
  snapshot: one file per split and replica, replaced by a new one when the log changes.

``SCHEMA`` is the version of the ``votes`` columns; ``upgrade_votes`` brings a segment written
under an older one to the current columns (at their "unknown" values), so that ``load_dataset``
reads old and new segments as one table.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from storage.pairs import HELDOUT_FRACTION, build_pairs
from storage.votes import VoteStore

CONFIGS = ("votes", "preferences")
SPLITS = ("train", "test")
SCHEMA = 3
SEGMENT_SUFFIX = f".v{SCHEMA}.parquet"
# columns added by each schema version, with the value a row written before it gets
ADDED = {2: {"finish_left": "", "finish_right": "", "reason": "", "guideline": "", "superseded": False,
             "excluded": False},
         3: {"judge": False}}


def annotator_id(name: str, salt: str) -> str:
    """Annotators appear in the dataset only as a salted hash."""
    return hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()[:16]


def vote_rows(rows: list[dict[str, Any]], salt: str) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        out.append({
            "vote_id": r["vote_id"],
            "pair_id": r["pair_id"],
            "created_at": r["created_at"],
            "annotator": annotator_id(r["annotator"], salt),
            "prompt": r["messages"],
            "answer_left": r["answer_left"],
            "answer_right": r["answer_right"],
            "model_left": r["model_left"],
            "model_right": r["model_right"],
            "choice": r["choice"],
            "seed": r["seed"],
            "sampling_params": json.dumps(r["params"], sort_keys=True),
            "latency_ms": r["latency_ms"],
            "repeat_of": r.get("repeat_of") or "",  # a pair shown again to measure agreement
            "finish_left": r.get("finish_left") or "",  # "stop", "length" (cut at max_tokens), "" unknown
            "finish_right": r.get("finish_right") or "",
            "reason": r.get("reason") or "",
            "guideline": r.get("guideline") or "",
            "superseded": r.get("superseded_by") is not None,
            "excluded": bool(r.get("excluded")),
            "judge": bool(r.get("judge")),  # an AI judge's vote (trained only where an admin includes it)
        })
    return out


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "chosen_cut", "rejected_cut", "vote_id", "pair_id",
                      "choice", "chosen_model", "rejected_model")


def preference_features():
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    return Features({"prompt": message, "chosen": message, "rejected": message, "chosen_cut": Value("bool"),
                     "rejected_cut": Value("bool"), "vote_id": Value("int64"), "pair_id": Value("string"),
                     "choice": Value("string"), "chosen_model": Value("string"),
                     "rejected_model": Value("string")})


def preference_splits(rows: list[dict[str, Any]], heldout_fraction: float = HELDOUT_FRACTION,
                      bootstrap_until: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The current votes (oldest first) -> {"train": pairs, "test": held-out pairs}, as trained."""
    train, test = build_pairs(rows, heldout_fraction, bootstrap_until)
    return {split: [{k: p[k] for k in PREFERENCE_COLUMNS} for p in pairs]
            for split, pairs in (("train", train), ("test", test))}


def write_parquet(rows: list[dict[str, Any]], path: Path, features=None) -> None:
    """Write atomically (temporary file, fsync, rename); refuse to replace an existing file."""
    from datasets import Dataset

    if path.exists():
        raise FileExistsError(f"{path} exists; segments are immutable")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Dataset.from_list(rows, features=features).to_parquet(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_votes(store: VoteStore, out: Path, name: str, after: int, upto: int, salt: str) -> int:
    """Votes ``after < id <= upto`` (superseded ones too: the log) as one segment; returns rows."""
    rows = vote_rows(store.votes_with_pairs(after, upto, superseded=True), salt)
    if rows:
        write_parquet(rows, Path(out) / "votes" / f"{name}{SEGMENT_SUFFIX}")
    return len(rows)


def export_preferences(store: VoteStore, out: Path, name: str, heldout_fraction: float = HELDOUT_FRACTION
                       ) -> dict[str, Any]:
    """The preferences snapshot as ``preferences/<split>/<name>-<content hash>.parquet``, a split
    only when it has pairs (datasets refuses a split with no rows), named by what it holds, so
    that the same snapshot pushed twice is one file and a new one never overwrites the last.
    Returns pairs per split and the files written (relative to ``out``)."""
    splits = preference_splits(store.votes_with_pairs(), heldout_fraction, store.judge_bootstrap())
    files = []
    for split, rows in splits.items():
        folder = Path(out) / "preferences" / split
        for older in folder.glob(f"{name}-*.parquet"):  # a snapshot not pushed yet is replaced by this one
            older.unlink()
        if rows:
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]
            write_parquet(rows, folder / f"{name}-{digest}.parquet", preference_features())
            files.append(f"preferences/{split}/{name}-{digest}.parquet")
    return {**{split: len(rows) for split, rows in splits.items()}, "files": files}


def upgrade_votes(table):
    """A ``votes`` segment (a pyarrow Table) written under an older schema -> the current columns,
    the added ones at their "unknown" values."""
    import pyarrow as pa

    for version in sorted(ADDED):
        for column, default in ADDED[version].items():
            if column not in table.column_names:
                table = table.append_column(column, pa.array([default] * table.num_rows,
                                                             pa.bool_() if isinstance(default, bool) else pa.string()))
    return table


CARD = """---
license: other
task_categories:
- text-generation
tags:
- preference
- dpo
- ipo
- prefloop
configs:
- config_name: preferences
  data_files:
{splits}  default: true
- config_name: votes
  data_files: votes/*.parquet
---

# {title}

Human preference votes collected with PrefLoop: annotators were shown two answers to the same
prompt, sampled by vLLM from the model serving at the time (the base model or a LoRA adapter from
an earlier IPO round), and picked the better one, a tie, or "both are bad".

## Configs

- `preferences` (default): exactly the pairs PrefLoop's rounds train on: `prompt` (list of chat
  messages), `chosen` and `rejected` (one assistant message each), `chosen_cut` / `rejected_cut`
  (the answer was cut at the token limit: train it without the turn end), `vote_id`, `pair_id`,
  `choice`, `chosen_model`, `rejected_model`. A tie is two rows (both orderings); both-bad votes,
  repeats, votes of people an admin excluded and an AI judge's votes (unless an admin included
  that judge, or rounds bootstrap on judges until enough people voted) are not here. The `test` split is the held-out
  slice of prompts the rounds' gate scores (never trained on), listed once a held-out prompt has a
  vote. TRL's `DPOTrainer` reads it as is:
  `load_dataset(REPO, "preferences", split="train")`. Rewritten whole when the votes change.
- `votes`: the log, one row per vote: `vote_id`, `pair_id`, `created_at` (Unix seconds),
  `annotator` (salted hash), `prompt`, `answer_left`, `answer_right`, `model_left`, `model_right`,
  `choice` (`left` | `right` | `tie` | `both_bad`), `seed`, `sampling_params` (JSON),
  `latency_ms`, `repeat_of` (the `pair_id` of the original when a pair was shown again to measure
  agreement), `finish_left` / `finish_right` (`stop`, `length` = cut, empty = not recorded),
  `reason` (the annotator's, optional; a judge's short reason), `guideline` (the version shown),
  `superseded` and `excluded` (as known when the row was written; see Files), `judge` (an AI
  judge cast it, through the same API as people).

## Guidelines

What annotators were told "better" means is in `guidelines/<version>.md`, one file per version
(the text's hash), never changed once written.
{guidelines}
## Files

`votes` segments are immutable parquet files named `<boot id>-<sequence>.v3.parquet`; each app start
writes its own, so several replicas never collide. An annotator may change a vote until a round
takes it: the change is a new row. Deduplicate on `pair_id` keeping the newest `created_at` for
the current votes (`vote_id` is unique only within one replica). `preferences` holds one file per
split and replica, replaced as the votes change.
{counts}"""


def write_guidelines(out: Path, guidelines: list[dict]) -> list[Path]:
    """Each version of the guidelines as ``guidelines/<version>.md`` (the store's ``guidelines()``)."""
    paths = []
    for g in guidelines:
        path = Path(out) / "guidelines" / f"{g['version']}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(g["text"].rstrip() + "\n")
        paths.append(path)
    return paths


def write_card(out: Path, title: str, counts: dict[str, int] | None = None,
               guidelines: list[dict] | None = None, splits: tuple[str, ...] = ("train",)) -> Path:
    """The dataset card; ``splits``: the preferences splits that have files (a split listed
    without any makes ``load_dataset`` fail)."""
    listed = "".join(
        f"- `{g['version']}` (from {time.strftime('%Y-%m-%d', time.gmtime(g['created_at']))}): "
        f"{g['votes']} votes\n" for g in guidelines or [])
    listed = f"\n{listed}" if listed else ""
    text = ""
    if counts is not None:
        text = (f"\n## Counts\n\nAt export ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): "
                f"{counts.get('votes', 0)} votes, {counts.get('train', 0)} training pairs, "
                f"{counts.get('test', 0)} held-out pairs.\n")
    path = Path(out) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    listed_splits = "".join(f"  - split: {s}\n    path: preferences/{s}/*.parquet\n" for s in SPLITS if s in splits)
    path.write_text(CARD.format(title=title, counts=text, guidelines=listed, splits=listed_splits))
    return path


def export_all(store: VoteStore, out: Path, salt: str, title: str = "PrefLoop preference votes",
               heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, int]:
    """The whole vote log as a dataset folder (a segment of votes, the preferences, the card);
    returns {"votes", "train", "test"} counts."""
    out = Path(out)
    for config in CONFIGS:
        if (out / config).exists() and any((out / config).iterdir()):
            raise FileExistsError(f"{out / config} is not empty; export into a new folder")
    name = f"export-{int(time.time())}"
    prefs = export_preferences(store, out, name, heldout_fraction)
    counts = {"votes": export_votes(store, out, f"{name}-000000", 0, store.max_vote_id(), salt),
              "train": prefs["train"], "test": prefs["test"]}
    guidelines = store.guidelines()
    write_guidelines(out, guidelines)
    write_card(out, title, counts, guidelines, splits=tuple(s for s in SPLITS if counts[s]) or ("train",))
    return counts
