"""Which prompt an annotator sees next: least-voted first, never the same prompt twice to one
person; prompts voted "both bad" count for less, so they come back to be sampled again.

A prompt is a user's message or a whole conversation ending with one (a system prompt, earlier
turns): chat datasets and JSONL files keep their conversations, and an annotator's follow-up on
an answer makes a new one."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from storage.errors import UserError
from storage.votes import Prompt, VoteStore, prompt_messages

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


ROLES = ("system", "user", "assistant")
MAX_TURNS = 40


# A whole conversation, in characters: about 1,500 tokens, which leaves room for two answers of
# the default 256 tokens in the embedded model's 2,048-token context (vLLM refuses a longer one).
MAX_CONVERSATION_CHARS = 6000


def check_conversation(messages: object, max_chars: int = MAX_CONVERSATION_CHARS) -> list[dict[str, str]]:
    """A conversation to answer, normalised, or PromptError with the reason: chat messages with a
    role (system first, if any; user and assistant after) and text, ending with the user's."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("a conversation is a non-empty list of messages")
    if len(messages) > MAX_TURNS:
        raise PromptError(f"the conversation has {len(messages)} messages; the limit is {MAX_TURNS}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PromptError(f"message {i + 1}: expected a role ({', '.join(ROLES)}) and text content")
        if m["role"] == "system" and i:
            raise PromptError(f"message {i + 1}: a system message may only come first")
        if "\x00" in m["content"]:
            raise PromptError(f"message {i + 1} contains NUL bytes (\\x00)")
        out.append({"role": m["role"], "content": m["content"].strip()})
    if out[-1]["role"] != "user" or not out[-1]["content"]:
        raise PromptError("a conversation must end with the user's message")
    total = sum(len(m["content"]) for m in out)
    if total > max_chars:
        raise PromptError(f"the conversation has {total:,} characters; the limit is {max_chars:,}")
    return out


def conversation_prompt(messages: object) -> Prompt | None:
    """The prompt in a dataset's chat messages: everything up to and including the last user
    message (the answers after it are the dataset's, not ours); None when there is none usable."""
    if not isinstance(messages, list):
        return None
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), default=None)
    if last is None:
        return None
    try:
        conversation = check_conversation(messages[: last + 1])
    except PromptError:
        return None
    if len(conversation[-1]["content"]) > MAX_PROMPT_CHARS:
        return None
    return conversation[0]["content"] if len(conversation) == 1 else conversation


def read_prompt_file(path: Path) -> list[Prompt]:
    """Prompts from a text file (one per line, # comments) or a JSONL file: a "prompt" field with
    a text or a list of chat messages (a conversation), or a "messages" field (chat messages)."""
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
                row = json.loads(line)
                value = row["prompt"] if "prompt" in row else row["messages"]
            except (ValueError, KeyError, TypeError) as e:
                raise PromptError(f"{path}:{n}: expected a JSON object with a 'prompt' or 'messages' field ({e})"
                                  ) from e
            if isinstance(value, list):
                if "prompt" not in row:  # a chat log: the conversation up to its last user message
                    last = max((i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user"),
                               default=len(value) - 1)
                    value = value[: last + 1]
                try:
                    value = check_conversation(value)
                except PromptError as e:
                    raise PromptError(f"{path}:{n}: {e}") from None
                value = value[0]["content"] if len(value) == 1 else value
            if not isinstance(value, str | list) or not value:
                raise PromptError(f"{path}:{n}: the prompt must be text or a list of chat messages")
            line = value
        out.append(line)
    return out


TEXT_SUFFIXES = (".txt", ".jsonl")


def read_prompt_dataset(source: str, column: str = "prompt", split: str = "train",
                        limit: int = 10_000) -> list[Prompt]:
    """Prompts from a column of a dataset: a local parquet/json/csv file or folder, or a Hub id.
    A column of chat messages gives the conversation up to its last user message."""
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
        if isinstance(value, list):  # chat messages: the whole conversation
            value = conversation_prompt(value)
            if value is not None:
                out.append(value)
        elif isinstance(value, str) and value.strip() and "\x00" not in value and len(value) <= MAX_PROMPT_CHARS:
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

    def next_for(self, annotator: str) -> tuple[int, list[dict[str, str]]] | None:
        """The least-voted prompt this annotator has not seen, ties broken at random: its id and
        its chat messages."""
        seen = self.store.prompts_seen_by(annotator)
        candidates = [r for r in self.store.prompt_stats() if r["id"] not in seen]
        if not candidates:
            return None
        # A "both bad" vote says nothing about which answer is better: do not count it.
        score = {r["id"]: r["votes"] - (r["both_bad"] or 0) for r in candidates}
        low = min(score.values())
        pick = self.rng.choice([r for r in candidates if score[r["id"]] == low])
        return pick["id"], prompt_messages(pick["text"], pick["messages"])
