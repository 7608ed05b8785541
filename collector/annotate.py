"""The annotation service shared by the browser UI and the `/next_pair`, `/vote` API: one place
for identity, rate limits, prompt checks, sampling and recording."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from collector.prompts import PromptError, PromptQueue, check_conversation, check_prompt
from collector.sampling import PairStream, SamplingParams
from collector.serving import Serving
from storage.errors import UserError, VoteRejected
from storage.flags import setting
from storage.votes import Choice, VoteStore

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RateLimited(UserError):
    """An annotator asked for more than the per-user rate limit allows."""


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds per user (sliding window)."""

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit = limit
        self.window_s = window_s
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, user: str) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        with self._lock:
            q = self._events.setdefault(user, deque())
            while q and now - q[0] > self.window_s:
                q.popleft()
            if len(q) >= self.limit:
                wait = self.window_s - (now - q[0])
                raise RateLimited(
                    f"too many requests: at most {self.limit} per {self.window_s:.0f} s; try again in {wait:.0f} s"
                )
            q.append(now)


class Busy(UserError):
    """Every generation slot is taken and the waiting line is full; the message says when to retry."""


class GenerationGate:
    """One limit on pairs generated at once, shared by the browser and the API, with a bounded line.

    ``slots`` pairs generate together (sized to what the engine can batch); up to ``max_waiting``
    more wait for a slot; past that a request is answered at once with ``Busy`` and an estimate of
    the wait, instead of piling up threads and requests behind the engine. Voting never passes
    through here.
    """

    def __init__(self, slots: int, max_waiting: int, typical_s: float = 10.0):
        if slots < 1 or max_waiting < 0:
            raise ValueError(f"slots must be >= 1 and max_waiting >= 0, got {slots} and {max_waiting}")
        self.slots = slots
        self.max_waiting = max_waiting
        self.typical_s = typical_s  # running mean of one pair's generation time
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def retry_after(self) -> float:
        """Seconds until a place in the line is likely to free up."""
        return max(1.0, self.typical_s * (self.waiting + 1) / self.slots)

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._cond:
            if self.running >= self.slots:
                if self.waiting >= self.max_waiting:
                    raise Busy(f"busy: {self.running} pairs are being written and {self.waiting} requests wait; "
                               f"try again in {self.retry_after():.0f} s")
                self.waiting += 1
                try:
                    while self.running >= self.slots:
                        self._cond.wait()
                finally:
                    self.waiting -= 1
            self.running += 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self.typical_s = 0.8 * self.typical_s + 0.2 * (time.monotonic() - t0)
                self._cond.notify()


@dataclass
class AnnotateConfig:
    """Annotation settings; each field's help is its flag's (storage/flags.py)."""

    sampling: SamplingParams = SamplingParams()
    pairs_per_minute: int = setting(30, help="per-annotator limit on new pairs (0: none)")
    max_prompt_chars: int = setting(4000, help="longest prompt an annotator may type")
    arena_rate: float = setting(0.25, help="share of pairs that put the serving version against an earlier one "
                                "or the base (sides shuffled), for each version's human win rate")
    repeat_rate: float = setting(0.05, help="share of pairs shown again (to the same or another person, sides "
                                 "swapped half the time) to measure agreement; not trained on (0: off)")
    judge_repeat_rate: float = setting(0.5, help="share of an AI judge's pairs that are pairs people voted on "
                                       "(sides swapped half the time): judge-people agreement (0: off)")
    max_concurrent_pairs: int | None = setting(None, help="pairs generated at once, for everyone together "
                                               "(default: 8 per vLLM endpoint on CPU, 64 per endpoint on CUDA)")
    max_waiting_pairs: int | None = setting(None, help="requests that may wait for a generation slot; past them "
                                            "people are told 'busy, try again in N s' (default: twice "
                                            "--max-concurrent-pairs)")
    guidelines: str = ""  # the text of --guidelines (Markdown); "" for none


def shown(pair_id: str, messages: list[dict[str, str]], answers: tuple[str, str],
          finish_reasons: tuple[str, str]) -> dict[str, Any]:
    """A finished pair as the UI and `/next_pair` show it: ``prompt`` is the user's last message,
    ``history`` the conversation before it (a system prompt, earlier turns; empty for a single
    message). ``cut_left`` / ``cut_right``: that answer stopped at the token limit (vLLM's finish
    reason "length"), not where the model ended it, so an annotator can tell an unfinished answer
    from a complete one."""
    return {"pair_id": pair_id, "prompt": messages[-1]["content"], "history": messages[:-1], "left": answers[0],
            "right": answers[1], "cut_left": finish_reasons[0] == "length",
            "cut_right": finish_reasons[1] == "length", "done": True}


class Annotation:
    def __init__(self, store: VoteStore, queue: PromptQueue, serving: Serving, config: AnnotateConfig,
                 votes_to_next_round: Callable[[], int | None] = lambda: None):
        self.store = store
        self.queue = queue
        self.serving = serving
        self.config = config
        self.votes_to_next_round = votes_to_next_round  # the schedule's, for an annotator's progress
        self.limiter = RateLimiter(config.pairs_per_minute)
        # The guidelines in force: stored by version, which each vote then carries.
        self.guideline_version = store.add_guidelines(config.guidelines) if config.guidelines.strip() else None
        slots = config.max_concurrent_pairs or 8  # the app sizes it to the engine
        self.gate = GenerationGate(slots, 2 * slots if config.max_waiting_pairs is None else config.max_waiting_pairs)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="vote")
        self.rng = random.Random()

    def arena_models(self) -> tuple[str, str] | None:
        """Serving vs an earlier version (or the base), sides shuffled; None for a same-policy pair."""
        if self.rng.random() >= self.config.arena_rate:
            return None
        opponent = self.serving.arena_opponent(self.rng)
        if opponent is None:
            return None
        sides = [self.serving.current, opponent]
        self.rng.shuffle(sides)
        return sides[0], sides[1]

    def stream_pair(self, annotator: str, prompt: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield ``{"prompt", "history", "left", "right", "done": False}`` while streaming, then the
        stored pair as ``shown`` gives it: its ``pair_id``, ``cut_left`` / ``cut_right`` and
        ``done: True``."""
        if not annotator:
            raise PermissionError("log in first")
        self.limiter.check(annotator)
        typed = check_prompt(prompt, self.config.max_prompt_chars) if prompt is not None and prompt.strip() else None
        if typed is None and (repeat := self._repeat(annotator)) is not None:
            yield repeat  # a pair shown again needs no generation
            return
        if typed is not None:
            messages: list[dict[str, str]] | None = [{"role": "user", "content": typed}]
        else:
            messages = None  # the queue's next, picked once a generation slot is free
        yield from self._generate(annotator, messages)

    def follow_up(self, annotator: str, pair_id: str | None, text: str | None) -> Iterator[dict[str, Any]]:
        """Continue a conversation from the answer this annotator chose on ``pair_id`` with their
        message: a new pair whose prompt is the conversation so far, the chosen answer and the
        message (theirs alone until an admin shares it, as a typed prompt is)."""
        if not annotator:
            raise PermissionError("log in first")
        self.limiter.check(annotator)
        pair = self.store.get_pair(pair_id) if pair_id else None
        if pair is None or pair.annotator != annotator:
            raise VoteRejected("vote on a pair first, then follow up on the answer you chose")
        choice = self.store.current_choice(pair.pair_id)
        if choice not in ("left", "right"):
            raise VoteRejected("pick the better answer (A or B) to follow up on it" if choice else
                               "vote on this pair first, then follow up on the answer you chose")
        message = check_prompt(text, self.config.max_prompt_chars)
        chosen = pair.answer_left if choice == "left" else pair.answer_right
        conversation = check_conversation([*pair.messages, {"role": "assistant", "content": chosen},
                                           {"role": "user", "content": message}])
        yield from self._generate(annotator, conversation, source="follow-up")

    def _generate(self, annotator: str, messages: list[dict[str, str]] | None,
                  source: str = "annotator") -> Iterator[dict[str, Any]]:
        """Sample a pair for ``messages`` (None: the queue's next prompt) in a generation slot,
        streaming, then store it and yield it as ``shown`` gives it."""
        # The slot first: a request that will be told "busy" costs no database work.
        # The lease: in merged mode the served weights stay those of the versions this pair records.
        with self.gate.slot(), self.serving.lease():
            if messages is not None:
                prompt_id = self.store.prompt_id(messages, source=source, owner=annotator)  # theirs until shared
            else:
                picked = self.queue.next_for(annotator)
                if picked is None:
                    raise PromptError("you have seen every prompt; write your own with 'Write your own prompt'")
                prompt_id, messages = picked
            stream = PairStream(self.serving.engine, messages, self.config.sampling, model=self.serving.current,
                                models=self.arena_models(), route=self.serving.route)
            for left, right in stream:
                yield {"prompt": messages[-1]["content"], "history": messages[:-1], "left": left, "right": right,
                       "done": False}
        pair = stream.pair
        assert pair is not None
        pair_id = self.store.issue_pair(
            annotator=annotator, prompt_id=prompt_id, messages=messages,
            answer_left=pair.answers[0], answer_right=pair.answers[1],
            model_left=pair.models[0], model_right=pair.models[1], seed=pair.seed,
            params=pair.params, timings=pair.timings(), finish_reasons=pair.finish_reasons,
        )
        logger.info("pair %s issued to %s (model %s, seed %d)", pair_id, annotator, pair.models[0], pair.seed)
        yield shown(pair_id, messages, pair.answers, pair.finish_reasons)

    def _repeat(self, annotator: str) -> dict[str, Any] | None:
        """A pair shown again, at ``repeat_rate``; to an AI judge at ``judge_repeat_rate``, and one
        that people voted on: the Admin tab's judge-people agreement needs such pairs."""
        judge = self.store.is_judge(annotator)
        rate = self.config.judge_repeat_rate if judge else self.config.repeat_rate
        if rate <= 0 or self.rng.random() >= rate:
            return None
        original = self.store.repeat_candidate(annotator)
        if original is None:
            return None
        pair_id = self.store.issue_repeat(original, annotator, swap=self.rng.random() < 0.5)
        pair = self.store.get_pair(pair_id)
        assert pair is not None
        logger.info("pair %s issued to %s: a repeat of %s", pair_id, annotator, original)
        return shown(pair_id, pair.messages, (pair.answer_left, pair.answer_right),
                     pair.finish_reasons)

    def resume(self, annotator: str) -> dict[str, Any] | None:
        """The pair this annotator was shown and has not voted on or skipped (after a reload)."""
        pair = self.store.open_pair(annotator)
        if pair is None:
            return None
        return shown(pair.pair_id, pair.messages, (pair.answer_left, pair.answer_right),
                     pair.finish_reasons)

    def skip(self, annotator: str, pair_id: str | None) -> None:
        if pair_id:
            self.store.skip_pair(pair_id, annotator)

    def next_pair(self, annotator: str, prompt: str | None = None) -> dict[str, Any]:
        *_, last = self.stream_pair(annotator, prompt)
        last.pop("done", None)
        return last

    def next_follow_up(self, annotator: str, pair_id: str | None, text: str | None) -> dict[str, Any]:
        *_, last = self.follow_up(annotator, pair_id, text)
        last.pop("done", None)
        return last

    def vote(self, annotator: str, pair_id: str, choice: str, reason: str | None = None,
             judge_orders: str | None = None) -> dict[str, Any]:
        """Record a vote, with the guidelines' version in force and the annotator's optional reason
        (and a judge account's verdicts in both orders)."""
        if not annotator:
            raise PermissionError("log in first")
        vote_id = self.store.record_vote(pair_id, annotator, Choice.parse(choice), reason=reason,
                                         guideline=self.guideline_version, judge_orders=judge_orders)
        return {"vote_id": vote_id, "pair_id": pair_id, "choice": Choice.parse(choice).value}

    def reshow(self, annotator: str, pair_id: str | None) -> dict[str, Any]:
        """A pair this annotator voted on, shown again so they can change their vote (until a
        round takes it: ``VoteStore.record_vote`` says so)."""
        pair = self.store.get_pair(pair_id) if pair_id else None
        if pair is None or pair.annotator != annotator:
            raise VoteRejected("there is no vote of yours to change here; vote on a pair first")
        view = shown(pair.pair_id, pair.messages, (pair.answer_left, pair.answer_right),
                     pair.finish_reasons)
        view["voted"] = self.store.current_choice(pair.pair_id)
        return view

    def guidelines_unread(self, annotator: str) -> bool:
        """Whether to open the guidelines for this person: there are some they have not voted under."""
        return self.guideline_version is not None and not self.store.has_read_guidelines(
            annotator, self.guideline_version)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the service's own small pool (votes, counts): such calls never wait
        for a thread that a generation holds, however many people ask for pairs."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def counts(self, annotator: str) -> dict[str, Any]:
        """An annotator's progress: votes today and in all, everyone's, agreement with others on
        pairs shown again (agreed, compared), and usable votes until the next round (None: off)."""
        midnight = time.mktime(time.localtime()[:3] + (0, 0, 0, 0, 0, -1))
        return {
            "today": self.store.count_votes_by(annotator, midnight),
            "mine": self.store.count_votes_by(annotator),
            "total": self.store.count_votes(),
            "agreement": self.store.agreement_of(annotator),
            "to_next_round": self.votes_to_next_round(),
        }
