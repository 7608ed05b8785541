"""The closed loop, end to end: votes through the API make the served model better in the eyes of
the same annotator.

Eight scripted annotators with one checkable preference (the shorter answer wins) vote through
`/next_pair` and `/vote` on the real app; the schedule starts one IPO round by itself; the gate
promotes it and the app hot-swaps it into vLLM. Then, on prompts that were never voted on, the
served adapter and the base answer with the same seeds, and the same annotator judges: the
adapter must win clearly.

    .venv/bin/python -m pytest tests/test_closed_loop.py
"""

import json
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from collector.sampling import SamplingParams, sample_pair
from storage.serving import ServingLog
from storage.votes import VoteStore
from tests.conftest import RunningApp

USABLE_VOTES = 48  # the round starts at this many votes it can train on (not both_bad)
MAX_PAIRS = 400  # a bound on the voting, in case the answers stopped finishing
ANNOTATORS = [f"ann{i}" for i in range(1, 9)]  # 8 at once: vLLM batches them
MAX_TOKENS = 96
# Two answers cut at the limit say nothing about which one is shorter, so the annotator calls them
# both bad (not trained on) and votes until 48 pairs have a finished answer in them: votes on cut
# answers judged by characters are noise, and rounds on them won anywhere from 0.69 to 0.92.
# The floor catches a round that barely moves the policy.
MIN_WIN_RATE = 0.75
# One round from the base on ~50 votes trains at 6e-4, not the app's 3e-4 (tuned for rounds of 64
# and more): at 3e-4 a weak draw barely moves (KL 0.026 nats/token); at 6e-4 the same votes win
# 0.85 in the same round time, with no repetition on the strongest draw (docs/experiments.md).
LEARNING_RATE = 6e-4
HELDOUT = [  # not in collector/prompts.txt: the round never saw them
    "Describe your favourite season.", "How do I stay motivated to exercise?", "What makes a good friend?",
    "Explain how a bicycle works.", "Give advice for a first day at a new school.",
    "What is the best way to learn to draw?", "Why do people like music?", "How should I prepare for a long flight?",
    "What are good habits for saving money?", "Tell me about elephants.", "How do I write a good email?",
    "What should I cook for a picnic?",
]


def prefers(left: str, right: str, cut_left: bool, cut_right: bool) -> str:
    """The scripted annotator: the shorter answer wins. An answer cut at the token limit is longer
    than any finished one; two cut answers are both bad (neither is short); two finished answers
    within 20 characters tie."""
    if cut_left and cut_right:
        return "both_bad"
    if cut_left != cut_right:
        return "right" if cut_left else "left"
    if abs(len(left) - len(right)) < 20:
        return "tie"
    return "left" if len(left) < len(right) else "right"


def test_votes_through_the_api_make_the_served_adapter_win_on_held_out_prompts(engine, smollm2_dir, tmp_path):
    from collector.prompts import BUNDLED, read_prompt_file

    assert not set(HELDOUT) & set(read_prompt_file(BUNDLED))
    app = RunningApp(tmp_path / "data", engine, smollm2_dir, users=ANNOTATORS, extra=[
        "--round-every-votes", str(USABLE_VOTES), "--max-tokens", str(MAX_TOKENS), "--arena-rate", "0",
        "--learning-rate", str(LEARNING_RATE)])  # otherwise the default IPO round
    try:
        lock = threading.Lock()
        cast: list[str] = []  # verdicts

        def annotate(user: str) -> None:
            client = app.client(user)
            while True:
                with lock:
                    if sum(v != "both_bad" for v in cast) >= USABLE_VOTES or len(cast) >= MAX_PAIRS:
                        return
                pair = app.call(client, "", api_name="/next_pair")
                verdict = prefers(pair["left"], pair["right"], pair["cut_left"], pair["cut_right"])
                app.call(client, pair["pair_id"], verdict, api_name="/vote")
                with lock:
                    cast.append(verdict)

        t0 = time.time()
        with ThreadPoolExecutor(len(ANNOTATORS)) as pool:
            list(pool.map(annotate, ANNOTATORS))
        db = sqlite3.connect(app.data_dir / "votes.db")
        choices = dict(db.execute("SELECT choice, COUNT(*) FROM votes GROUP BY choice").fetchall())
        assert sum(choices.values()) == len(cast)
        assert len(cast) - choices.get("both_bad", 0) >= USABLE_VOTES, f"{len(cast)} pairs: {choices}"
        print(f"\n{len(cast)} votes in {time.time() - t0:.0f} s: {choices}")

        # The schedule starts the round by itself; wait for its verdict and the hot-swap.
        deadline = time.time() + 1200  # ~26 steps: about 5 min here, twice that on a slow day
        while time.time() < deadline:
            row = db.execute("SELECT status, adapter, reason FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
            serving = ServingLog(VoteStore(app.data_dir / "votes.db")).history()
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
        assert manifest["learning_rate"] == LEARNING_RATE  # a first round: the from-base rate

        # Held-out prompts: the served adapter against the base, same seed per comparison. This
        # process's engine handle learns the adapter's vLLM name (same files, same name: no reload).
        engine.load_adapter(adapter, app.data_dir / "adapters" / adapter)
        def compare(job: tuple[int, str]) -> tuple[tuple[str, str], tuple[bool, bool]]:
            i, prompt = job
            pair = sample_pair(engine, [{"role": "user", "content": prompt}],
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9), seed=7000 + i,
                               models=(adapter, "base"))
            assert pair.models == (adapter, "base")
            return pair.answers, tuple(f == "length" for f in pair.finish_reasons)

        jobs = list(enumerate(p for p in HELDOUT for _ in range(3)))
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: a chunked seeded prefill is safe (vllm_plugin)
            results = list(pool.map(compare, jobs))
        verdicts = [prefers(*answers, *cut) for answers, cut in results]
        wins, losses = verdicts.count("left"), verdicts.count("right")
        neither = len(verdicts) - wins - losses  # ties and both cut: half a win each
        win_rate = (wins + neither / 2) / len(verdicts)
        mean_adapter = statistics.mean(len(answers[0]) for answers, _ in results)
        mean_base = statistics.mean(len(answers[1]) for answers, _ in results)
        finished = [sum(not cut[i] for _, cut in results) for i in (0, 1)]
        print(f"held out: adapter {wins} wins, base {losses}, neither {neither}: win rate {win_rate:.2f}; "
              f"finished {finished[0]} vs {finished[1]} of {len(results)}; mean length {mean_adapter:.0f} vs "
              f"{mean_base:.0f} characters; total {time.time() - t0:.0f} s")
        assert win_rate >= MIN_WIN_RATE
        assert mean_adapter < mean_base
    finally:
        app.stop()
