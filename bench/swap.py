"""Time from promotion to the first token served by the new version, and in-flight failures,
while 8 annotators stream pairs through the old one, for both serving modes:

  - lora: pre-flight, load the adapter, smoke answer, flip;
  - merged: pre-flight, merge the adapter into the base (a child process), then with the pairs in
    flight finished and new ones held, reload the weights in place, smoke answer, flip.

Goal: 0 failures; lora < 2 s.

    .venv/bin/python bench/swap.py [--swaps 5] [--modes merged lora]
    .venv/bin/python bench/swap.py --model mistral-7b-shape [--cold]   # on a GPU: reload from memory / disk
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import PROMPTS, bench_model, round_adapter

from collector.engine import BASE, Engine, EngineConfig
from collector.sampling import PairStream, SamplingParams
from collector.serving import Serving
from storage.votes import VoteStore


def drop_page_cache() -> None:
    """Linux's page cache emptied (root only), so that a reload reads from disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root to drop the page cache: {e}") from None


def run(mode: str, base: Path, template: Path, swaps: int, streams: int, log: Path, cold: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"swap-{mode}-"))
    for i in range(swaps + 1):  # promoted adapters: copies under versioned names
        shutil.copytree(template, work / "adapters" / f"round-{i:04d}")
    engine = Engine.launch(EngineConfig(model=str(base), log_path=log, weight_reload=mode == "merged",
                                        max_lora_rank=32 if mode == "merged" else 16))
    serving = Serving(engine, VoteStore(work / "votes.db"), work / "adapters", str(base), max_rank=16, mode=mode,
                      merged_dir=work / "merged")
    serving.swap("round-0000")
    results = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def annotator(i: int) -> None:
        k, rng = 0, random.Random(i)
        while not stop.is_set():
            k += 1
            try:
                with serving.lease():
                    arena = (serving.current, BASE) if rng.random() < 0.25 and serving.arena_opponent(rng) else None
                    stream = PairStream(engine, [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                                        SamplingParams(max_tokens=96), seed=k, model=serving.current, models=arena,
                                        route=serving.route)
                    for _ in stream:
                        pass
                results["ok"] += 1
            except Exception as e:
                results["failed"] += 1
                print(f"stream failed: {e}")

    threads = [threading.Thread(target=annotator, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(5)
    to_first_token, swap_s, merge_s = [], [], []
    try:
        for i in range(1, swaps + 1):
            name = f"round-{i:04d}"
            t0 = time.perf_counter()
            if mode == "merged":
                serving._weights_folder(name)  # what swap does first, timed apart
                merge_s.append(time.perf_counter() - t0)
            if cold:
                drop_page_cache()  # the reload then reads the merged weights from disk
            swap_s.append(serving.swap(name))
            # First token of a new request on the new version, as an annotator would get it.
            with serving.lease():
                stream = engine.stream_chat({"model": serving.route(serving.current), "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "Hi"}]})
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
    return {"first_token": to_first_token, "swap": swap_s, "merge": merge_s, **results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swaps", type=int, default=5)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["merged", "lora"], choices=["merged", "lora"])
    p.add_argument("--cold", action="store_true",
                   help="empty the page cache before each swap (root): the weights reload from disk, not memory")
    p.add_argument("--model", default="embedded",
                   help='"embedded", "mistral-7b-shape" (random weights, for a GPU) or a model folder')
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "prefloop-bench")
    args = p.parse_args()
    base = bench_model(args.model, args.data_dir)
    template = round_adapter(base, args.data_dir / "adapters" / f"bench-r16-{base.name}")
    print(f"swaps: {args.swaps} per mode, pairs streaming meanwhile: {args.streams} (a quarter of them arena pairs)")
    for mode in args.modes:
        r = run(mode, base, template, args.swaps, args.streams, args.data_dir / f"vllm-swap-{mode}.log", args.cold)
        ftt = r["first_token"]
        line = (f"[{mode}] promotion -> first token: median {statistics.median(ftt):.2f} s, max {max(ftt):.2f} s; "
                f"swap: median {statistics.median(r['swap']):.2f} s")
        if r["merge"]:
            line += f" (after the merge in a child process: median {statistics.median(r['merge']):.2f} s)"
        print(f"{line}; pairs completed {r['ok']}, failed {r['failed']}", flush=True)

if __name__ == "__main__":
    main()
