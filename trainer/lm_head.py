"""The per-token log-probabilities of a round's forwards on a CPU, where TRL's fused LM head is slow.

TRL's DPOTrainer asks the model for ``model(..., labels=labels, fused_lm_head=True)``: log-probs of
the labels without materialising the ``[tokens, vocab]`` logits (``trl.trainer.utils.add_fused_lm_head``).
On CUDA that is a Triton kernel over the labelled positions only. Elsewhere it falls back to torch
ops that score every position, prompts and padding included, and fold each vocabulary tile into
float32 statistics with several full-tile passes: on a 2-core CPU with the embedded model, 4.7 s of
a 7 s step (cProfile, docs/experiments.md). There the logits of the labelled positions fit in memory
easily (tokens x vocab x ~10 bytes: 0.3 GB for a step of 4 pairs of 128 tokens at SmolLM2's 49,152
words, 1.3 GB at 512 tokens and Mistral's 32,768), so this head computes them once, in the autocast
precision as TRL's does, and takes torch's ``log_softmax`` and its backward.

The output is TRL's ``FusedCausalLMOutput`` with the same fields and shapes, so every TRL metric
(``entropy``, ``logits/*``, ``mean_token_accuracy``) reads the same. ``entropy``, ``mean_logits``,
``is_top1`` and ``log_sum_sq_probs`` carry no gradient: PrefLoop's losses (IPO or DPO, plus the
chosen answers' NLL) use only the log-probs.
"""

from __future__ import annotations

import functools
import types
from typing import Any

# Configs that transform the logits before the softmax; TRL's head applies them and this one does
# not, so a model with any of them keeps TRL's head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def add_cpu_logprob_head(model: Any, outputs: tuple[str, ...]) -> bool:
    """Serve ``fused_lm_head=True`` calls on ``model`` (TRL has patched it already) with logits of the
    labelled positions only; every other call goes to the forward TRL installed. Returns False, and
    changes nothing, for a model whose logits TRL's head transforms (softcapping, scales)."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    config = model.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in _LOGIT_TRANSFORMS):
        return False
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        targets = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()  # [labelled tokens, vocab]
        log_p = logits.log_softmax(-1)
        log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        extra: dict[str, Any] = dict.fromkeys(("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        with torch.no_grad():
            if "entropy" in outputs:
                extra["entropy"] = -(log_p.exp() * log_p).sum(-1)
            if "log_sum_sq_probs" in outputs:
                extra["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, dim=-1)
            if "mean_logits" in outputs:
                extra["mean_logits"] = logits.mean(-1)
            if "is_top1" in outputs:
                extra["is_top1"] = logits.argmax(-1) == targets  # the first maximum, as TRL counts it
        # Zeros where the label is -100; masked_scatter keeps an all-masked batch connected to the graph.
        per_token = {k: None if v is None else v.new_zeros(mask.shape).masked_scatter(mask, v)
                     for k, v in {"log_probs": log_probs, **extra}.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / count, label_mask=mask, aux_loss=None,
                                   **per_token)

    model.forward = types.MethodType(forward, model)
    return True
