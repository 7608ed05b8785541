"""Two answers to one prompt, from the policy that serves now.

A same-policy pair is one request with n=2 and a logged seed; identical answers are
resampled with the next seed. Both answers stream; ``PairStream`` yields the partial texts
for the UI and then holds the finished ``Pair`` with its provenance.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from collector.engine import BASE, Engine
from collector.errors import EngineError
from storage.flags import setting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters sent to vLLM; each field's help is its flag's (storage/flags.py)."""

    temperature: float = setting(0.9, help="sampling temperature of the two answers (> 0, so they differ)")
    top_p: float = setting(0.95, help="nucleus sampling mass")
    max_tokens: int = setting(256, help="longest answer, in tokens")
    max_resamples: int = 2  # new seeds to try when both answers come out identical

    def request(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


@dataclass
class Pair:
    """Two answers with provenance: which adapter produced each side, seed, params, timings."""

    messages: list[dict[str, str]]
    answers: tuple[str, str]
    models: tuple[str, str]
    seed: int
    params: dict[str, Any]
    ttft_s: tuple[float, float]
    total_s: tuple[float, float]
    finish_reasons: tuple[str, str] = ("", "")
    resamples: int = 0
    arena: bool = False

    def timings(self) -> dict[str, Any]:
        return {"ttft_s": list(self.ttft_s), "total_s": list(self.total_s), "resamples": self.resamples}

    def provenance(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("answers")
        return d


@dataclass
class PairStream:
    """Iterate for ``(left, right)`` partial texts; afterwards ``pair`` holds the result.

    With ``models`` unset: a same-policy pair, one request with n=2. With ``models=(a, b)``: an
    arena pair, two concurrent n=1 requests (the caller shuffles the sides). ``model``/``models``
    name versions, which the pair records; ``route`` gives the name each is requested under
    (``Serving.route``: in merged mode the served weights or a delta adapter).
    """

    engine: Engine
    messages: list[dict[str, str]]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    model: str | None = None
    models: tuple[str, str] | None = None
    route: Callable[[str], str] | None = None  # version -> the model name vLLM serves it under
    pair: Pair | None = None

    def _sent(self, version: str) -> str:
        return self.route(version) if self.route is not None else version

    def __iter__(self) -> Iterator[tuple[str, str]]:
        if self.models is not None:
            yield from self._arena()
            return
        model = self.model or BASE
        seed = self.seed if self.seed is not None else random.randrange(2**31)
        for attempt in range(self.params.max_resamples + 1):
            texts = ["", ""]
            ttft: list[float | None] = [None, None]
            total = [0.0, 0.0]
            finish = ["", ""]
            body = {"model": self._sent(model), "messages": self.messages, "n": 2, "seed": seed,
                    **self.params.request()}
            t0 = time.perf_counter()
            for chunk in self.engine.stream_chat(body):
                for choice in chunk.get("choices", []):
                    i = choice["index"]
                    delta = (choice.get("delta") or {}).get("content") or ""
                    now = time.perf_counter() - t0
                    if delta:
                        if ttft[i] is None:
                            ttft[i] = now
                        texts[i] += delta
                    if choice.get("finish_reason"):
                        finish[i] = choice["finish_reason"]
                        total[i] = now
                yield texts[0], texts[1]
            if not all(finish):
                raise EngineError(f"vLLM ended the stream before both answers finished (seed {seed})")
            if texts[0].strip() != texts[1].strip() or attempt == self.params.max_resamples:
                break
            logger.info("identical answers for seed %d; resampling", seed)
            seed += 1
        self.pair = Pair(
            messages=self.messages, answers=(texts[0], texts[1]), models=(model, model), seed=seed,
            params={**self.params.request(), "n": 2}, ttft_s=(ttft[0] or total[0], ttft[1] or total[1]),
            total_s=(total[0], total[1]), finish_reasons=(finish[0], finish[1]), resamples=attempt,
        )
        logger.info("pair sampled model=%s seed=%d total=%.1fs/%.1fs", model, seed, *self.pair.total_s)

    def _arena(self) -> Iterator[tuple[str, str]]:
        assert self.models is not None
        seed = self.seed if self.seed is not None else random.randrange(2**31)
        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()

        def side(i: int, model: str) -> None:
            try:  # whatever fails (routing included) reaches the consumer, which would wait for ever
                if done.is_set():
                    return
                body = {"model": self._sent(model), "messages": self.messages, "n": 1, "seed": seed + i,
                        **self.params.request()}
                for chunk in self.engine.stream_chat(body):
                    if done.is_set():  # the pair failed or was dropped: stop generating for it
                        return
                    for choice in chunk.get("choices", []):
                        events.put((i, (choice.get("delta") or {}).get("content") or "", choice.get("finish_reason")))
            except Exception as e:  # handed to the consumer, raised there
                events.put((i, e, None))
            events.put((i, None, None))

        done = threading.Event()  # set when the pair ends, however: a side still running stops
        for i, m in enumerate(self.models):
            threading.Thread(target=side, args=(i, m), daemon=True, name=f"arena-{i}").start()
        texts, ttft, total, finish, open_sides = ["", ""], [0.0, 0.0], [0.0, 0.0], ["", ""], 2
        try:
            while open_sides:
                i, delta, reason = events.get()
                if isinstance(delta, Exception):
                    raise delta
                now = time.perf_counter() - t0
                if delta is None:
                    open_sides -= 1
                    continue
                if delta and not texts[i]:
                    ttft[i] = now
                texts[i] += delta
                if reason:
                    finish[i], total[i] = reason, now
                yield texts[0], texts[1]
        finally:
            done.set()
        self.pair = Pair(
            messages=self.messages, answers=(texts[0], texts[1]), models=self.models, seed=seed,
            params={**self.params.request(), "n": 1}, ttft_s=(ttft[0], ttft[1]), total_s=(total[0], total[1]),
            finish_reasons=(finish[0], finish[1]), arena=True,
        )
        logger.info("arena pair sampled %s vs %s seed=%d", *self.models, seed)


def sample_pair(
    engine: Engine,
    messages: list[dict[str, str]],
    params: SamplingParams | None = None,
    seed: int | None = None,
    model: str | None = None,
    models: tuple[str, str] | None = None,
) -> Pair:
    """Sample a pair to completion (no UI streaming)."""
    stream = PairStream(engine, messages, params or SamplingParams(), seed, model, models)
    for _ in stream:
        pass
    assert stream.pair is not None
    return stream.pair
