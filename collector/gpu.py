"""One GPU for serving and training: how vLLM and the trainer share a card.

vLLM takes a fixed share of GPU memory at start (``--gpu-memory-utilization``: weights, CUDA graphs
and the KV cache); a round's trainer needs the rest. Figures for Mistral-7B (7.24 B parameters):

- vLLM, bf16 weights 13.5 GiB; 4-bit bitsandbytes weights about 4 GiB. KV cache 128 KiB per token
  (32 layers x 8 KV heads x 128 x 2 x bf16): 4 GiB holds 8 pairs at the full 2,048-token context.
- Trainer, QLoRA (nf4 base, rank-16 LoRA on all projections, batch 4 pairs x 512 tokens,
  gradient checkpointing): about 8 GiB at peak; bf16 LoRA: about 22 GiB.

These are estimates from the shapes (vLLM's CUDA build cannot run where PrefLoop is tested);
``bench/round.py --mistral-7b-shaped`` measures the trainer's side on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from collector.errors import EngineError


@dataclass(frozen=True)
class GpuPlan:
    """How one card is shared.

    Fields:
        gpu_memory_utilization (float): share of the card vLLM takes at start.
        vllm_quantization (str | None): "bitsandbytes" serves the base in 4 bits (small cards).
        trainer_quantize (str | None): "4bit" trains with QLoRA; None with bf16 LoRA.
        note (str): why, for the log and the admin.
    """

    gpu_memory_utilization: float
    vllm_quantization: str | None
    trainer_quantize: str | None
    note: str


def plan_for(total_gib: float) -> GpuPlan:
    """The default split of a card of ``total_gib`` GiB between vLLM and a round's trainer (7B)."""
    if total_gib >= 70:  # A100/H100 80 GB: room for bf16 LoRA next to a bf16 server
        return GpuPlan(0.45, None, None, f"{total_gib:.0f} GiB: vLLM bf16 at 45%, trainer bf16 LoRA (~22 GiB)")
    if total_gib >= 40:  # L40S, A6000 48 GB
        return GpuPlan(0.55, None, "4bit",
                       f"{total_gib:.0f} GiB: vLLM bf16 at 55% (13.5 GiB weights, ~9 GiB KV), trainer QLoRA (~8 GiB)")
    if total_gib >= 20:  # L4, A10G 24 GB
        return GpuPlan(0.45, "bitsandbytes", "4bit",
                       f"{total_gib:.0f} GiB: vLLM 4-bit at 45% (~4 GiB weights, ~4 GiB KV), trainer QLoRA (~8 GiB)")
    raise EngineError(f"a {total_gib:.0f} GiB GPU cannot hold a 7B server and its trainer together: serve with "
                     "--vllm-url on another card, or pick a smaller --model")


def cuda_total_gib() -> float | None:
    """Memory of GPU 0 in GiB, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30
