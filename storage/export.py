"""Votes -> a Hugging Face dataset folder with two configs.

- ``votes``: every vote, raw, with provenance (models, seed, sampling params, latency).
- ``preferences``: what TRL's DPOTrainer reads as is: ``prompt`` (messages), ``chosen`` and
  ``rejected`` (one assistant message each), plus ``vote_id`` and the models that sampled them.
  Ties and both-bad votes stay in ``votes`` only.

Files are immutable parquet segments named ``<boot id>-<sequence>.parquet``: each app start
(boot) writes its own, so replicas never collide; readers dedupe on ``pair_id`` (a random token,
unique across replicas, where ``vote_id`` is only unique within one app's database).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from storage.votes import VoteStore

CONFIGS = ("votes", "preferences")


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
        })
    return out


def preference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["choice"] not in ("left", "right") or r.get("repeat_of"):
            continue  # ties and both-bad order nothing; a repeat's original is already a row
        left = r["choice"] == "left"
        out.append({
            "prompt": r["messages"],
            "chosen": [{"role": "assistant", "content": r["answer_left"] if left else r["answer_right"]}],
            "rejected": [{"role": "assistant", "content": r["answer_right"] if left else r["answer_left"]}],
            "vote_id": r["vote_id"],
            "pair_id": r["pair_id"],
            "chosen_model": r["model_left"] if left else r["model_right"],
            "rejected_model": r["model_right"] if left else r["model_left"],
        })
    return out


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Write atomically (temporary file, fsync, rename); refuse to replace an existing segment."""
    from datasets import Dataset

    if path.exists():
        raise FileExistsError(f"{path} exists; segments are immutable")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Dataset.from_list(rows).to_parquet(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_segment(store: VoteStore, out: Path, name: str, after: int, upto: int, salt: str) -> dict[str, int]:
    """Write votes ``after < id <= upto`` as one segment of each config; returns row counts."""
    rows = store.votes_with_pairs(after, upto)
    counts = {}
    for config, make in (("votes", lambda r: vote_rows(r, salt)), ("preferences", preference_rows)):
        data = make(rows)
        counts[config] = len(data)
        if data:
            write_parquet(data, Path(out) / config / f"{name}.parquet")
    return counts


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
  data_files: preferences/*.parquet
  default: true
- config_name: votes
  data_files: votes/*.parquet
---

# {title}

Human preference votes collected with PrefLoop: annotators were shown two answers to the same
prompt, sampled by vLLM from the model serving at the time (the base model or a LoRA adapter from
an earlier IPO round), and picked the better one, a tie, or "both are bad".

## Configs

- `preferences` (default): `prompt` (list of chat messages), `chosen` and `rejected` (one
  assistant message each), `vote_id`, `pair_id`, `chosen_model`, `rejected_model`. TRL's `DPOTrainer` reads it
  as is: `load_dataset(REPO, "preferences", split="train")`. Ties and both-bad votes are not here.
- `votes`: one row per vote: `vote_id`, `pair_id`, `created_at` (Unix seconds), `annotator` (salted
  hash), `prompt`, `answer_left`, `answer_right`, `model_left`, `model_right`, `choice`
  (`left` | `right` | `tie` | `both_bad`), `seed`, `sampling_params` (JSON), `latency_ms`,
  `repeat_of` (the `pair_id` of the original when a pair was shown again to measure agreement;
  repeats are not in `preferences`).

## Guidelines

What annotators were told "better" means is in `guidelines/<version>.md`, one file per version
(the text's hash), never changed once written.
{guidelines}
## Files

Files are immutable parquet segments named `<boot id>-<sequence>.parquet`; each app start writes its
own, so several replicas never collide. Deduplicate on `pair_id` when reading, keeping the newest
vote (an annotator may change a vote until a round takes it: the change is a new row; `vote_id`
is unique only within one replica).
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
               guidelines: list[dict] | None = None) -> Path:
    listed = "".join(
        f"- `{g['version']}` (from {time.strftime('%Y-%m-%d', time.gmtime(g['created_at']))}): "
        f"{g['votes']} votes\n" for g in guidelines or [])
    listed = f"\n{listed}" if listed else ""
    text = ""
    if counts is not None:
        text = (f"\n## Counts\n\nAt export ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): "
                f"{counts.get('votes', 0)} votes, {counts.get('preferences', 0)} preference pairs.\n")
    path = Path(out) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CARD.format(title=title, counts=text, guidelines=listed))
    return path


def export_all(store: VoteStore, out: Path, salt: str, title: str = "PrefLoop preference votes") -> dict[str, int]:
    """The whole vote log as a dataset folder (one segment per config + the card)."""
    out = Path(out)
    for config in CONFIGS:
        if (out / config).exists() and any((out / config).iterdir()):
            raise FileExistsError(f"{out / config} is not empty; export into a new folder")
    counts = export_segment(store, out, f"export-{int(time.time())}-000000", 0, store.max_vote_id(), salt)
    guidelines = store.guidelines()
    write_guidelines(out, guidelines)
    write_card(out, title, counts, guidelines)
    return counts
