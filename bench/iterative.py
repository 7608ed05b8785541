"""Several rounds of the loop, on-policy, without the browser: how the defaults hold up round after round.

Each round, a scripted annotator (the one of tests/test_closed_loop.py: the shorter answer wins,
within 20 characters a tie) votes on pairs that vLLM samples from the model being served, as the
app would; then a real round runs (`trainer.rounds.Rounds`, the app's gate), and a promoted
adapter is loaded into vLLM and served. After each round the served model answers 12 prompts
never voted on, 3 seeds each, against the base and against the model served before the round,
judged by the same annotator without noise. It prints, per round: the verdict, held-out accuracy,
KL to the reference, distinct bigrams of the answers, mean answer length and the two win rates.

Annotators who disagree: ``--flip-rates 0,0.15,0.3`` runs the loop once per share, the annotators
flipping that share of their votes at random (left and right swapped, a tie turned into a side at
random; both-bad kept), as real annotators disagree with each other (two people agreed on 63% of
MT-Bench pairs, 81% without ties). The served model is still judged by the noiseless annotator.

    .venv/bin/python bench/iterative.py                              # 3 rounds x 64 votes, app defaults
    .venv/bin/python bench/iterative.py --flip-rates 0,0.15,0.3      # the same loop with noisy annotators
    .venv/bin/python bench/iterative.py --continue-learning-rate 3e-4   # later rounds at round 1's rate

About 5 minutes per round on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
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


def answers(engine: Engine, model: str, prompts: list[str], seeds: int, params: SamplingParams
            ) -> list[tuple[str, bool]]:
    """One answer per (prompt, seed), the first of a sampled pair, with whether it was cut."""
    jobs = [(q, 7000 + 10 * i + s) for i, q in enumerate(prompts) for s in range(seeds)]
    name = vllm_model(engine, model)

    def one(job):
        q, seed = job
        pair = sample_pair(engine, [{"role": "user", "content": q}], params, seed=seed, model=name)
        return pair.answers[0], pair.finish_reasons[0] == "length"

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, jobs))


def win_rate(mine: list[tuple[str, bool]], theirs: list[tuple[str, bool]]) -> tuple[float, str]:
    votes = [prefers(a, b, cut_a, cut_b) for (a, cut_a), (b, cut_b) in zip(mine, theirs, strict=True)]
    votes = [v for v in votes if v != "both_bad"] or ["tie"]  # both cut: neither is shorter
    won, lost, tied = votes.count("left"), votes.count("right"), votes.count("tie")
    return (won + tied / 2) / len(votes), f"{won}/{lost}/{tied}"


def flip(verdict: str, rate: float, rng: random.Random) -> str:
    """A noisy annotator: with probability ``rate`` the other side (a tie: a side at random)."""
    if verdict == "both_bad" or rng.random() >= rate:
        return verdict
    return {"left": "right", "right": "left"}.get(verdict) or rng.choice(["left", "right"])


def run(args, rate: float, data: Path, base: str, params: SamplingParams, cfg: RoundConfig, prompts: list[str]
        ) -> list[dict]:
    """The loop for one flip rate, on its own data dir and vLLM server."""
    data.mkdir(parents=True, exist_ok=True)
    store = VoteStore(data / "votes.db")
    rounds = Rounds(store, data, base)
    engine = Engine.launch(EngineConfig(model=base, log_path=data / "vllm.log"))
    served, rows = BASE, []
    rng = random.Random(f"flips-{args.vote_seed}-{rate}")
    try:
        heldout = [args.prompt_prefix + q for q in HELDOUT]
        before = answers(engine, served, heldout, args.seeds, params)
        base_answers = before
        for r in range(1, args.rounds + 1):
            t0 = time.time()
            batch = [args.prompt_prefix + prompts[(i + (r - 1) * args.min_new_votes) % len(prompts)]
                     for i in range(args.min_new_votes)]
            flips = [rng.random() for _ in batch]  # drawn up front: the same whatever order the threads finish

            def vote(job, r=r, served=served, flips=flips):
                i, q = job
                msgs = [{"role": "user", "content": q}]
                seed = 100_000 * r + i + 1_000_000 * args.vote_seed
                pair = sample_pair(engine, msgs, params, seed=seed, model=vllm_model(engine, served))
                left, right = pair.answers
                cut = tuple(f == "length" for f in pair.finish_reasons)
                truth = prefers(left, right, *cut)
                said = flip(truth, rate, random.Random(flips[i]))
                pid = store.issue_pair(
                    annotator=f"ann{i % 8}", prompt_id=store.prompt_id(q), messages=msgs, answer_left=left,
                    answer_right=right, model_left=served, model_right=served, seed=pair.seed, params={},
                    timings={}, finish_reasons=pair.finish_reasons)
                store.record_vote(pid, f"ann{i % 8}", said)
                return truth, said

            with ThreadPoolExecutor(8) as pool:
                cast = list(pool.map(vote, enumerate(batch)))
            sampled_s = time.time() - t0
            manifest = rounds.run(cfg)  # continues what the serving record names
            m = manifest.get("metrics", {})
            if manifest["status"] == "promoted":
                engine.load_adapter(manifest["adapter"], rounds.adapters / manifest["adapter"])
                served = manifest["adapter"]
                ServingLog(store).record([*ServingLog(store).history(), served])
            now = answers(engine, served, heldout, args.seeds, params)
            vs_base, vb = win_rate(now, base_answers)
            vs_prev, vp = win_rate(now, before)
            row = {
                "flip_rate": rate, "round": r, "verdict": manifest["status"], "reason": manifest.get("reason", ""),
                "init": "previous" if manifest.get("init") else "base",
                "learning_rate": manifest["learning_rate"],
                "flipped": sum(t != s for t, s in cast), "usable": sum(s != "both_bad" for _, s in cast),
                "train_pairs": manifest["train_pairs"], "heldout_pairs": m.get("heldout_pairs"),
                "heldout_correct": m.get("heldout_correct"), "kl_per_token": m.get("kl_per_token"),
                "distinct_2": statistics.mean(distinct_n(a) for a, _ in now),
                "mean_chars": statistics.mean(len(a) for a, _ in now),
                "win_vs_base": vs_base, "win_vs_base_wlt": vb, "win_vs_previous": vs_prev, "win_vs_previous_wlt": vp,
                "seconds": time.time() - t0, "sampling_seconds": sampled_s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            before = now
    finally:
        engine.close()
    print(f"\nbase: distinct-2 {statistics.mean(distinct_n(a) for a, _ in base_answers):.2f}, "
          f"mean {statistics.mean(len(a) for a, _ in base_answers):.0f} chars")
    return rows


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
    p.add_argument("--prompt-prefix", default="In one or two sentences: ",
                   help="put before every prompt, voted or held out: answers that finish within --max-tokens "
                   "carry a preference (two cut answers are both bad to this annotator)")
    p.add_argument("--flip-rates", default="0", help="comma-separated shares of votes the annotators flip at "
                   "random, one run each (e.g. 0,0.15,0.3)")
    p.add_argument("--data-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the per-round figures here")
    args = parse(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "collector.sampling"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    root = args.data_dir or Path(tempfile.mkdtemp(prefix="prefloop-iterative-"))
    base = str(embedded_model(ROOT / "data"))
    params = from_flags(SamplingParams, args)
    cfg = from_flags(RoundConfig, args, train=from_flags(TrainConfig, args))
    prompts = read_prompt_file(BUNDLED)
    assert not set(HELDOUT) & set(prompts)
    rows = []
    for rate in (float(x) for x in args.flip_rates.split(",")):
        rows += run(args, rate, root / f"flip-{rate:g}", base, params, cfg, prompts)
    print("| flips | round | init | lr | verdict | votes flipped | held-out | KL/token | distinct-2 | chars | vs base "
          "| vs previous |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in rows:
        held = f"{x['heldout_correct']}/{x['heldout_pairs']}" if x["heldout_correct"] is not None else "-"
        kl = f"{x['kl_per_token']:.3f}" if x["kl_per_token"] is not None else "-"
        print(f"| {x['flip_rate']:.0%} | {x['round']} | {x['init']} | {x['learning_rate']:g} | {x['verdict']} | "
              f"{x['flipped']}/{x['usable']} | {held} | {kl} | {x['distinct_2']:.2f} | {x['mean_chars']:.0f} | "
              f"{x['win_vs_base']:.2f} ({x['win_vs_base_wlt']}) | {x['win_vs_previous']:.2f} "
              f"({x['win_vs_previous_wlt']}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
