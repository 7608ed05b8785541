"""The closed loop, end to end: votes through the API make the served model better in the eyes of
the same annotator.

Eight scripted annotators with one checkable preference (the shorter answer wins; within 20
characters it is a tie) vote through `/next_pair` and `/vote` on the real app; the schedule starts
one IPO round by itself; the gate promotes it and the app hot-swaps it into vLLM. Then, on prompts
that were never voted on, the served adapter and the base answer with the same seeds, and the
same annotator judges: the adapter must win clearly.

    .venv/bin/python -m pytest tests/test_closed_loop.py
"""

import json
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from collector.sampling import SamplingParams, sample_pair
from tests.conftest import RunningApp

VOTES = 96
ANNOTATORS = [f"ann{i}" for i in range(1, 9)]  # 8 at once: vLLM batches them
MAX_TOKENS = 96
# Measured on this machine (README, "Rounds"): one round on 64 such votes won 0.65 to 0.96 of the
# 36 held-out comparisons depending on the draw (most 96-token answers are cut, and two cut answers
# judged by length say little), hence 96 votes. 96 still spreads: three fresh runs won 0.85, 0.78
# and 0.72 (README, "One round on 96 votes"), so this test fails on a share of draws until rounds
# learn more per vote. The floor stays: a round that barely moves the policy is what it catches.
MIN_WIN_RATE = 0.75
HELDOUT = [  # not in collector/prompts.txt: the round never saw them
    "Describe your favourite season.", "How do I stay motivated to exercise?", "What makes a good friend?",
    "Explain how a bicycle works.", "Give advice for a first day at a new school.",
    "What is the best way to learn to draw?", "Why do people like music?", "How should I prepare for a long flight?",
    "What are good habits for saving money?", "Tell me about elephants.", "How do I write a good email?",
    "What should I cook for a picnic?",
]


def prefers(left: str, right: str) -> str:
    """The scripted annotator: shorter is better; within 20 characters, a tie."""
    if abs(len(left) - len(right)) < 20:
        return "tie"
    return "left" if len(left) < len(right) else "right"


def test_votes_through_the_api_make_the_served_adapter_win_on_held_out_prompts(engine, smollm2_dir, tmp_path):
    from collector.prompts import BUNDLED, read_prompt_file

    assert not set(HELDOUT) & set(read_prompt_file(BUNDLED))
    app = RunningApp(tmp_path / "data", engine, smollm2_dir, users=ANNOTATORS, extra=[
        "--round-every-votes", str(VOTES), "--max-tokens", str(MAX_TOKENS), "--arena-rate", "0"])  # default IPO
    try:
        lock = threading.Lock()
        cast: list[str] = []

        def annotate(user: str) -> None:
            client = app.client(user)
            while True:
                with lock:
                    if len(cast) >= VOTES:
                        return
                    cast.append(user)
                pair = app.call(client, "", api_name="/next_pair")
                app.call(client, pair["pair_id"], prefers(pair["left"], pair["right"]), api_name="/vote")

        t0 = time.time()
        with ThreadPoolExecutor(len(ANNOTATORS)) as pool:
            list(pool.map(annotate, ANNOTATORS))
        db = sqlite3.connect(app.data_dir / "votes.db")
        choices = dict(db.execute("SELECT choice, COUNT(*) FROM votes GROUP BY choice").fetchall())
        assert sum(choices.values()) == VOTES
        print(f"\n{VOTES} votes in {time.time() - t0:.0f} s: {choices}")

        # The schedule starts the round by itself; wait for its verdict and the hot-swap.
        deadline = time.time() + 1200  # 56-58 steps: about 8 min here, twice that on a slow day
        while time.time() < deadline:
            row = db.execute("SELECT status, adapter, reason FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
            serving = json.loads((db.execute("SELECT value FROM settings WHERE key = 'serving_history'")
                                  .fetchone() or ["[]"])[0])
            if row and row[0] != "running" and (row[0] != "promoted" or row[1] in serving):
                break
            time.sleep(2)
        status, adapter, reason = row
        assert status == "promoted", reason
        assert serving[-1] == adapter
        manifest = json.loads((app.data_dir / "rounds" / f"{adapter}.json").read_text())
        metrics = manifest["metrics"]
        print(f"round {adapter} after {time.time() - t0:.0f} s: {reason}; steps {metrics['steps']}, "
              f"train loss {metrics['train_loss']:.3f}, KL/token {metrics.get('kl_per_token', 0):.4f}")
        assert manifest["config"]["train"]["beta"] == 0.5

        # Held-out prompts: the served adapter against the base, same seed per comparison. This
        # process's engine handle learns the adapter's vLLM name (same files, same name: no reload).
        engine.load_adapter(adapter, app.data_dir / "adapters" / adapter)
        def compare(job: tuple[int, str]) -> tuple[str, str]:
            i, prompt = job
            pair = sample_pair(engine, [{"role": "user", "content": prompt}],
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9), seed=7000 + i,
                               models=(adapter, "base"))
            assert pair.models == (adapter, "base")
            return pair.answers

        jobs = list(enumerate(p for p in HELDOUT for _ in range(3)))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(compare, jobs))
        verdicts = [prefers(a, b) for a, b in answers]
        wins, losses, ties = (verdicts.count(v) for v in ("left", "right", "tie"))
        win_rate = (wins + ties / 2) / len(verdicts)
        mean_adapter = statistics.mean(len(a) for a, _ in answers)
        mean_base = statistics.mean(len(b) for _, b in answers)
        print(f"held out: adapter {wins} wins, base {losses}, ties {ties}: win rate {win_rate:.2f}; "
              f"mean length {mean_adapter:.0f} vs {mean_base:.0f} characters; total {time.time() - t0:.0f} s")
        assert win_rate >= MIN_WIN_RATE
        assert mean_adapter < mean_base
    finally:
        app.stop()
