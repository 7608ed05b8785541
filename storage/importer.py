"""Existing preference datasets -> seed pairs for a warm-start round.

Accepts TRL's preference schema in either form: standard (``prompt``, ``chosen``, ``rejected`` as
strings) or conversational (lists of messages; the prompt may also be implicit in ``chosen``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from storage.errors import StorageError
from storage.votes import VoteStore


def _messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise StorageError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def normalise(row: dict[str, Any]) -> tuple[list, list, list]:
    """One dataset row -> (prompt messages, [chosen assistant message], [rejected assistant message])."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise StorageError(f"a preference row needs 'chosen' and 'rejected' (and 'prompt'); got {sorted(row)}")
    chosen = _messages(row["chosen"], "assistant")
    rejected = _messages(row["rejected"], "assistant")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "user")
    else:  # implicit prompt: the shared leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise StorageError("a row has no 'prompt' and no shared leading messages to take it from")
    return prompt, chosen[-1:], rejected[-1:]


FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_any(source: str, name: str | None = None, split: str = "train"):
    """A ``datasets.Dataset`` from a local file, a local dataset folder, or a Hub dataset id.

    A local folder is read into memory through a cache of its own, removed afterwards: datasets
    caches a local folder under its folder name and config alone, so a second export folder called
    ``export`` would otherwise come back with the first one's rows (or fail its split check).
    """
    import tempfile

    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        kind = FILE_BUILDERS.get(path.suffix)
        if kind is None:
            raise StorageError(f"{source}: unknown file type; use parquet, json, jsonl or csv")
        return load_dataset(kind, data_files=str(path), split=split)
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="prefloop-datasets-") as cache:
            return load_dataset(str(path), name, split=split, cache_dir=cache, keep_in_memory=True)
    return load_dataset(source, name, split=split)


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """A local parquet/JSON(L) file or dataset folder (a PrefLoop export: its preferences), or a Hub id."""
    path = Path(source)
    name = "preferences" if path.is_dir() and (path / "preferences").is_dir() else None
    try:
        return list(load_any(source, name, split))
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot load {source!r}: {type(e).__name__}: {e}") from e


def import_pairs(store: VoteStore, source: str, split: str = "train") -> int:
    """Insert the dataset's pairs as seed pairs; returns how many were new."""
    rows = load_rows(source, split)
    now = time.time()
    records = []
    for i, row in enumerate(rows):
        try:
            prompt, chosen, rejected = normalise(row)
        except StorageError as e:
            raise StorageError(f"{source} row {i}: {e}") from None
        records.append((source, json.dumps(prompt), json.dumps(chosen), json.dumps(rejected), now))
    with store._conn() as conn:
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT OR IGNORE INTO seed_pairs(source, prompt, chosen, rejected, imported_at) VALUES (?, ?, ?, ?, ?)",
            records,
        )
        conn.execute("COMMIT")
        return conn.total_changes - before


def seed_pairs(store: VoteStore, source: str | None = None) -> list[dict[str, Any]]:
    """Seed pairs in TRL's conversational format."""
    with store._conn() as conn:
        q = "SELECT * FROM seed_pairs" + (" WHERE source = ?" if source else "") + " ORDER BY id"
        rows = conn.execute(q, (source,) if source else ()).fetchall()
    return [{"prompt": json.loads(r["prompt"]), "chosen": json.loads(r["chosen"]),
             "rejected": json.loads(r["rejected"]), "vote_id": -r["id"], "choice": "seed"} for r in rows]
