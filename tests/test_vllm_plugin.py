"""PrefLoop's grouped CPU LoRA ops against vLLM's own torch ops.

    .venv/bin/python -m pytest tests/test_vllm_plugin.py
"""

import pytest
import torch
from vllm.lora.ops import torch_ops as ref

from collector import vllm_plugin as ours


def _case(seed: int, tokens: int = 12, slots: int = 4, rank: int = 16, dim: int = 64, out: int = 96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.bfloat16)
    a = torch.randn(slots, 1, rank, dim, generator=g, dtype=torch.bfloat16)  # shrink weights
    b = torch.randn(slots, 1, out, rank, generator=g, dtype=torch.bfloat16)  # expand weights
    idx = torch.randint(0, slots, (tokens,), generator=g)
    return x, a, b, idx


@pytest.mark.parametrize("seed", range(4))
def test_shrink_and_expand_match_vllm_where_every_token_has_an_adapter(seed):
    x, a, b, idx = _case(seed)
    y_ref, y = torch.zeros(len(x), 16), torch.zeros(len(x), 16)
    ref.bgmv_shrink(x, a, y_ref, idx, 0.5)
    ours.bgmv_shrink(x, a, y, idx, 0.5)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    o_ref, o = torch.ones(len(x), 96, dtype=torch.bfloat16), torch.ones(len(x), 96, dtype=torch.bfloat16)
    ref.bgmv_expand(y_ref.to(torch.bfloat16), b, o_ref, idx, add_inputs=True)
    ours.bgmv_expand(y.to(torch.bfloat16), b, o, idx, add_inputs=True)
    torch.testing.assert_close(o, o_ref, rtol=3e-2, atol=3e-1)
    s_ref, s = torch.zeros(len(x), 200, dtype=torch.bfloat16), torch.zeros(len(x), 200, dtype=torch.bfloat16)
    ref.bgmv_expand_slice(y_ref.to(torch.bfloat16), b, s_ref, idx, 50, 96, add_inputs=False)
    ours.bgmv_expand_slice(y.to(torch.bfloat16), b, s, idx, 50, 96, add_inputs=False)
    torch.testing.assert_close(s, s_ref, rtol=3e-2, atol=3e-1)


def test_sgmv_variants_expand_per_sequence_indices():
    x, a, b, _ = _case(7, tokens=10)
    seq_idx, seq_len = torch.tensor([2, 0, 3]), torch.tensor([3, 5, 2])
    y_ref, y = torch.zeros(10, 16), torch.zeros(10, 16)
    ref.sgmv_shrink(x, a, y_ref, None, seq_len, seq_idx, 3, 5, 10, 1.0)
    ours.sgmv_shrink(x, a, y, None, seq_len, seq_idx, 3, 5, 10, 1.0)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


def test_tokens_without_an_adapter_get_no_delta():
    # vLLM's op gives index -1 the *last* slot's adapter; that is the serving bug fixed here.
    x, a, _, idx = _case(3)
    idx[::2] = -1
    y, y_ref = torch.zeros(len(x), 16), torch.zeros(len(x), 16)
    ours.bgmv_shrink(x, a, y, idx, 1.0)
    ref.bgmv_shrink(x, a, y_ref, idx, 1.0)
    assert torch.count_nonzero(y[::2]) == 0
    assert torch.count_nonzero(y_ref[::2]) > 0  # the upstream behaviour this replaces
    torch.testing.assert_close(y[1::2], y_ref[1::2], rtol=2e-2, atol=2e-2)


def _reference_linear(x, a, b, slices, idx):
    """y[t] for a packed projection: per token, per slice, x @ A.T @ B.T (float32); 0 without adapter."""
    y = torch.zeros(len(x), sum(slices))
    for t in range(len(x)):
        if idx[t] < 0:
            continue
        offset = 0
        for a_s, b_s, size in zip(a, b, slices, strict=True):
            y[t, offset:offset + size] = (x[t].float() @ a_s[idx[t], 0].float().t()) @ b_s[idx[t], 0].float().t()
            offset += size
    return y


def _linear_case(seed: int, slices=(96, 32, 32), tokens: int = 10, slots: int = 4, rank: int = 8, dim: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.bfloat16)
    a = [torch.randn(slots, 1, rank, dim, generator=g, dtype=torch.bfloat16) for _ in slices]
    b = [torch.randn(slots, 1, s, rank, generator=g, dtype=torch.bfloat16) for s in slices]
    return x, a, b, list(slices)


@pytest.mark.parametrize("indices", [[-1] * 10, [2] * 10, [0, -1, 2, 2, -1, 0, 3, -1, 2, 0]])
def test_the_compiled_path_op_adds_each_tokens_own_adapter_to_a_packed_projection(indices):
    ours.define_ops()
    x, a, b, slices = _linear_case(3)
    idx = torch.tensor(indices)
    ours._FUSED.clear()
    ours._STEP.update(tokens=ours._groups(idx), count=len(idx))
    y = torch.ones(len(x), sum(slices), dtype=torch.bfloat16)
    torch.ops.prefloop.lora_linear(y, x, a, b, 1.0, slices)
    expected = 1.0 + _reference_linear(x, a, b, slices, idx)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)


def test_fused_copies_are_made_again_once_vllm_writes_an_adapter_into_a_slot():
    ours.define_ops()
    x, a, b, slices = _linear_case(4)
    idx = torch.full((len(x),), 1)
    ours._FUSED.clear()
    ours._STEP.update(tokens=ours._groups(idx), count=len(idx))

    def run():
        y = torch.zeros(len(x), sum(slices), dtype=torch.bfloat16)
        torch.ops.prefloop.lora_linear(y, x, a, b, 1.0, slices)
        return y.float()

    run()
    for t in b:  # a new adapter in slot 1, written in place as vLLM does
        t[1].mul_(-1.0)
    activated = ours._forgetting_fused(lambda manager, lora_id: True)
    touched = ours._forgetting_fused(lambda manager, lora_id: False)
    touched(None, 7)  # an adapter already in its slot: the copies stay
    assert ours._FUSED
    activated(None, 8)
    torch.testing.assert_close(run(), _reference_linear(x, a, b, slices, idx), rtol=2e-2, atol=5e-2)
