"""Which prompt an annotator sees next: least-voted first, never the same prompt twice to one
person; prompts voted "both bad" count for less, so they come back to be sampled again."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from storage.errors import UserError
from storage.votes import VoteStore

logger = logging.getLogger(__name__)

BUNDLED = Path(__file__).with_name("prompts.txt")
MAX_PROMPT_CHARS = 4000


class PromptError(UserError, ValueError):
    """A prompt was refused (empty, too long, or not text)."""


def check_prompt(text: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """Normalise a typed prompt or raise PromptError with the reason."""
    if not isinstance(text, str):
        raise PromptError("a prompt must be text")
    if "\x00" in text:
        raise PromptError("the prompt contains NUL bytes (\\x00); remove them and send it again")
    text = text.strip()
    if not text:
        raise PromptError("the prompt is empty; type a question or request")
    if len(text) > max_chars:
        raise PromptError(f"the prompt has {len(text):,} characters; the limit is {max_chars:,}. Shorten it.")
    return text


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a text file (one per line, # comments) or a JSONL file with a "prompt" field."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompts file {path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                line = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise PromptError(f"{path}:{n}: expected a JSON object with a 'prompt' field ({e})") from e
        out.append(line)
    return out


TEXT_SUFFIXES = (".txt", ".jsonl")


def read_prompt_dataset(source: str, column: str = "prompt", split: str = "train", limit: int = 10_000) -> list[str]:
    """Prompts from a column of a dataset: a local parquet/json/csv file or folder, or a Hub id.
    A column of chat messages gives its first user message."""
    from storage.importer import load_any

    local = Path(source)
    if local.is_file() and local.suffix not in (".parquet", ".json", ".csv"):
        raise PromptError(f"{source}: use a .txt, .jsonl, .parquet, .json or .csv file, or a dataset id")
    try:
        ds = load_any(source, split=split)
    except PromptError:
        raise
    except Exception as e:  # datasets raises many types; the message says what was wrong
        raise PromptError(f"could not load prompts from {source!r} (split {split!r}): {e}") from e
    if column not in ds.column_names:
        raise PromptError(f"{source} has no column {column!r}; its columns: {', '.join(ds.column_names)}")
    out = []
    for value in ds.select(range(min(limit, len(ds))))[column]:
        if isinstance(value, list):  # chat messages
            value = next((m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None)
        if isinstance(value, str) and value.strip() and "\x00" not in value and len(value) <= MAX_PROMPT_CHARS:
            out.append(value.strip())
    if not out:
        raise PromptError(f"{source}: column {column!r} has no usable prompt (text up to {MAX_PROMPT_CHARS} chars)")
    return out


class PromptQueue:
    """Serves prompts from the ``prompts`` table of the vote store."""

    def __init__(self, store: VoteStore, rng: random.Random | None = None):
        self.store = store
        self.rng = rng or random.Random()

    def load_file(self, path: Path = BUNDLED) -> int:
        texts = read_prompt_file(path)
        added = self.store.add_prompts(texts, source=Path(path).name)
        logger.info("prompts: %d read from %s, %d new", len(texts), path, added)
        return added

    def load(self, source: str | Path | None = None, column: str = "prompt", split: str = "train") -> int:
        """The bundled prompts, a prompts file (.txt, .jsonl), or a dataset column (file or Hub id)."""
        if source is None or Path(source).suffix in TEXT_SUFFIXES:
            return self.load_file(Path(source) if source else BUNDLED)
        texts = read_prompt_dataset(str(source), column, split)
        added = self.store.add_prompts(texts, source=f"{source}:{column}")
        logger.info("prompts: %d read from %s column %s, %d new", len(texts), source, column, added)
        return added

    def next_for(self, annotator: str) -> tuple[int, str] | None:
        """The least-voted prompt this annotator has not seen, ties broken at random."""
        seen = self.store.prompts_seen_by(annotator)
        candidates = [r for r in self.store.prompt_stats() if r["id"] not in seen]
        if not candidates:
            return None
        # A "both bad" vote says nothing about which answer is better: do not count it.
        score = {r["id"]: r["votes"] - (r["both_bad"] or 0) for r in candidates}
        low = min(score.values())
        pick = self.rng.choice([r for r in candidates if score[r["id"]] == low])
        return pick["id"], pick["text"]
