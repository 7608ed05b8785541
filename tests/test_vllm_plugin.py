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
