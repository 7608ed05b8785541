"""One GPU for serving and training: how vLLM and a round's trainer share a card, planned from the
model's own config and the card's memory.

vLLM takes a fixed share of GPU memory at start (``--gpu-memory-utilization``: weights, CUDA graphs
and the KV cache); a round's trainer needs the rest while it runs. The plan tries, in order:
bf16 serving with a bf16 LoRA trainer, bf16 serving with a QLoRA trainer, 4-bit serving with a
QLoRA trainer, and takes the first that fits; vLLM gets everything the trainer does not need (up
to 90%), so the KV cache is as large as the card allows. A card that fits none is refused with
what would fit.

The sizes are estimates from the shapes (checked against the published figures of Mistral-7B:
7.24 B parameters, 13.5 GiB of bf16 weights, 128 KiB of KV cache per token):

- weights: 2 bytes a parameter in bf16; about 0.56 in 4-bit nf4 (scales and the embeddings kept
  in 16 bits);
- vLLM: weights + 1.5 GiB (CUDA graphs, activations) + a KV cache for 8 pairs at the full context
  (16 sequences: a pair is two answers);
- trainer (batch 4 pairs x 512 tokens, rank-16 LoRA on all projections): bf16 LoRA, the bf16
  weights plus 8.5 GiB of activations, gradients and optimizer state at Mistral-7B's width x
  depth (22 GiB in all), scaled with width x depth; QLoRA (gradient checkpointing), the 4-bit
  weights plus 4 GiB at Mistral-7B's (8 GiB in all).

``bench/round.py --mistral-7b-shaped`` measures the trainer's side on a GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.errors import EngineError

GIB = 2**30
MISTRAL_7B_WIDTH_DEPTH = 4096 * 32
VLLM_OVERHEAD_GIB = 1.5
TRAINER_MARGIN_GIB = 1.0  # the trainer process's own CUDA context
MAX_UTILIZATION = 0.9


@dataclass(frozen=True)
class ModelShape:
    """What memory planning needs from a model's config.

    Fields:
        params (float): parameter count.
        layers (int): transformer layers.
        kv_heads (int): key/value heads (grouped-query attention).
        head_dim (int): size of one head.
        hidden (int): hidden size.
        context (int): the longest sequence served (the smaller of vLLM's --max-model-len and the model's).
    """

    params: float
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    context: int

    @classmethod
    def from_config(cls, config: dict[str, Any], max_model_len: int = 2048) -> ModelShape:
        """From a transformers ``config.json`` of a Llama/Mistral-style decoder."""
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        d = int(config.get("head_dim") or h // heads)
        inter = int(config.get("intermediate_size") or 4 * h)
        vocab = int(config.get("vocab_size") or 32000)
        embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
        per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter + 2 * h
        context = min(max_model_len, int(config.get("max_position_embeddings") or max_model_len))
        return cls(float(embeddings + layers * per_layer + h), layers, kv, d, h, context)

    @classmethod
    def from_folder(cls, folder: str | Path, max_model_len: int = 2048) -> ModelShape:
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()), max_model_len)

    @property
    def billions(self) -> float:
        return self.params / 1e9

    def weights_gib(self, quantized: bool) -> float:
        return self.params * (0.56 if quantized else 2.0) / GIB

    def kv_gib_min(self) -> float:
        """A KV cache for 8 pairs (16 sequences) at the full context, in bf16."""
        per_token = 2 * self.layers * self.kv_heads * self.head_dim * 2
        return 16 * self.context * per_token / GIB

    def server_gib(self, quantized: bool) -> float:
        return self.weights_gib(quantized) + VLLM_OVERHEAD_GIB + self.kv_gib_min()

    def trainer_gib(self, qlora: bool) -> float:
        scale = self.hidden * self.layers / MISTRAL_7B_WIDTH_DEPTH
        if qlora:
            return self.weights_gib(True) + 4.0 * scale
        return self.weights_gib(False) + 8.5 * scale


@dataclass(frozen=True)
class GpuPlan:
    """How one card is shared.

    Fields:
        gpu_memory_utilization (float | None): share of the card vLLM takes at start (None: vLLM
            runs elsewhere, attached with --vllm-url).
        vllm_quantization (str | None): "bitsandbytes" serves the base in 4 bits.
        trainer_quantize (str | None): "4bit" trains with QLoRA; None with bf16 LoRA.
        note (str): why, for the log and the admin.
    """

    gpu_memory_utilization: float | None
    vllm_quantization: str | None
    trainer_quantize: str | None
    note: str


CANDIDATES = [(False, False), (False, True), (True, True)]  # (4-bit serving, QLoRA trainer)


def plan_for(total_gib: float, shape: ModelShape, serve_here: bool = True) -> GpuPlan:
    """The split of a card of ``total_gib`` GiB between vLLM (unless it runs elsewhere) and a round's
    trainer, for a model of ``shape``; EngineError with what would fit when nothing does."""
    size = f"{shape.billions:.1f} B"
    for quant_server, qlora in CANDIDATES:
        trainer = shape.trainer_gib(qlora) + TRAINER_MARGIN_GIB
        if not serve_here:
            if trainer <= total_gib:
                return GpuPlan(None, None, "4bit" if qlora else None,
                               f"{total_gib:.0f} GiB for rounds only (vLLM attached): trainer "
                               f"{'QLoRA' if qlora else 'bf16 LoRA'} ~{trainer:.0f} GiB for a {size} model")
            continue
        server = shape.server_gib(quant_server)
        if server + trainer <= total_gib:
            share = math.floor(1000 * min(MAX_UTILIZATION, (total_gib - trainer) / total_gib)) / 1000  # never round up
            kv = share * total_gib - shape.weights_gib(quant_server) - VLLM_OVERHEAD_GIB
            return GpuPlan(share, "bitsandbytes" if quant_server else None, "4bit" if qlora else None,
                           f"{total_gib:.0f} GiB for a {size} model: vLLM {'4-bit' if quant_server else 'bf16'} at "
                           f"{share:.0%} (~{kv:.0f} GiB of KV cache), trainer {'QLoRA' if qlora else 'bf16 LoRA'} "
                           f"~{trainer:.0f} GiB")
    smallest_server = shape.server_gib(True)
    smallest_trainer = shape.trainer_gib(True) + TRAINER_MARGIN_GIB
    if not serve_here:
        raise EngineError(f"a {total_gib:.0f} GiB GPU cannot train a {size} model even with QLoRA (~"
                          f"{smallest_trainer:.0f} GiB): run rounds on a larger card or pick a smaller --model")
    ways = [f"a card of {smallest_server + smallest_trainer:.0f} GiB or more"]
    if smallest_trainer <= total_gib:
        ways.insert(0, f"serve it from another card with --vllm-url (a server needs ~{smallest_server:.0f} GiB in 4 "
                       f"bits) and train here (~{smallest_trainer:.0f} GiB with QLoRA)")
    raise EngineError(f"a {total_gib:.0f} GiB GPU cannot hold a {size} model's server (~{smallest_server:.0f} GiB in "
                      f"4 bits) and its QLoRA trainer (~{smallest_trainer:.0f} GiB) together: "
                      + "; or ".join(ways) + "; or pick a smaller --model")


def cuda_total_gib() -> float | None:
    """Memory of GPU 0 in GiB, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB
