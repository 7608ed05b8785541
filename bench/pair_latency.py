"""Pairs per minute and time to first token for 1, 4 and 8 concurrent annotators, side by side:

  - merged: PrefLoop's --serving merged: a round's adapter merged into the base and reloaded in
    place; ordinary pairs on the merged weights, arena pairs (at --arena-rate) against the base
    through a LoRA delta;
  - lora: --serving lora: every pair through the adapter, arena pairs against the base;
  - ceiling: a vLLM server started without --enable-lora, the base model only, with the same
    request shapes (an arena pair's two n=1 requests both on the base);
  - transformers+peft: `generate` with the adapter, num_return_sequences=2 (one process, sequential).

Same prompts everywhere, n=2 x 128 tokens, every answer forced to full length; pairs are made as
the app makes them (Serving's lease and routes, collector.sampling.PairStream).

    .venv/bin/python bench/pair_latency.py
    .venv/bin/python bench/pair_latency.py --modes merged --concurrency 8 --skip-transformers
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import PROMPTS, bench_model, round_adapter

from collector.annotate import AnnotateConfig
from collector.engine import BASE, Engine, EngineConfig
from collector.sampling import PairStream, SamplingParams
from collector.serving import Serving
from storage.votes import VoteStore

TOKENS = 128


class ForcedLength(SamplingParams):
    def request(self) -> dict:
        return {**super().request(), "ignore_eos": True, "min_tokens": self.max_tokens}


def one_pair(serving: Serving, messages: list[dict], params: SamplingParams, seed: int, rng: random.Random,
             arena_rate: float, ceiling: bool = False) -> float:
    """A pair as collector.annotate makes it; returns its time to first token."""
    with serving.lease():
        models = None
        if rng.random() < arena_rate:
            # the ceiling (no versions to compare) gets an arena pair's shape: two n=1 requests on the base
            opponent = BASE if ceiling else serving.arena_opponent(rng)
            models = (serving.current, opponent) if opponent is not None else None
        stream = PairStream(serving.engine, messages, params, seed, model=serving.current, models=models,
                            route=serving.route)
        for _ in stream:
            pass
    return min(stream.pair.ttft_s)


def serving_path(serving: Serving, concurrency: int, pairs_each: int, arena_rate: float,
                 ceiling: bool = False) -> tuple[float, float]:
    params = ForcedLength(max_tokens=TOKENS)
    ttfts: list[float] = []
    lock = threading.Lock()

    def annotator(i: int) -> None:
        rng = random.Random(i)
        for k in range(pairs_each):
            msgs = [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]
            t = one_pair(serving, msgs, params, 1000 * i + k, rng, arena_rate, ceiling)
            with lock:
                ttfts.append(t)

    one_pair(serving, [{"role": "user", "content": "warm up"}], ForcedLength(max_tokens=8), 0, random.Random(0), 1.0,
             ceiling)
    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    minutes = (time.perf_counter() - t0) / 60
    return concurrency * pairs_each / minutes, statistics.median(ttfts)


def transformers_path(base: Path, adapter: Path, pairs: int) -> tuple[float, float]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    model.eval()
    t0 = time.perf_counter()
    ttfts = []
    for k in range(pairs):
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        s = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=1, do_sample=True, num_return_sequences=2)
            ttfts.append(time.perf_counter() - s)
            model.generate(**ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=True,
                           temperature=0.9, top_p=0.95, num_return_sequences=2)
    # The first-token probe above is a separate call: subtract it from the wall time.
    minutes = (time.perf_counter() - t0 - sum(ttfts)) / 60
    return pairs / minutes, statistics.median(ttfts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["merged", "lora", "ceiling"], choices=["merged", "lora", "ceiling"])
    p.add_argument("--pairs-each", type=int, default=2, help="pairs per annotator at each concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--arena-rate", type=float, default=AnnotateConfig().arena_rate,
                   help="share of arena pairs (the served version against the base), as the app's default")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-pairs", type=int, default=4, help="pairs for the transformers+peft path")
    p.add_argument("--server-args", default="", help="more vLLM flags for every server")
    p.add_argument("--model", default="embedded",
                   help='"embedded", "mistral-7b-shape" (random weights, for a GPU) or a model folder')
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefloop-bench")
    args = p.parse_args()
    base = bench_model(args.model, args.data_dir)
    adapter = round_adapter(base, args.data_dir / "adapters" / f"bench-r16-{base.name}")
    work = Path(tempfile.mkdtemp(prefix="pair-latency-"))
    shutil.copytree(adapter, work / "adapters" / "round-0001")
    results: dict[str, dict[int, tuple[float, float]]] = {}
    hf = None
    if not args.skip_transformers:
        hf = transformers_path(base, adapter, pairs=args.transformers_pairs)
        print(f"transformers+peft: {hf[0]:.1f} pairs/min, ttft {hf[1]:.2f} s", flush=True)
    for mode in args.modes:
        config = EngineConfig(model=str(base), log_path=args.data_dir / f"vllm-{mode}.log",
                              extra_args=args.server_args.split(), enable_lora=mode != "ceiling",
                              weight_reload=mode == "merged", max_lora_rank=32 if mode == "merged" else 16)
        t0 = time.perf_counter()
        engine = Engine.launch(config)
        print(f"[{mode}] server up in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            serving = Serving(engine, VoteStore(work / f"{mode}.db"), work / "adapters", str(base), max_rank=16,
                              mode="lora" if mode == "ceiling" else mode, merged_dir=work / "merged")
            if mode != "ceiling":
                serving.swap("round-0001")
            results[mode] = {}
            for c in args.concurrency:
                r = serving_path(serving, c, args.pairs_each, args.arena_rate, ceiling=mode == "ceiling")
                results[mode][c] = r
                print(f"[{mode}] c={c}: {r[0]:.1f} pairs/min (ttft {r[1]:.2f} s)", flush=True)
        finally:
            engine.close()
    print(f"\npairs/min (median ttft s); arena share {args.arena_rate:.2f} in merged and lora")
    print("conc  " + "  ".join(f"{m:>16}" for m in results) + "  merged/ceiling  lora/ceiling")
    for c in args.concurrency:
        cells = "  ".join(f"{results[m][c][0]:>8.1f} ({results[m][c][1]:.2f})" for m in results)
        ratios = ""
        if "ceiling" in results:
            for m in ("merged", "lora"):
                ratios += f"  {results[m][c][0] / results['ceiling'][c][0]:>12.2f}" if m in results else "  -"
        print(f"{c:>4}  {cells}{ratios}")
    if hf:
        print(f"transformers+peft: {hf[0]:.1f} pairs/min (ttft {hf[1]:.2f} s)")


if __name__ == "__main__":
    main()
