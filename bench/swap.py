"""Time from promotion to the first token served by the new adapter, and in-flight failures,
while 8 annotators stream pairs through the old one. Goal: < 2 s, 0 failures.

    .venv/bin/python bench/swap.py [--swaps 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import PROMPTS, embedded_model, round_adapter

from collector.engine import Engine, EngineConfig
from collector.sampling import SamplingParams, sample_pair
from collector.serving import Serving, preflight
from storage.votes import VoteStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swaps", type=int, default=5)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefloop-bench")
    args = p.parse_args()
    base = embedded_model(args.data_dir)
    template = round_adapter(base, args.data_dir / "adapters" / "bench-r16")
    work = Path(tempfile.mkdtemp(prefix="swap-"))
    for i in range(args.swaps + 1):  # promoted adapters: copies under versioned names
        shutil.copytree(template, work / f"round-{i:04d}")
    engine = Engine.launch(EngineConfig(model=str(base), log_path=args.data_dir / "vllm-swap.log"))
    serving = Serving(engine, VoteStore(work / "votes.db"), work, str(base), max_rank=16)
    serving.swap("round-0000")
    results = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def annotator(i: int) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            try:
                sample_pair(engine, [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                            SamplingParams(max_tokens=96), seed=k, model=serving.current)
                results["ok"] += 1
            except Exception as e:
                results["failed"] += 1
                print(f"stream failed: {e}")

    threads = [threading.Thread(target=annotator, args=(i,), daemon=True) for i in range(args.streams)]
    for t in threads:
        t.start()
    time.sleep(5)
    to_first_token, phases = [], {"preflight": [], "swap (load + smoke + flip)": []}
    try:
        for i in range(1, args.swaps + 1):
            name = f"round-{i:04d}"
            t0 = time.perf_counter()
            preflight(work / name, str(base), 16)
            phases["preflight"].append(time.perf_counter() - t0)
            phases["swap (load + smoke + flip)"].append(serving.swap(name))
            # First token of a new request through the new adapter, as an annotator would get it.
            stream = engine.stream_chat({"model": serving.current, "messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 4})
            for chunk in stream:
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    break
            stream.close()
            to_first_token.append(time.perf_counter() - t0)
            time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        engine.close()
    print(f"\nswaps: {args.swaps}, streams in flight: {args.streams}")
    print(f"promotion -> first token of the new adapter: median {statistics.median(to_first_token):.2f} s, "
          f"max {max(to_first_token):.2f} s (under load: pre-flight runs twice, once here, once in swap)")
    for k, v in phases.items():
        print(f"  {k}: median {statistics.median(v):.2f} s")
    print(f"pairs completed during the swaps: {results['ok']}, failed: {results['failed']}")


if __name__ == "__main__":
    main()
