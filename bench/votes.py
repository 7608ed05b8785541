"""Acknowledged votes per second and acknowledgement latency, for 1, 10 and 50 concurrent
writers on one SQLite vote log (WAL, synchronous=FULL). Goal: p99 < 50 ms at 50 writers.

    .venv/bin/python bench/votes.py [--votes-per-writer 40] [--crashes 0]

With --crashes N it also SIGKILLs a writer process N times and checks every acknowledged vote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.votes import VoteStore  # noqa: E402


def run(writers: int, per_writer: int, db: Path) -> tuple[float, list[float]]:
    store = VoteStore(db)
    pairs = [[store.issue_pair(annotator=f"w{w}", prompt_id=None, messages=[{"role": "user", "content": "q"}],
                               answer_left="a", answer_right="b", model_left="base", model_right="base",
                               seed=i, params={}, timings={}) for i in range(per_writer)] for w in range(writers)]
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        mine = []
        start.wait()
        for pid in pairs[w]:
            t0 = time.perf_counter()
            store.record_vote(pid, f"w{w}", "left")
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return writers * per_writer / (time.perf_counter() - t0), latencies


def crash_check(crashes: int) -> None:
    import random
    import signal
    import subprocess

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "votes.db"
        acked: dict[str, int] = {}
        for _ in range(crashes):
            p = subprocess.Popen([sys.executable, str(root / "tests" / "vote_writer.py"), str(db), "4"],
                                 stdout=subprocess.PIPE, text=True)
            time.sleep(random.uniform(0.3, 1.0))
            p.send_signal(signal.SIGKILL)
            out, _ = p.communicate()
            acked.update({x.split()[1]: int(x.split()[2]) for x in out.splitlines() if x.startswith("ACK ")})
        import sqlite3

        conn = sqlite3.connect(db)
        rows = dict(conn.execute("SELECT pair_id, id FROM votes").fetchall())
        lost = sum(1 for k, v in acked.items() if rows.get(k) != v)
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        print(f"crash check: {crashes} SIGKILLs, {len(acked)} acknowledged votes, {lost} lost, integrity {ok}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--votes-per-writer", type=int, default=40)
    p.add_argument("--crashes", type=int, default=0)
    args = p.parse_args()
    print(f"{'writers':>8} {'votes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for writers in (1, 10, 50):
        with tempfile.TemporaryDirectory() as d:
            rate, lat = run(writers, args.votes_per_writer, Path(d) / "votes.db")
        q = statistics.quantiles([x * 1000 for x in lat], n=100)
        print(f"{writers:>8} {rate:>9.0f} {q[49]:>8.1f} {q[98]:>8.1f} {max(lat) * 1000:>8.1f}")
    if args.crashes:
        crash_check(args.crashes)


if __name__ == "__main__":
    main()
