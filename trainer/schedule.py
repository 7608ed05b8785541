"""When rounds run: at least N new usable votes, or every T minutes, or the admin's button.

The scheduler runs rounds in a background thread of the app, keeps their live progress for the
admin tab, and hands promoted adapters to ``on_promoted`` (the hot-swap). It also notices rounds
promoted from the CLI (``python -m trainer round``) and hands those over too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage.flags import setting
from trainer.rounds import RoundConfig, RoundError, Rounds

logger = logging.getLogger(__name__)


@dataclass
class ScheduleConfig:
    """Triggers for automatic rounds; each field's help is its flag's (storage/flags.py)."""

    min_new_votes: int = setting(64, flags=["--round-every-votes"],
                                 help="start a round when this many new usable votes arrived (0: off)")
    every_minutes: float = setting(0.0, flags=["--round-every-minutes"],
                                   help="also start one this often if there are enough pairs (0: off)")
    check_every_s: float = 10.0
    paused: bool = False


@dataclass
class RoundJob:
    """A round running (or finished) in the background."""

    reason: str
    started_at: float = field(default_factory=time.time)
    progress: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False


class Scheduler:
    def __init__(
        self,
        rounds: Rounds,
        round_config: RoundConfig,
        config: ScheduleConfig,
        on_promoted: Callable[[list[str]], Any],
    ):
        self.rounds = rounds
        self.round_config = round_config
        self.config = config
        self.on_promoted = on_promoted
        self.paused = config.paused
        self.job: RoundJob | None = None
        self.last_round_at = time.time()
        self._lock = threading.Lock()
        self._usable: tuple[tuple, int] | None = None  # (what it was counted at, the count)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- triggers ------------------------------------------------------------------------

    def usable_new_votes(self) -> int:
        """Left/right/tie votes since the last finished round (promoted or not). Counted again only
        when the log, the last round, the exclusions or the judges' settings changed: the scheduler's poll, the Admin
        tab and every annotator's progress line ask far more often than votes arrive."""
        store = self.rounds.store
        since = self.rounds.last_attempt_watermark()
        key = (store.max_vote_id(), since, tuple(sorted(store.excluded_annotators())), tuple(store.judges().items()),
               store.judge_bootstrap())
        with self._lock:
            if self._usable is not None and self._usable[0] == key:
                return self._usable[1]
        count = store.count_votes(since, usable_only=True)
        with self._lock:
            self._usable = (key, count)
        return count

    def due(self) -> str | None:
        if self.paused or self.running:
            return None
        new = self.usable_new_votes()
        if self.config.min_new_votes and new >= self.config.min_new_votes:
            return f"{new} new votes (threshold {self.config.min_new_votes})"
        if self.config.every_minutes and time.time() - self.last_round_at >= self.config.every_minutes * 60:
            if new >= self.round_config.min_pairs:
                return f"{self.config.every_minutes:g} minutes since the last round"
        return None

    def votes_to_next_round(self) -> int | None:
        """Usable votes still needed before a round starts by itself; None when votes do not start
        rounds (off or paused) and 0 while one is due or running."""
        if self.paused or not self.config.min_new_votes:
            return None
        return 0 if self.running else max(0, self.config.min_new_votes - self.usable_new_votes())

    def next_trigger(self) -> str:
        if self.paused:
            return "paused"
        parts = []
        if self.config.min_new_votes:
            parts.append(f"{self.usable_new_votes()}/{self.config.min_new_votes} new votes")
        if self.config.every_minutes:
            left = self.config.every_minutes * 60 - (time.time() - self.last_round_at)
            parts.append(f"in {max(0, left) / 60:.0f} min")
        return " or ".join(parts) or "manual only"

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    # -- running -------------------------------------------------------------------------

    def trigger(self, reason: str) -> RoundJob:
        """Start a round in the background; RoundError if one is already running."""
        with self._lock:
            if self.running:
                raise RoundError("a round is already running; wait for it to finish")
            job = RoundJob(reason)
            self.job = job
        threading.Thread(target=self._run, args=(job,), name="round", daemon=True).start()
        return job

    def _run(self, job: RoundJob) -> None:
        logger.info("round triggered: %s", job.reason)
        try:
            job.manifest = self.rounds.run(self.round_config, on_progress=job.progress.append)
            if job.manifest.get("status") == "promoted":
                self.on_promoted(self.promoted_names())
        except Exception as e:  # reported on the admin tab; the app keeps serving
            logger.exception("round failed")
            job.error = f"{type(e).__name__}: {e}" if not isinstance(e, RoundError) else str(e)
        finally:
            self.last_round_at = time.time()
            job.done = True

    def promoted_names(self) -> list[str]:
        return [r["adapter"] for r in self.rounds.promoted()]

    def sync_promoted(self) -> None:
        """Hand over rounds promoted elsewhere (the CLI) that are not serving yet."""
        if not self.running:
            self.on_promoted(self.promoted_names())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.check_every_s):
            try:
                self.sync_promoted()
            except Exception:  # the swap is tried again later; rounds go on meanwhile
                logger.exception("serving a promoted round failed")
            try:
                reason = self.due()
                if reason:
                    self.trigger(reason)
            except Exception:
                logger.exception("scheduler check failed")
