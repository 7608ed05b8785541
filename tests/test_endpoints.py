"""Several vLLM endpoints (`--vllm-url` repeated): requests spread across them, adapters load into
all, and one endpoint down means the others keep serving.

    .venv/bin/python -m pytest tests/test_endpoints.py
"""

from concurrent.futures import ThreadPoolExecutor

from collector.engine import Engine
from collector.sampling import SamplingParams, sample_pair
from collector.serving import Serving
from storage.votes import VoteStore
from tests.conftest import make_adapter

MSGS = [{"role": "user", "content": "Name a fruit."}]


def test_seeded_pairs_survive_a_prefill_split_over_steps(second_server):
    """Every pair is a seeded request. When a prompt's prefill is split over steps, vLLM rewinds the
    request's random generator by a CUDA offset a CPU generator does not have, which killed the
    engine; PrefLoop's vLLM plugin keeps the stream instead (collector.vllm_plugin)."""
    server = Engine.attach([second_server.url], second_server.api_key)
    long = [{"role": "user", "content": "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum"] * 20)
             + ". Which one is the sweetest?"}]
    # about 150 tokens: each prefill takes several steps of 32
    with ThreadPoolExecutor(4) as pool:  # prefills of several requests in one step's budget, too
        pairs = list(pool.map(lambda i: sample_pair(server, long, SamplingParams(max_tokens=8), seed=i), range(4)))
    assert all(p.answers[0] and p.answers[1] for p in pairs)
    again = sample_pair(server, long, SamplingParams(max_tokens=8), seed=0)
    assert again.answers == pairs[0].answers  # the server is up, and a seed still means one answer


def test_two_endpoints_share_requests_take_adapters_and_survive_one_down(engine, second_server, smollm2_dir,
                                                                           tmp_path):
    a, b = engine.endpoints[0], second_server
    attached = Engine.attach([a.url, b.url], a.api_key)
    adapters = tmp_path / "adapters"
    make_adapter(smollm2_dir, adapters / "round-0001")
    serving = Serving(attached, VoteStore(tmp_path / "votes.db"), adapters, str(smollm2_dir), max_rank=16)
    serving.swap("round-0001")
    for ep in attached.endpoints:  # loaded into every endpoint (this round-0001: by its digest)
        assert attached.vllm_name("round-0001") in attached.models(ep, raw=True)
    used = [attached.pick().url for _ in range(4)]
    assert set(used) == {a.url, b.url}  # round robin over both

    b.stop()
    pairs = [sample_pair(attached, MSGS, SamplingParams(max_tokens=16), seed=i, model=serving.current)
             for i in range(4)]
    assert all(p.models == ("round-0001", "round-0001") and p.answers[0] for p in pairs)
    assert [ep.healthy for ep in attached.endpoints] == [True, False]
    attached.unload_adapter("round-0001")  # the shared server as the other tests find it
