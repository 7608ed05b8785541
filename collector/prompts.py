"""Which prompt an annotator sees next: least-voted first, never the same prompt twice to one
person; prompts voted "both bad" count for less, so they come back to be sampled again."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from storage.votes import VoteStore

logger = logging.getLogger(__name__)

BUNDLED = Path(__file__).with_name("prompts.txt")
MAX_PROMPT_CHARS = 4000


class PromptError(ValueError):
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
