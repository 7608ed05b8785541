"""Crash-test writer: votes from several threads, each printed as `ACK <pair> <vote>` only after
record_vote returned (the vote is committed). Killed with SIGKILL by tests/test_votes_durable.py.

    python tests/vote_writer.py DB THREADS
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.votes import VoteStore  # noqa: E402


def main() -> None:
    store = VoteStore(sys.argv[1])
    out = threading.Lock()

    def work(t: int) -> None:
        n = 0
        while True:
            n += 1
            who = f"writer-{t}"
            pid = store.issue_pair(
                annotator=who, prompt_id=None, messages=[{"role": "user", "content": f"q {t} {n}"}],
                answer_left="a", answer_right="b", model_left="base", model_right="base", seed=n,
                params={}, timings={})
            vid = store.record_vote(pid, who, ("left", "right", "tie", "both_bad")[n % 4])
            with out:
                sys.stdout.write(f"ACK {pid} {vid}\n")
                sys.stdout.flush()

    for t in range(int(sys.argv[2])):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
