"""SQLite connection (WAL, synchronous=FULL) and numbered, append-only migrations.

Each migration is a function ``mNNNN_name(conn)``; the list is only ever appended to.
``PRAGMA user_version`` records how many have run.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from storage.errors import StorageError

logger = logging.getLogger(__name__)


def _run(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, which would break the migration's transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def m0001_initial(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        """
        CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            text TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE pairs (
            id TEXT PRIMARY KEY,              -- the pair token handed to the annotator
            annotator TEXT NOT NULL,
            prompt_id INTEGER REFERENCES prompts(id),
            messages TEXT NOT NULL,           -- JSON list of chat messages (the prompt)
            answer_left TEXT NOT NULL,
            answer_right TEXT NOT NULL,
            model_left TEXT NOT NULL,
            model_right TEXT NOT NULL,
            seed INTEGER NOT NULL,
            params TEXT NOT NULL,             -- JSON sampling parameters
            timings TEXT NOT NULL,            -- JSON per-side ttft/total seconds
            created_at REAL NOT NULL
        );
        CREATE INDEX pairs_annotator ON pairs(annotator);
        CREATE TABLE votes (
            id INTEGER PRIMARY KEY,
            pair_id TEXT NOT NULL UNIQUE REFERENCES pairs(id),
            annotator TEXT NOT NULL,
            choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
            latency_ms INTEGER,
            created_at REAL NOT NULL
        );
        CREATE TABLE rounds (
            id INTEGER PRIMARY KEY,
            status TEXT NOT NULL,             -- running | promoted | rejected | failed
            watermark INTEGER NOT NULL,       -- votes with id <= watermark were used
            adapter TEXT,                     -- served name, e.g. round-0001
            reason TEXT,
            pid INTEGER,
            started_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """
    )


def m0002_seed_pairs(conn: sqlite3.Connection) -> None:
    # Preference pairs imported from an existing dataset (warm start); kept apart from votes.
    _run(
        conn,
        """
        CREATE TABLE seed_pairs (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            prompt TEXT NOT NULL,             -- JSON list of messages
            chosen TEXT NOT NULL,             -- JSON list with one assistant message
            rejected TEXT NOT NULL,
            imported_at REAL NOT NULL,
            UNIQUE (source, prompt, chosen, rejected)
        )
        """,
    )


def m0003_pair_skipped(conn: sqlite3.Connection) -> None:
    # A pair the annotator skipped is not resumed after a page reload.
    conn.execute("ALTER TABLE pairs ADD COLUMN skipped_at REAL")


def m0004_repeats_and_exclusions(conn: sqlite3.Connection) -> None:
    # A share of pairs is shown again (to the same or another person) to measure agreement: a
    # repeat points at its original and says whether its sides were swapped. Admins may exclude a
    # person's votes from training; the votes are kept.
    _run(
        conn,
        """
        ALTER TABLE pairs ADD COLUMN repeat_of TEXT REFERENCES pairs(id);
        ALTER TABLE pairs ADD COLUMN repeat_swapped INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX pairs_repeat_of ON pairs(repeat_of);
        CREATE TABLE excluded_annotators (
            annotator TEXT PRIMARY KEY,
            excluded_by TEXT NOT NULL,
            excluded_at REAL NOT NULL
        );
        """,
    )


def m0005_finish_reasons(conn: sqlite3.Connection) -> None:
    # Why each answer ended, as vLLM said: "stop" (the model ended its turn) or "length" (cut at
    # max_tokens). A cut answer is trained without the turn end it never produced. NULL: not
    # recorded (pairs from before this migration), trained as before, as if it had ended.
    _run(
        conn,
        """
        ALTER TABLE pairs ADD COLUMN finish_left TEXT;
        ALTER TABLE pairs ADD COLUMN finish_right TEXT;
        """,
    )


def m0006_people_private_prompts_round_votes(conn: sqlite3.Connection) -> None:
    # people: who has signed in (key = what votes are stored under: a users-file name, or
    # "hf:<OpenID sub>", stable across renames; name = what is shown) and who is an admin.
    # prompts.owner: a prompt an annotator typed stays theirs (NULL: the shared pool) until an
    # admin shares it; earlier typed prompts belong to whoever first asked about them.
    # round_votes: which votes each round trained on; a vote trained by a promoted round is
    # consumed, the rest (new, or held back by the per-person cap) wait for a later round. Earlier
    # promoted rounds trained on every vote up to their watermark.
    _run(
        conn,
        """
        CREATE TABLE people (
            key TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            admin INTEGER NOT NULL DEFAULT 0,
            seen_at REAL NOT NULL
        );
        ALTER TABLE prompts ADD COLUMN owner TEXT;
        UPDATE prompts SET owner = (SELECT annotator FROM pairs WHERE pairs.prompt_id = prompts.id
                                    ORDER BY created_at LIMIT 1)
            WHERE source = 'annotator';
        CREATE INDEX prompts_owner ON prompts(owner);
        CREATE TABLE round_votes (
            round_id INTEGER NOT NULL REFERENCES rounds(id),
            vote_id INTEGER NOT NULL REFERENCES votes(id),
            PRIMARY KEY (round_id, vote_id)
        );
        CREATE INDEX round_votes_vote ON round_votes(vote_id);
        INSERT INTO round_votes(round_id, vote_id)
            SELECT (SELECT MIN(r.id) FROM rounds r WHERE r.status = 'promoted' AND r.watermark >= v.id), v.id
            FROM votes v
            WHERE v.id <= (SELECT COALESCE(MAX(watermark), 0) FROM rounds WHERE status = 'promoted');
        """,
    )


def m0007_published_rounds(conn: sqlite3.Connection) -> None:
    # Where a promoted round's adapter was published: the Hub model repo and the tagged revision.
    _run(
        conn,
        """
        ALTER TABLE rounds ADD COLUMN published_repo TEXT;
        ALTER TABLE rounds ADD COLUMN published_revision TEXT;
        """,
    )


def m0008_guidelines_and_reasons(conn: sqlite3.Connection) -> None:
    # The annotation guidelines, one row per version (the text's hash), which version each person
    # has read, and with each vote: the version it was cast under and an optional short reason.
    _run(
        conn,
        """
        CREATE TABLE guidelines (
            version TEXT PRIMARY KEY,
            text TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE guideline_reads (
            annotator TEXT NOT NULL,
            version TEXT NOT NULL REFERENCES guidelines(version),
            read_at REAL NOT NULL,
            PRIMARY KEY (annotator, version)
        );
        ALTER TABLE votes ADD COLUMN reason TEXT;
        ALTER TABLE votes ADD COLUMN guideline TEXT;
        """,
    )


def m0009_votes_can_be_superseded(conn: sqlite3.Connection) -> None:
    # An annotator may change a vote until a round has snapshotted it: the new vote is a new row
    # (a new id, so the next round sees it), and the old one stays, marked with the id that
    # superseded it. One current vote per pair (a partial unique index) instead of UNIQUE(pair_id);
    # SQLite changes a constraint by rebuilding the table (migrate() turns foreign keys off around
    # it and checks them before the commit).
    _run(
        conn,
        """
        CREATE TABLE votes_new (
            id INTEGER PRIMARY KEY,
            pair_id TEXT NOT NULL REFERENCES pairs(id),
            annotator TEXT NOT NULL,
            choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
            latency_ms INTEGER,
            created_at REAL NOT NULL,
            reason TEXT,
            guideline TEXT,
            superseded_by INTEGER
        );
        INSERT INTO votes_new(id, pair_id, annotator, choice, latency_ms, created_at, reason, guideline)
            SELECT id, pair_id, annotator, choice, latency_ms, created_at, reason, guideline FROM votes;
        DROP TABLE votes;
        ALTER TABLE votes_new RENAME TO votes;
        CREATE UNIQUE INDEX votes_current_per_pair ON votes(pair_id) WHERE superseded_by IS NULL;
        CREATE INDEX votes_pair ON votes(pair_id);
        CREATE INDEX votes_annotator ON votes(annotator, created_at);
        """,
    )


def m0010_conversation_prompts(conn: sqlite3.Connection) -> None:
    # A prompt may be a conversation (a system prompt, earlier turns, the user's last message):
    # its messages as JSON, NULL for a single user message (the text alone). Its text is then the
    # canonical JSON of the messages, so a conversation is known once, like a text.
    _run(conn, "ALTER TABLE prompts ADD COLUMN messages TEXT;")


def m0011_judges_and_tokens(conn: sqlite3.Connection) -> None:
    # judges: accounts whose votes are an AI judge's (by annotator key); ``trained``: an admin let
    # this judge's votes train. votes.judge: cast by a judge (decided by the server when the vote
    # was written, so a later change of role does not rewrite the log); votes.judge_orders: the
    # judge's verdicts with the answers in the order shown and swapped, both mapped to the shown
    # sides ("left,right": it picked the first answer both times). api_tokens: tokens an admin
    # issued for scripts where there are no passwords, stored as their SHA-256, each bound to one
    # name. rounds.votes_kind: which votes a round trained on (people, judge, people+judge).
    _run(
        conn,
        """
        CREATE TABLE judges (
            name TEXT PRIMARY KEY,
            trained INTEGER NOT NULL DEFAULT 0,
            changed_by TEXT NOT NULL,
            changed_at REAL NOT NULL
        );
        ALTER TABLE votes ADD COLUMN judge INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE votes ADD COLUMN judge_orders TEXT;
        CREATE TABLE api_tokens (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL,
            used_at REAL
        );
        ALTER TABLE rounds ADD COLUMN votes_kind TEXT;
        """,
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m0001_initial, m0002_seed_pairs, m0003_pair_skipped, m0004_repeats_and_exclusions, m0005_finish_reasons,
    m0006_people_private_prompts_round_votes, m0007_published_rounds, m0008_guidelines_and_reasons,
    m0009_votes_can_be_superseded, m0010_conversation_prompts, m0011_judges_and_tokens,
]


def create_private(path: Path) -> None:
    """Create an empty database file readable by its owner only. SQLite gives its -wal and -shm
    files the database file's permissions, so they are private too."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"cannot create database {path}: {e.strerror}; check the path and its permissions") from e


def damaged(path: Path, detail: str) -> str:
    return (f"the vote log {path} is damaged ({detail}). Stop PrefLoop, keep a copy of the file, then "
            f"recover what SQLite can read: `sqlite3 {path} .recover | sqlite3 recovered.db` and start "
            "PrefLoop with that file in place of the damaged one (or restore a backup, or pull the votes "
            "back from the Hub dataset)")


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """SQLite's quick_check (pages, records and indexes are well formed); StorageError if not."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:
        raise StorageError(damaged(path, str(e))) from e
    if rows != ["ok"]:
        raise StorageError(damaged(path, "; ".join(rows)[:300]))


def connect(path: Path | str) -> sqlite3.Connection:
    """Open the database with durable settings; every acknowledged commit is on disk."""
    try:
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as e:
        raise StorageError(f"cannot open database {path}: {e}; check the path and its permissions") from e
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Run the migrations not yet applied; returns the schema version. Foreign keys are off while
    they run (SQLite's way to rebuild a table) and checked in full before the commit."""
    conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set before BEGIN
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StorageError(
                f"database schema version {version} is newer than this PrefLoop knows "
                f"({len(MIGRATIONS)}); upgrade PrefLoop"
            )
        pending = MIGRATIONS[version:]
        before = len(conn.execute("PRAGMA foreign_key_check").fetchall()) if pending and version else 0
        for n, fn in enumerate(pending, start=version + 1):
            logger.info("migration %04d %s", n, fn.__name__)
            fn(conn)
            conn.execute(f"PRAGMA user_version={n}")
        broken = conn.execute("PRAGMA foreign_key_check").fetchall() if pending else []
        if len(broken) > before:
            raise StorageError(f"a migration left {len(broken) - before} rows pointing at nothing (e.g. "
                               f"{tuple(broken[-1])}); the database is unchanged")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
    return len(MIGRATIONS)
