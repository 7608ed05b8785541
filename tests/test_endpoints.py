"""Several vLLM endpoints (`--vllm-url` repeated): requests spread across them, adapters load into
all, and one endpoint down means the others keep serving.

    .venv/bin/python -m pytest tests/test_endpoints.py
"""

import pytest

from collector.engine import Engine, EngineConfig, VLLMServer
from collector.sampling import SamplingParams, sample_pair
from collector.serving import Serving
from storage.votes import VoteStore
from tests.conftest import make_adapter

MSGS = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def two_servers(smollm2_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("two-vllm")
    servers = [VLLMServer(EngineConfig(model=str(smollm2_dir), log_path=logs / f"vllm-{i}.log")) for i in range(2)]
    servers[1].api_key = servers[0].api_key  # attached servers share one key (--vllm-api-key)
    for s in servers:  # start both, then wait: the two start-ups overlap
        s.start()
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_two_endpoints_share_requests_take_adapters_and_survive_one_down(two_servers, smollm2_dir, tmp_path):
    a, b = two_servers
    engine = Engine.attach([a.url, b.url], a.api_key)
    adapters = tmp_path / "adapters"
    make_adapter(smollm2_dir, adapters / "round-0001")
    serving = Serving(engine, VoteStore(tmp_path / "votes.db"), adapters, str(smollm2_dir), max_rank=16)
    serving.swap("round-0001")
    for ep in engine.endpoints:  # loaded into every endpoint
        assert "round-0001" in engine.models(ep)
    used = [engine.pick().url for _ in range(4)]
    assert set(used) == {a.url, b.url}  # round robin over both

    b.stop()
    pairs = [sample_pair(engine, MSGS, SamplingParams(max_tokens=16), seed=i, model=serving.current) for i in range(4)]
    assert all(p.models == ("round-0001", "round-0001") and p.answers[0] for p in pairs)
    assert [ep.healthy for ep in engine.endpoints] == [True, False]
