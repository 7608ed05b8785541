"""One Admin tab refresh at 10k, 100k and 1M votes: the first (the figures computed from every
vote, inline), the next ones (read back until the log changes), one right after a new vote
(where the full pass took over ui.admin.INLINE_FIGURES_S, it runs in the background and the
refresh shows the last figures), and that background pass. Goal: under 200 ms at 100k.

    .venv/bin/python bench/admin_refresh.py [--sizes 10000 100000 1000000]

The log is written straight into SQLite (one transaction: a million votes through the vote API
would take an hour and measure the writer, which bench/votes.py does); 40 annotators, 3 versions,
a third of the pairs arena pairs, 3% repeats, 2 people excluded. Everything the refresh reads is
the real thing (store, rounds, scheduler, Hub status, access rules) except the serving pointer,
a stand-in: no vLLM is needed to read which version is served.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.users import Access  # noqa: E402
from storage.hub import HubSync  # noqa: E402
from storage.votes import VoteStore  # noqa: E402
from trainer.rounds import RoundConfig, Rounds  # noqa: E402
from trainer.schedule import ScheduleConfig, Scheduler  # noqa: E402
from ui import admin as admin_ui  # noqa: E402

VERSIONS = ["base", "round-0001", "round-0002"]


def fill(db: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    VoteStore(db)  # the schema, by the store's own migrations
    conn = sqlite3.connect(db)
    t0 = time.time() - n
    pairs, votes = [], []
    messages = json.dumps([{"role": "user", "content": "How do I keep a houseplant alive if I travel often?"}])
    for i in range(n):
        who = f"annotator-{rng.randrange(40):02d}"
        arena = rng.random() < 1 / 3
        left, right = (rng.sample(VERSIONS, 2) if arena else [VERSIONS[-1]] * 2)
        repeat = f"p{rng.randrange(i)}" if i > 10 and rng.random() < 0.03 else None
        pairs.append((f"p{i}", who, messages, "Water it before you go, and group plants together.",
                      "Ask a neighbour, or use a self-watering pot.", left, right, i, "{}", "{}", t0 + i,
                      repeat, int(bool(repeat) and rng.random() < 0.5), "stop", "length"))
        votes.append((i + 1, f"p{i}", who, rng.choice(["left", "left", "right", "tie", "both_bad"]),
                      rng.randrange(2000, 60000), t0 + i + 1))
    with conn:
        conn.executemany(
            "INSERT INTO pairs(id, annotator, prompt_id, messages, answer_left, answer_right, model_left, model_right,"
            " seed, params, timings, created_at, repeat_of, repeat_swapped, finish_left, finish_right)"
            " VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", pairs)
        conn.executemany("INSERT INTO votes(id, pair_id, annotator, choice, latency_ms, created_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)", votes)
    conn.close()


def admin_for(folder: Path) -> tuple[admin_ui.Admin, VoteStore]:
    store = VoteStore(folder / "votes.db")
    for who in ("annotator-00", "annotator-01"):
        store.set_excluded(who, True, by="admin")
    rounds = Rounds(store, folder, "base-model")
    access = Access("password", store, admins={"admin"})
    admin = admin_ui.Admin(
        store=store, rounds=rounds, scheduler=Scheduler(rounds, RoundConfig(), ScheduleConfig(), lambda names: None),
        serving=SimpleNamespace(current="round-0002"), hub=HubSync(store, folder / "hub", None, None),
        access=access, exports=folder / "exports")
    return admin, store


def timed(admin: admin_ui.Admin, request) -> float:
    t = time.perf_counter()
    admin_ui.view(admin, request)
    return (time.perf_counter() - t) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = p.parse_args()
    request = SimpleNamespace(username="admin", session_hash="s", request=None, headers={}, client=None)
    print(f"{'votes':>9} | {'fill s':>6} | {'first refresh ms':>16} | {'next (median of 5) ms':>21} | "
          f"{'after a new vote ms':>19} | {'full pass s':>11}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            t = time.time()
            fill(folder / "votes.db", n)
            filled = time.time() - t
            admin, store = admin_for(folder)
            first = timed(admin, request)
            warm = statistics.median(timed(admin, request) for _ in range(5))
            pid = store.issue_pair(annotator="admin", prompt_id=None, messages=[{"role": "user", "content": "q"}],
                                   answer_left="a", answer_right="b", model_left="base", model_right="round-0002",
                                   seed=1, params={}, timings={})
            store.record_vote(pid, "admin", "left")
            after = timed(admin, request)
            while admin.figures_cache.get("computing"):
                time.sleep(0.05)
            full = admin.figures_cache["seconds"]
            print(f"{n:>9,} | {filled:>6.1f} | {first:>16.0f} | {warm:>21.1f} | {after:>19.0f} | {full:>11.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
