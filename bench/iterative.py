"""Several rounds of the loop, on-policy, without the browser: how the defaults hold up round after round.

Each round, a scripted annotator (the one of tests/test_closed_loop.py: the shorter answer wins,
within 20 characters a tie) votes on pairs that vLLM samples from the model being served, as the
app would; then a real round runs (`trainer.rounds.Rounds`, the app's gate), and a promoted
adapter is loaded into vLLM and served. After each round the served model answers 12 prompts
never voted on, 3 seeds each, against the base and against the model served before the round,
judged by the same annotator. It prints, per round: the verdict, held-out accuracy, KL to the
reference, distinct bigrams of the answers, mean answer length and the two win rates.

    .venv/bin/python bench/iterative.py                              # 3 rounds x 64 votes, app defaults
    .venv/bin/python bench/iterative.py --continue-learning-rate 3e-4   # later rounds at round 1's rate

About 12 minutes per round on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, embedded_model

from collector.engine import BASE, Engine, EngineConfig
from collector.prompts import BUNDLED, read_prompt_file
from collector.sampling import SamplingParams, sample_pair
from storage.flags import add_flags, from_flags, parse
from storage.serving import ServingLog
from storage.votes import VoteStore
from tests.test_closed_loop import HELDOUT, prefers
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig, Rounds, distinct_n
from trainer.schedule import ScheduleConfig


def vllm_model(engine: Engine, served: str) -> str | None:
    """What to ask vLLM for: None is the engine's serving default (the base here)."""
    return None if served == BASE else engine.vllm_name(served)


def answers(engine: Engine, model: str, prompts: list[str], seeds: int, params: SamplingParams) -> list[str]:
    """One answer per (prompt, seed), the first of a sampled pair."""
    jobs = [(q, 7000 + 10 * i + s) for i, q in enumerate(prompts) for s in range(seeds)]
    name = vllm_model(engine, model)

    def one(job):
        q, seed = job
        return sample_pair(engine, [{"role": "user", "content": q}], params, seed=seed, model=name).answers[0]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, jobs))


def win_rate(mine: list[str], theirs: list[str]) -> tuple[float, str]:
    votes = [prefers(a, b) for a, b in zip(mine, theirs, strict=True)]
    won, lost, tied = votes.count("left"), votes.count("right"), votes.count("tie")
    return (won + tied / 2) / len(votes), f"{won}/{lost}/{tied}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    add_flags(p, ScheduleConfig, only=["min_new_votes"])  # votes per round
    add_flags(p, SamplingParams, only=["max_tokens"])
    p.set_defaults(max_tokens=96)  # the closed-loop test's answers: rounds in minutes on CPU
    add_flags(p, RoundConfig, exclude=("promote",))
    add_flags(p, TrainConfig)
    p.add_argument("--seeds", type=int, default=3, help="seeds per held-out prompt")
    p.add_argument("--vote-seed", type=int, default=0, help="another draw of the voted pairs (0: the README's)")
    p.add_argument("--data-dir", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the per-round figures here")
    args = parse(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "collector.sampling"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    data = args.data_dir or Path(tempfile.mkdtemp(prefix="prefloop-iterative-"))
    data.mkdir(parents=True, exist_ok=True)
    base = str(embedded_model(ROOT / "data"))
    params = from_flags(SamplingParams, args)
    store = VoteStore(data / "votes.db")
    rounds = Rounds(store, data, base)
    cfg = from_flags(RoundConfig, args, train=from_flags(TrainConfig, args))
    prompts = read_prompt_file(BUNDLED)
    assert not set(HELDOUT) & set(prompts)
    engine = Engine.launch(EngineConfig(model=base, log_path=data / "vllm.log"))
    served, rows = BASE, []
    try:
        before = answers(engine, served, HELDOUT, args.seeds, params)
        base_answers = before
        for r in range(1, args.rounds + 1):
            t0 = time.time()
            batch = [prompts[(i + (r - 1) * args.min_new_votes) % len(prompts)] for i in range(args.min_new_votes)]
            def vote(job, r=r, served=served):
                i, q = job
                msgs = [{"role": "user", "content": q}]
                seed = 100_000 * r + i + 1_000_000 * args.vote_seed
                pair = sample_pair(engine, msgs, params, seed=seed, model=vllm_model(engine, served))
                left, right = pair.answers
                pid = store.issue_pair(
                    annotator=f"ann{i % 8}", prompt_id=store.prompt_id(q), messages=msgs, answer_left=left,
                    answer_right=right, model_left=served, model_right=served, seed=pair.seed, params={},
                    timings={})
                store.record_vote(pid, f"ann{i % 8}", prefers(left, right))

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(vote, enumerate(batch)))
            sampled_s = time.time() - t0
            manifest = rounds.run(cfg)  # continues what the serving record names
            m = manifest.get("metrics", {})
            if manifest["status"] == "promoted":
                engine.load_adapter(manifest["adapter"], rounds.adapters / manifest["adapter"])
                served = manifest["adapter"]
                ServingLog(store).record([*ServingLog(store).history(), served])
            now = answers(engine, served, HELDOUT, args.seeds, params)
            vs_base, vb = win_rate(now, base_answers)
            vs_prev, vp = win_rate(now, before)
            row = {
                "round": r, "verdict": manifest["status"], "reason": manifest.get("reason", ""),
                "init": "previous" if manifest.get("init") else "base",
                "learning_rate": manifest["learning_rate"],
                "train_pairs": manifest["train_pairs"], "heldout_pairs": m.get("heldout_pairs"),
                "heldout_correct": m.get("heldout_correct"), "kl_per_token": m.get("kl_per_token"),
                "distinct_2": statistics.mean(distinct_n(a) for a in now),
                "mean_chars": statistics.mean(len(a) for a in now),
                "win_vs_base": vs_base, "win_vs_base_wlt": vb, "win_vs_previous": vs_prev, "win_vs_previous_wlt": vp,
                "seconds": time.time() - t0, "sampling_seconds": sampled_s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            before = now
    finally:
        engine.close()
    print(f"\nbase: distinct-2 {statistics.mean(distinct_n(a) for a in base_answers):.2f}, "
          f"mean {statistics.mean(len(a) for a in base_answers):.0f} chars")
    print("| round | init | lr | verdict | held-out | KL/token | distinct-2 | chars | vs base | vs previous |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in rows:
        held = f"{x['heldout_correct']}/{x['heldout_pairs']}" if x["heldout_correct"] is not None else "-"
        kl = f"{x['kl_per_token']:.3f}" if x["kl_per_token"] is not None else "-"
        print(f"| {x['round']} | {x['init']} | {x['learning_rate']:g} | {x['verdict']} | {held} | {kl} | "
              f"{x['distinct_2']:.2f} | {x['mean_chars']:.0f} | {x['win_vs_base']:.2f} ({x['win_vs_base_wlt']}) | "
              f"{x['win_vs_previous']:.2f} ({x['win_vs_previous_wlt']}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
