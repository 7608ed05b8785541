"""An acknowledged vote is never lost: SIGKILL a writer at random moments, 24 times.

    .venv/bin/python -m pytest tests/test_votes_durable.py
"""

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from storage.votes import VoteStore
from tests.conftest import ROOT


def test_acknowledged_votes_survive_sigkill_exactly_once(tmp_path):
    db = tmp_path / "votes.db"
    rng = random.Random(20261121)
    acked: dict[str, int] = {}
    for _ in range(24):
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "vote_writer.py"), str(db), "4"],
                                stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(iter(p.stdout.readline, "")))
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:  # let it reach a steady state first
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        for line in lines:
            if line.startswith("ACK "):
                _, pid, vid = line.split()
                acked[pid] = int(vid)
        # After each restart: everything acknowledged so far is there, exactly once.
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = dict(conn.execute("SELECT pair_id, id FROM votes").fetchall())
            total = conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        assert total == len(rows)  # one vote per pair
        missing = {p: v for p, v in acked.items() if rows.get(p) != v}
        assert missing == {}
    assert len(acked) > 24 * 4  # the test did exercise many writes
    # A replayed acknowledgement after all the crashes is still the same vote.
    store = VoteStore(db)
    pid, vid = next(iter(acked.items()))
    pair = store.get_pair(pid)
    choice = sqlite3.connect(db).execute("SELECT choice FROM votes WHERE id = ?", (vid,)).fetchone()[0]
    assert store.record_vote(pid, pair.annotator, choice) == vid
