"""The rounds log: one row per round (running, awaiting, promoted, rejected, failed), and which
votes each round trained on. ``trainer.rounds`` runs rounds; this module owns their records.

Statuses: ``running``; ``awaiting`` (passed the gate, its adapter written, waiting for an admin
under manual promotion); ``promoted``; ``rejected`` (by the gate or an admin); ``failed``.
A vote is *consumed* once a promoted round trained on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from storage.votes import VoteStore

RUNNING, AWAITING, PROMOTED, REJECTED, FAILED = "running", "awaiting", "promoted", "rejected", "failed"


class RoundLog:
    """Named reads and writes of the ``rounds`` and ``round_votes`` tables of one vote store."""

    def __init__(self, store: VoteStore):
        self.store = store

    def start(self, watermark: int, pid: int, votes_kind: str | None = None) -> int:
        """A running round; ``votes_kind``: which votes it trains on (storage.pairs: people, judge,
        people+judge; "dataset" for a warm start)."""
        with self.store._conn() as conn:
            cur = conn.execute("INSERT INTO rounds(status, watermark, pid, started_at, votes_kind) "
                               "VALUES (?, ?, ?, ?, ?)", (RUNNING, watermark, pid, time.time(), votes_kind))
            return int(cur.lastrowid)

    def set_pid(self, round_id: int, pid: int) -> None:
        with self.store._conn() as conn:
            conn.execute("UPDATE rounds SET pid = ? WHERE id = ? AND status = ?", (pid, round_id, RUNNING))

    def finish(self, round_id: int, status: str, reason: str, adapter: str | None,
               vote_ids: Iterable[int] = ()) -> None:
        """Record a verdict, and the votes the round trained on (they count as consumed once the
        round is promoted), in one transaction."""
        with self.store._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE rounds SET status = ?, reason = ?, adapter = ?, finished_at = ? WHERE id = ?",
                         (status, reason, adapter, time.time(), round_id))
            conn.executemany("INSERT OR IGNORE INTO round_votes(round_id, vote_id) VALUES (?, ?)",
                             [(round_id, v) for v in vote_ids if v > 0])
            conn.execute("COMMIT")

    def decide(self, round_id: int, status: str, reason: str) -> bool:
        """Move an awaiting round to ``promoted`` or ``rejected``; False if it was not awaiting."""
        with self.store._conn() as conn:
            cur = conn.execute("UPDATE rounds SET status = ?, reason = ? WHERE id = ? AND status = ?",
                               (status, reason, round_id, AWAITING))
            return cur.rowcount == 1

    def get(self, round_id: int) -> dict[str, Any] | None:
        with self.store._conn() as conn:
            row = conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        return None if row is None else dict(row)

    def all(self, status: str | None = None) -> list[dict[str, Any]]:
        """Rounds, oldest first (only those with ``status`` when given)."""
        q = "SELECT * FROM rounds" + (" WHERE status = ?" if status else "") + " ORDER BY id"
        with self.store._conn() as conn:
            return [dict(r) for r in conn.execute(q, (status,) if status else ()).fetchall()]

    def last_watermark(self) -> int:
        """The watermark of the newest promoted round (0: none)."""
        with self.store._conn() as conn:
            row = conn.execute("SELECT MAX(watermark) FROM rounds WHERE status = ?", (PROMOTED,)).fetchone()
        return row[0] or 0

    def last_attempt_watermark(self, judges: bool | None = None) -> int:
        """The watermark of the newest finished round, whatever its verdict; ``judges`` True: of a
        round on the judges' votes alone (a bootstrap round), False: of any other."""
        kind = "" if judges is None else (" AND votes_kind IS 'judge'" if judges else " AND votes_kind IS NOT 'judge'")
        with self.store._conn() as conn:
            row = conn.execute(f"SELECT MAX(watermark) FROM rounds WHERE status != ?{kind}", (RUNNING,)).fetchone()
        return row[0] or 0

    def consumed_votes(self) -> set[int]:
        """Votes a promoted round trained on."""
        with self.store._conn() as conn:
            return {r[0] for r in conn.execute(
                "SELECT rv.vote_id FROM round_votes rv JOIN rounds r ON r.id = rv.round_id WHERE r.status = ?",
                (PROMOTED,))}

    def trained_votes(self, round_id: int) -> list[int]:
        with self.store._conn() as conn:
            return [r[0] for r in conn.execute(
                "SELECT vote_id FROM round_votes WHERE round_id = ? ORDER BY vote_id", (round_id,))]

    def mark_published(self, round_id: int, repo: str, revision: str) -> None:
        with self.store._conn() as conn:
            conn.execute("UPDATE rounds SET published_repo = ?, published_revision = ? WHERE id = ?",
                         (repo, revision, round_id))

    def published(self, round_id: int) -> tuple[str, str] | None:
        """(repo, revision) where a round was published, or None."""
        row = self.get(round_id)
        return (row["published_repo"], row["published_revision"]) if row and row["published_revision"] else None

    def fail_dead(self, alive: Callable[[int | None], bool], reason: str) -> list[int]:
        """Mark ``running`` rounds whose process is not alive as failed; returns their ids."""
        failed = []
        with self.store._conn() as conn:
            for row in conn.execute("SELECT id, pid FROM rounds WHERE status = ?", (RUNNING,)).fetchall():
                if not alive(row["pid"]):
                    conn.execute("UPDATE rounds SET status = ?, reason = ?, finished_at = ? WHERE id = ?",
                                 (FAILED, reason, time.time(), row["id"]))
                    failed.append(row["id"])
        return failed
