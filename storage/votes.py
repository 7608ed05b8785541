"""Pairs and votes. A pair is issued to one annotator under a token; ``record_vote`` is
idempotent on that token, and returns only after the vote is committed (synchronous=FULL)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage.db import check_integrity, connect, create_private, damaged, migrate
from storage.errors import StorageError, VoteRejected

logger = logging.getLogger(__name__)

# A choice seen with the sides swapped, mapped back to the original's sides.
SWAPPED = {"left": "right", "right": "left", "tie": "tie", "both_bad": "both_bad"}

MAX_REASON_CHARS = 1000  # a short reason with a vote, not an essay


class Choice(StrEnum):
    """What an annotator said about a pair."""

    LEFT = "left"
    RIGHT = "right"
    TIE = "tie"
    BOTH_BAD = "both_bad"

    @classmethod
    def parse(cls, value: str) -> Choice:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(c.value for c in cls)
            raise VoteRejected(f"invalid choice {value!r}; use one of: {allowed}") from None


ANNOTATOR_SALT_ENV = "PREFLOOP_ANNOTATOR_SALT"
SALT_KEY = "annotator_salt"

Prompt = str | list[dict[str, str]]  # a user's message, or a conversation ending with one


def prompt_row(prompt: Prompt) -> tuple[str, str | None]:
    """(text, messages JSON) as the prompts table keeps them: a text, or a single user message,
    as its text; a longer conversation as its canonical JSON in both (it is known once)."""
    if isinstance(prompt, str):
        return prompt, None
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"], None
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in prompt], ensure_ascii=False)
    return canonical, canonical


def token_digest(token: str) -> str:
    """What is stored for an API token: its SHA-256 (a token is 256 random bits: no slow hash is
    needed to make guessing it hopeless)."""
    return hashlib.sha256(token.encode()).hexdigest()


def prompt_messages(text: str, messages: str | None) -> list[dict[str, str]]:
    """A prompts row as chat messages."""
    return json.loads(messages) if messages else [{"role": "user", "content": text}]


USABLE_SQL = (" AND v.choice != 'both_bad' AND p.repeat_of IS NULL"
              " AND v.annotator NOT IN (SELECT annotator FROM excluded_annotators)")
# a judge's vote trains only where an admin included that judge (storage.pairs.trainable)
TRAINED_JUDGE_SQL = " AND (v.judge = 0 OR v.annotator IN (SELECT name FROM judges WHERE trained = 1))"
JUDGE_BOOTSTRAP = "judge_bootstrap_votes"  # settings key: rounds train on judges until this many people's votes


@dataclass(frozen=True)
class StoredPair:
    """A pair as shown to an annotator, with its provenance."""

    pair_id: str
    annotator: str
    messages: list[dict[str, str]]
    answer_left: str
    answer_right: str
    model_left: str
    model_right: str
    seed: int
    params: dict[str, Any]
    timings: dict[str, Any]
    created_at: float
    repeat_of: str | None = None
    repeat_swapped: bool = False
    finish_reasons: tuple[str, str] = ("", "")  # vLLM's per side: "stop" | "length"; "" not recorded


class GroupCommit:
    """One writer thread per store: concurrent writes are batched into one transaction, so one
    fsync acknowledges many votes. Each write runs in its own savepoint: one refused write does
    not undo the others. ``submit`` returns only after the batch's COMMIT (synchronous=FULL).

    The writer is allowed to die (a bug, a broken connection): the writes it held are answered
    with an error (nothing of them was committed), and the next waiting or new write starts a
    fresh writer. No caller waits longer than ``timeout_s``.
    """

    MAX_BATCH = 256

    def __init__(self, path: Path, timeout_s: float = 30.0):
        self.path = path
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.restarts = 0

    def _ensure_writer(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:
                    self.restarts += 1
                    logger.error("vote writer was not running; starting a new one (restart %d)", self.restarts)
                self._thread = threading.Thread(target=self._run, name="vote-writer", daemon=True)
                self._thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        fut: Future = Future()
        self._ensure_writer()
        self._queue.put((fn, fut))
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return fut.result(timeout=0.5)
            except FutureTimeout:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"the vote log {self.path} did not answer within {self.timeout_s:.0f} s; "
                        "the write may not be recorded: try again (a repeated vote is not counted twice)"
                    ) from None
                self._ensure_writer()  # a writer that died while this write waited is replaced

    def _run(self) -> None:
        batch: list[tuple[Callable, Future]] = []
        try:
            conn = connect(self.path)
            while True:
                batch = [self._queue.get()]
                while len(batch) < self.MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._commit(conn, batch)
                batch = []
        except BaseException as e:
            logger.exception("vote writer stopped")
            err = StorageError(f"the vote log's writer failed ({type(e).__name__}: {e}); nothing of this "
                               "write was recorded: try again")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Callable, Future]]) -> None:
        outcomes: list[tuple[Future, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT one_write")
                try:
                    outcomes.append((fut, fn(conn), None))
                except Exception as e:
                    conn.execute("ROLLBACK TO one_write")
                    outcomes.append((fut, None, e))
                conn.execute("RELEASE one_write")
            conn.execute("COMMIT")
        except Exception as e:  # nothing of this batch is acknowledged
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err = StorageError(f"could not commit to {self.path}: {e}; nothing was recorded, try again")
            for _, fut in batch:
                fut.set_exception(err)
            return
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for fut, result, error in outcomes:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)


class VoteStore:
    """The vote log in one SQLite file. Safe to share between threads and processes: reads open
    short-lived connections; votes and pairs go through one group-commit writer per store."""

    def __init__(self, path: Path | str, check: bool = False):
        """Open (or create, 0600) the vote log and migrate it. ``check``: run SQLite's
        ``quick_check`` first (the app does at start) and refuse a damaged file in one line."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_private(self.path)
        with self._conn() as conn:
            if check:
                check_integrity(conn, self.path)
            try:
                migrate(conn)
            except sqlite3.DatabaseError as e:
                raise StorageError(damaged(self.path, str(e))) from e
        self._writer = GroupCommit(self.path)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path)
        try:
            yield conn
        finally:
            conn.close()

    # -- prompts -------------------------------------------------------------------------

    def add_prompts(self, prompts: list[Prompt], source: str) -> int:
        """Insert prompts (texts or conversations) not already known; returns how many were new."""
        now = time.time()
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO prompts(text, messages, source, created_at) VALUES (?, ?, ?, ?)",
                [(*prompt_row(p), source, now) for p in prompts],
            )
            conn.execute("COMMIT")
            return conn.total_changes - before

    def prompt_stats(self) -> list[sqlite3.Row]:
        """Every prompt of the shared pool with its vote count and both-bad count (prompts an
        annotator typed are theirs alone until an admin shares them)."""
        with self._conn() as conn:
            return conn.execute(
                """SELECT p.id, p.text, p.messages, p.source,
                          COUNT(v.id) AS votes,
                          SUM(CASE WHEN v.choice = 'both_bad' THEN 1 ELSE 0 END) AS both_bad
                   FROM prompts p
                   LEFT JOIN pairs pr ON pr.prompt_id = p.id
                   LEFT JOIN votes v ON v.pair_id = pr.id AND v.superseded_by IS NULL
                   WHERE p.owner IS NULL
                   GROUP BY p.id ORDER BY p.id"""
            ).fetchall()

    def private_prompts(self) -> list[dict[str, Any]]:
        """Prompts typed by annotators and not shared: id, text, owner, created_at; newest first."""
        with self._conn() as conn:
            rows = [dict(r) for r in conn.execute(
                "SELECT id, text, messages, owner, created_at FROM prompts WHERE owner IS NOT NULL ORDER BY id DESC")]
        for r in rows:  # a conversation is shown by its last message
            r["text"] = prompt_messages(r["text"], r.pop("messages"))[-1]["content"]
        return rows

    def share_prompt(self, prompt_id: int, by: str) -> bool:
        """Move a typed prompt into the shared pool (an admin's decision); False if it was not private."""
        with self._conn() as conn:
            changed = conn.execute("UPDATE prompts SET owner = NULL WHERE id = ? AND owner IS NOT NULL",
                                   (prompt_id,)).rowcount == 1
        if changed:
            logger.info("prompt %d moved into the shared pool by %s", prompt_id, by)
        return changed

    def prompts_seen_by(self, annotator: str) -> set[int]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT DISTINCT prompt_id FROM pairs WHERE annotator = ? AND prompt_id IS NOT NULL",
                (annotator,),
            ).fetchall()
        return {r[0] for r in rows}

    def prompt_id(self, prompt: Prompt, source: str = "annotator", owner: str | None = None) -> int:
        """The id of a prompt (a text or a conversation), inserting it if new. A prompt typed by an
        annotator is inserted as theirs (``owner``): the queue never serves it to anyone else. A
        prompt already known keeps its row (a prompt of the shared pool stays shared)."""
        text, messages = prompt_row(prompt)
        with self._conn() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO prompts(text, messages, source, created_at, owner) VALUES (?, ?, ?, ?, ?)",
                (text, messages, source, time.time(), owner),
            )
            return conn.execute("SELECT id FROM prompts WHERE text = ?", (text,)).fetchone()[0]

    # -- pairs and votes -----------------------------------------------------------------

    def issue_pair(
        self,
        *,
        annotator: str,
        prompt_id: int | None,
        messages: list[dict[str, str]],
        answer_left: str,
        answer_right: str,
        model_left: str,
        model_right: str,
        seed: int,
        params: dict[str, Any],
        timings: dict[str, Any],
        finish_reasons: tuple[str, str] = ("", ""),
    ) -> str:
        """Store a pair shown to ``annotator``; returns its token (the pair id). ``finish_reasons``
        are vLLM's per answer ("stop", or "length" when cut at max_tokens); "" stores NULL."""
        token = secrets.token_urlsafe(16)
        row = (token, annotator, prompt_id, json.dumps(messages), answer_left, answer_right,
               model_left, model_right, seed, json.dumps(params), json.dumps(timings), time.time(),
               finish_reasons[0] or None, finish_reasons[1] or None)
        self._writer.submit(lambda conn: conn.execute(
            """INSERT INTO pairs(id, annotator, prompt_id, messages, answer_left, answer_right,
                                 model_left, model_right, seed, params, timings, created_at,
                                 finish_left, finish_right)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", row))
        return token

    def get_pair(self, pair_id: str) -> StoredPair | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            return None
        return StoredPair(
            pair_id=row["id"], annotator=row["annotator"], messages=json.loads(row["messages"]),
            answer_left=row["answer_left"], answer_right=row["answer_right"],
            model_left=row["model_left"], model_right=row["model_right"], seed=row["seed"],
            params=json.loads(row["params"]), timings=json.loads(row["timings"]),
            created_at=row["created_at"], repeat_of=row["repeat_of"], repeat_swapped=bool(row["repeat_swapped"]),
            finish_reasons=(row["finish_left"] or "", row["finish_right"] or ""),
        )

    # -- repeats (agreement) and exclusions ------------------------------------------------

    def repeat_candidate(self, annotator: str) -> str | None:
        """A random pair a person (not an AI judge) voted on, not itself a repeat, that
        ``annotator`` has not been shown again yet: people's agreement is measured among people,
        and a judge's against people."""
        with self._conn() as conn:
            row = conn.execute(
                """SELECT p.id FROM pairs p JOIN votes v ON v.pair_id = p.id AND v.superseded_by IS NULL
                   LEFT JOIN prompts pr ON pr.id = p.prompt_id
                   WHERE p.repeat_of IS NULL AND v.judge = 0
                     AND (pr.owner IS NULL OR pr.owner = ?)
                     AND NOT EXISTS (SELECT 1 FROM pairs r WHERE r.repeat_of = p.id AND r.annotator = ?)
                   ORDER BY RANDOM() LIMIT 1""",
                (annotator, annotator),
            ).fetchone()
        return None if row is None else row[0]

    def issue_repeat(self, original_id: str, annotator: str, swap: bool) -> str:
        """Show a voted pair again to ``annotator`` (sides swapped or not); returns the new token.
        Its vote measures agreement and is not trained on."""
        token = secrets.token_urlsafe(16)
        left, right = ("answer_right", "answer_left") if swap else ("answer_left", "answer_right")
        mleft, mright = ("model_right", "model_left") if swap else ("model_left", "model_right")
        fleft, fright = ("finish_right", "finish_left") if swap else ("finish_left", "finish_right")
        self._writer.submit(lambda conn: conn.execute(
            f"""INSERT INTO pairs(id, annotator, prompt_id, messages, answer_left, answer_right, model_left,
                                  model_right, seed, params, timings, created_at, repeat_of, repeat_swapped,
                                  finish_left, finish_right)
                SELECT ?, ?, prompt_id, messages, {left}, {right}, {mleft}, {mright}, seed, params, timings, ?, id, ?,
                       {fleft}, {fright}
                FROM pairs WHERE id = ?""",
            (token, annotator, time.time(), int(swap), original_id)))
        return token

    def set_excluded(self, annotator: str, excluded: bool, by: str) -> None:
        """Leave a person's votes out of training (they are kept), or bring them back."""
        with self._conn() as conn:
            if excluded:
                conn.execute("INSERT OR IGNORE INTO excluded_annotators VALUES (?, ?, ?)", (annotator, by, time.time()))
            else:
                conn.execute("DELETE FROM excluded_annotators WHERE annotator = ?", (annotator,))
        logger.info("annotator %s %s by %s", annotator, "excluded from training" if excluded else "included", by)

    def excluded_annotators(self) -> set[str]:
        with self._conn() as conn:
            return {r[0] for r in conn.execute("SELECT annotator FROM excluded_annotators")}

    def open_pair(self, annotator: str, max_age_s: float = 6 * 3600) -> StoredPair | None:
        """The annotator's newest pair that has neither a vote nor a skip (resumed after a reload)."""
        with self._conn() as conn:
            row = conn.execute(
                """SELECT p.id FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id
                   WHERE p.annotator = ? AND v.id IS NULL AND p.skipped_at IS NULL AND p.created_at > ?
                   ORDER BY p.created_at DESC LIMIT 1""",
                (annotator, time.time() - max_age_s),
            ).fetchone()
        return None if row is None else self.get_pair(row[0])

    def skip_pair(self, pair_id: str, annotator: str) -> None:
        self._writer.submit(lambda conn: conn.execute(
            "UPDATE pairs SET skipped_at = ? WHERE id = ? AND annotator = ?", (time.time(), pair_id, annotator)))

    def record_vote(self, pair_id: str, annotator: str, choice: Choice | str, reason: str | None = None,
                    guideline: str | None = None, judge_orders: str | None = None) -> int:
        """Commit a vote and return its id; replaying the same token returns the same id. ``reason``:
        the annotator's optional words on why (at most MAX_REASON_CHARS); ``guideline``: the version
        of the guidelines shown when it was cast. A vote of a judge account is marked as a judge's
        here, from the judges table, whatever the caller says; ``judge_orders`` (a judge's two
        verdicts, "left,right") is accepted from a judge account only."""
        choice = choice if isinstance(choice, Choice) else Choice.parse(choice)
        reason = (reason or "").strip() or None
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise VoteRejected(f"the reason is {len(reason)} characters; keep it under {MAX_REASON_CHARS}")
        orders = (judge_orders or "").strip() or None
        if orders is not None:
            parts = [Choice.parse(x.strip().lower()).value for x in orders.split(",")]
            if len(parts) != 2 or any(x not in ("left", "right", "tie") for x in parts):
                raise VoteRejected("orders is two verdicts (left, right or tie) separated by a comma, "
                                   "e.g. 'left,right'")
            if choice.value != (parts[0] if parts[0] == parts[1] else "tie"):
                raise VoteRejected(f"orders {parts[0]},{parts[1]} make the vote "
                                   f"{parts[0] if parts[0] == parts[1] else 'tie'}, not {choice.value}")
            orders = ",".join(parts)

        def write(conn: sqlite3.Connection) -> tuple[int, bool]:  # inside the batch's transaction
            pair = conn.execute("SELECT annotator, created_at FROM pairs WHERE id = ?", (pair_id,)).fetchone()
            if pair is None:
                raise VoteRejected(f"unknown pair {pair_id!r}; ask for a new pair with /next_pair")
            if pair["annotator"] != annotator:
                raise VoteRejected(f"pair {pair_id!r} was issued to another annotator; ask for your own")
            existing = conn.execute("SELECT id, choice FROM votes WHERE pair_id = ? AND superseded_by IS NULL",
                                    (pair_id,)).fetchone()
            if existing is not None:
                if existing["choice"] == choice.value:
                    return existing["id"], False  # a replay: the same vote
                taken = conn.execute("SELECT id FROM rounds WHERE watermark >= ? ORDER BY id LIMIT 1",
                                     (existing["id"],)).fetchone()
                if taken is not None:
                    raise VoteRejected(f"your vote on pair {pair_id!r} ({existing['choice']}) was taken by round "
                                       f"{taken['id']} already; it can no longer change")
                # The old vote steps aside (kept, marked by the new id below); the new one counts.
                conn.execute("UPDATE votes SET superseded_by = 0 WHERE id = ?", (existing["id"],))
            judge = conn.execute("SELECT 1 FROM judges WHERE name = ?", (annotator,)).fetchone() is not None
            if orders is not None and not judge:
                raise VoteRejected("only a judge account sends the verdicts of both orders; ask an admin to mark "
                                   "this account as a judge")
            now = time.time()
            cur = conn.execute(
                "INSERT INTO votes(pair_id, annotator, choice, latency_ms, created_at, reason, guideline, judge, "
                "judge_orders) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, annotator, choice.value, int((now - pair["created_at"]) * 1000), now, reason, guideline,
                 int(judge), orders),
            )
            if existing is not None:
                conn.execute("UPDATE votes SET superseded_by = ? WHERE id = ?", (cur.lastrowid, existing["id"]))
            if guideline is not None:
                conn.execute("INSERT OR IGNORE INTO guideline_reads(annotator, version, read_at) VALUES (?, ?, ?)",
                             (annotator, guideline, now))
            return cur.lastrowid, True

        vote_id, new = self._writer.submit(write)
        if new:
            logger.info("vote %d pair=%s annotator=%s choice=%s", vote_id, pair_id, annotator, choice.value)
        return vote_id

    # -- guidelines -----------------------------------------------------------------------

    def add_guidelines(self, text: str) -> str:
        """Store a version of the annotation guidelines; returns its version (the text's hash)."""
        version = hashlib.sha256(text.strip().encode()).hexdigest()[:12]
        with self._conn() as conn:
            conn.execute("INSERT OR IGNORE INTO guidelines(version, text, created_at) VALUES (?, ?, ?)",
                         (version, text.strip(), time.time()))
        return version

    def guidelines(self) -> list[dict[str, Any]]:
        """Every version of the guidelines, oldest first, with the votes cast under each."""
        with self._conn() as conn:
            return [dict(r) for r in conn.execute(
                "SELECT g.version, g.text, g.created_at, "
                "(SELECT COUNT(*) FROM votes v WHERE v.guideline = g.version AND v.superseded_by IS NULL) AS votes "
                "FROM guidelines g ORDER BY g.created_at, g.version")]

    def has_read_guidelines(self, annotator: str, version: str) -> bool:
        """Whether this person has voted under this version (their first vote marks it read)."""
        with self._conn() as conn:
            return conn.execute("SELECT 1 FROM guideline_reads WHERE annotator = ? AND version = ?",
                                (annotator, version)).fetchone() is not None

    def agreement_of(self, annotator: str) -> tuple[int, int]:
        """(agreed, compared): this person's current votes against another person's on the same pair
        shown again (as the original's voter or the repeat's), sides mapped back when swapped; AI
        judges' votes are not a person's."""
        with self._conn() as conn:
            rows = conn.execute(
                """SELECT o.choice, r.choice, rp.repeat_swapped
                   FROM pairs rp
                   JOIN votes r ON r.pair_id = rp.id AND r.superseded_by IS NULL
                   JOIN votes o ON o.pair_id = rp.repeat_of AND o.superseded_by IS NULL
                   WHERE (o.annotator = ? OR r.annotator = ?) AND o.annotator != r.annotator
                     AND o.judge = 0 AND r.judge = 0""",
                (annotator, annotator)).fetchall()
        agreed = sum(1 for orig, rep, sw in rows if (SWAPPED[rep] if sw else rep) == orig)
        return agreed, len(rows)

    def current_choice(self, pair_id: str) -> str | None:
        """The choice of the pair's current vote (None: not voted)."""
        with self._conn() as conn:
            row = conn.execute("SELECT choice FROM votes WHERE pair_id = ? AND superseded_by IS NULL",
                               (pair_id,)).fetchone()
        return None if row is None else row[0]

    def vote_history(self, pair_id: str) -> list[tuple[int, str, int | None]]:
        """Every vote cast on a pair, oldest first: (vote id, choice, the id that superseded it)."""
        with self._conn() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT id, choice, superseded_by FROM votes WHERE pair_id = ? ORDER BY id", (pair_id,))]

    def vote_notes(self, vote_id: int) -> tuple[str | None, str | None]:
        """(reason, guideline version) of a vote."""
        with self._conn() as conn:
            row = conn.execute("SELECT reason, guideline FROM votes WHERE id = ?", (vote_id,)).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def count_votes(self, since: int = 0, usable_only: bool = False) -> int:
        """Votes with id greater than ``since`` (a watermark); ``usable_only``: those a round trains
        on: not both-bad (it says nothing about the order), not a repeat, not an excluded person's,
        and a judge's only where the judge is included, or while rounds bootstrap on judges (then
        judges' only): the rule of storage.pairs.training_rows, in SQL."""
        extra = ""
        if usable_only:
            extra = USABLE_SQL + (" AND v.judge = 1" if self.bootstrapping() else TRAINED_JUDGE_SQL)
        with self._conn() as conn:
            return conn.execute(
                f"SELECT COUNT(*) FROM votes v JOIN pairs p ON p.id = v.pair_id "
                f"WHERE v.id > ? AND v.superseded_by IS NULL{extra}", (since,)
            ).fetchone()[0]

    def count_log_rows(self, since: int = 0) -> int:
        """Rows of the vote log after ``since``, changed votes included (what the export stages):
        a range over the primary key, cheap at any size."""
        with self._conn() as conn:
            return conn.execute("SELECT COUNT(*) FROM votes WHERE id > ?", (since,)).fetchone()[0]

    def counts_by_choice(self) -> dict[str, int]:
        with self._conn() as conn:
            return {r[0]: r[1] for r in conn.execute(
                "SELECT choice, COUNT(*) FROM votes WHERE superseded_by IS NULL GROUP BY choice")}

    def count_votes_by(self, annotator: str, since_ts: float = 0.0) -> int:
        with self._conn() as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM votes WHERE annotator = ? AND created_at >= ? AND superseded_by IS NULL",
                (annotator, since_ts)
            ).fetchone()[0]

    def max_vote_id(self) -> int:
        with self._conn() as conn:
            return conn.execute("SELECT COALESCE(MAX(id), 0) FROM votes").fetchone()[0]

    def votes_with_pairs(self, after: int = 0, upto: int | None = None,
                         superseded: bool = False) -> list[dict[str, Any]]:
        """Votes joined with their pairs, oldest first, for ``after < vote id <= upto``: the current
        vote of each pair (an annotator's latest), and with ``superseded`` also the ones it replaced."""
        upto = self.max_vote_id() if upto is None else upto
        with self._conn() as conn:
            rows = conn.execute(
                """SELECT v.id AS vote_id, v.pair_id, v.annotator, v.choice, v.latency_ms,
                          v.created_at, p.messages, p.answer_left, p.answer_right,
                          p.model_left, p.model_right, p.seed, p.params, p.repeat_of, p.repeat_swapped,
                          p.finish_left, p.finish_right,
                          x.annotator IS NOT NULL AS excluded, v.superseded_by, v.reason, v.guideline,
                          v.judge, COALESCE(j.trained, 0) AS judge_trained, v.judge_orders
                   FROM votes v JOIN pairs p ON p.id = v.pair_id
                   LEFT JOIN excluded_annotators x ON x.annotator = v.annotator
                   LEFT JOIN judges j ON j.name = v.annotator
                   WHERE v.id > ? AND v.id <= ? AND (? OR v.superseded_by IS NULL) ORDER BY v.id""",
                (after, upto, int(superseded)),
            ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["messages"] = json.loads(d["messages"])
            d["params"] = json.loads(d["params"])
            out.append(d)
        return out

    def vote_facts(self) -> list[dict[str, Any]]:
        """The current votes without their texts, oldest first: what the Admin tab's figures read
        (who, what, between which versions, how fast; repeats and exclusions). A fraction of
        ``votes_with_pairs``' cost: no prompts, answers or JSON."""
        with self._conn() as conn:
            return [dict(r) for r in conn.execute(
                """SELECT v.id AS vote_id, v.pair_id, v.annotator, v.choice, v.latency_ms, v.created_at,
                          p.model_left, p.model_right, p.repeat_of, p.repeat_swapped,
                          x.annotator IS NOT NULL AS excluded,
                          v.judge, COALESCE(j.trained, 0) AS judge_trained, v.judge_orders
                   FROM votes v JOIN pairs p ON p.id = v.pair_id
                   LEFT JOIN excluded_annotators x ON x.annotator = v.annotator
                   LEFT JOIN judges j ON j.name = v.annotator
                   WHERE v.superseded_by IS NULL ORDER BY v.id""")]

    # -- judges and API tokens -------------------------------------------------------------

    def set_judge(self, name: str, judge: bool, by: str, trained: bool = False) -> None:
        """Mark an account as an AI judge (its votes are a judge's from now on), with whether its
        votes train; or unmark it (its past votes stay a judge's)."""
        with self._conn() as conn:
            if judge:
                conn.execute("INSERT INTO judges(name, trained, changed_by, changed_at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET trained = excluded.trained, "
                             "changed_by = excluded.changed_by, changed_at = excluded.changed_at",
                             (name, int(trained), by, time.time()))
            else:
                conn.execute("DELETE FROM judges WHERE name = ?", (name,))
        logger.info("%s %s by %s", name, (f"is a judge ({'trained on' if trained else 'not trained on'})"
                                          if judge else "is no longer a judge"), by)

    def judges(self) -> dict[str, bool]:
        """Judge accounts -> whether their votes train."""
        with self._conn() as conn:
            return {r[0]: bool(r[1]) for r in conn.execute("SELECT name, trained FROM judges ORDER BY name")}

    def is_judge(self, name: str) -> bool:
        with self._conn() as conn:
            return conn.execute("SELECT 1 FROM judges WHERE name = ?", (name,)).fetchone() is not None

    def judge_bootstrap(self) -> int:
        """Rounds train on judges' votes until this many usable votes of people exist (0: never)."""
        return int(self.get_setting(JUDGE_BOOTSTRAP, "0") or 0)

    def set_judge_bootstrap(self, votes: int) -> None:
        if votes < 0:
            raise StorageError("the bootstrap's number of people's votes is 0 (off) or more")
        self.set_setting(JUDGE_BOOTSTRAP, str(int(votes)))

    def people_usable_votes(self) -> int:
        """Current votes of people (not judges) a round could train on."""
        with self._conn() as conn:
            return conn.execute("SELECT COUNT(*) FROM votes v JOIN pairs p ON p.id = v.pair_id "
                                f"WHERE v.superseded_by IS NULL AND v.judge = 0{USABLE_SQL}").fetchone()[0]

    def bootstrapping(self) -> bool:
        """Whether the next round trains on judges' votes (storage.pairs.training_rows)."""
        n = self.judge_bootstrap()
        return n > 0 and self.people_usable_votes() < n

    def issue_token(self, name: str, by: str) -> str:
        """A new API token for ``name`` (returned once; only its SHA-256 is kept)."""
        token = "pl_" + secrets.token_urlsafe(32)
        with self._conn() as conn:
            conn.execute("INSERT INTO api_tokens(name, digest, created_by, created_at) VALUES (?, ?, ?, ?)",
                         (name, token_digest(token), by, time.time()))
        logger.info("API token issued for %s by %s", name, by)
        return token

    def revoke_tokens(self, name: str, by: str) -> int:
        """Revoke every live token of ``name``; returns how many."""
        with self._conn() as conn:
            n = conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                             (time.time(), name)).rowcount
        logger.info("%d API tokens of %s revoked by %s", n, name, by)
        return n

    def token_name(self, token: str) -> str | None:
        """The name a live token is bound to, or None (unknown or revoked)."""
        if not token.startswith("pl_") or len(token) > 100:
            return None
        with self._conn() as conn:
            row = conn.execute("SELECT id, name, used_at FROM api_tokens WHERE digest = ? AND revoked_at IS NULL",
                               (token_digest(token),)).fetchone()
            now = time.time()
            if row is not None and (row["used_at"] is None or now - row["used_at"] > 60):  # a write a minute at most
                conn.execute("UPDATE api_tokens SET used_at = ? WHERE id = ?", (now, row["id"]))
        return None if row is None else row["name"]

    def tokens(self) -> list[dict[str, Any]]:
        """Live tokens, without their secrets: name, who issued it, when, last used."""
        with self._conn() as conn:
            return [dict(r) for r in conn.execute(
                "SELECT id, name, created_by, created_at, used_at FROM api_tokens WHERE revoked_at IS NULL "
                "ORDER BY id")]

    # -- people --------------------------------------------------------------------------

    def note_person(self, key: str, name: str, admin: bool) -> None:
        """Remember who ``key`` is (the name shown for it) and whether they are an admin."""
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO people(key, name, admin, seen_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET name = excluded.name, admin = excluded.admin, "
                "seen_at = excluded.seen_at",
                (key, name, int(admin), time.time()),
            )

    def people(self) -> dict[str, str]:
        """key -> name shown, for everyone who signed in."""
        with self._conn() as conn:
            return {r[0]: r[1] for r in conn.execute("SELECT key, name FROM people")}

    def admin_keys(self) -> set[str]:
        """Keys of the people who were admins when last seen (a round does not cap their share)."""
        with self._conn() as conn:
            return {r[0] for r in conn.execute("SELECT key FROM people WHERE admin = 1")}

    def bind_name(self, name: str, key: str) -> str:
        """Bind a name from the admin or annotator list to the first account key seen with it;
        returns the bound key. The account keeps what the name gave it after a rename, and an
        account that later carries the name is not given it."""
        with self._conn() as conn:
            conn.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)", (f"name_account:{name}", key))
            return conn.execute("SELECT value FROM settings WHERE key = ?", (f"name_account:{name}",)).fetchone()[0]

    def bound_key(self, name: str) -> str | None:
        """The account key a listed name is bound to, if it was seen."""
        return self.get_setting(f"name_account:{name}")

    def sync_admins(self, names: set[str]) -> None:
        """At start: nobody whose name is no longer an admin keeps the admin mark."""
        with self._conn() as conn:
            rows = conn.execute("SELECT key, name FROM people WHERE admin = 1").fetchall()
            for key, name in rows:
                if name not in names:
                    conn.execute("UPDATE people SET admin = 0 WHERE key = ?", (key,))

    def annotator_salt(self) -> str:
        """The salt that hashes annotator names in every export and push: $PREFLOOP_ANNOTATOR_SALT,
        else one random salt per data dir, made on first use and kept, so that the app and the
        command line give a person the same id, and the id cannot be guessed from the name."""
        salt = os.environ.get(ANNOTATOR_SALT_ENV) or self.get_setting(SALT_KEY)
        if not salt:
            salt = secrets.token_hex(16)
            with self._conn() as conn:  # first writer wins: two processes agree on one salt
                conn.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)", (SALT_KEY, salt))
            salt = self.get_setting(SALT_KEY) or salt
        return salt

    # -- settings (small key/value state, e.g. the serving adapter) ----------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self._conn() as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO settings(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
