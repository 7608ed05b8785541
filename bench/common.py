"""Helpers shared by the benchmarks: the embedded model and a LoRA adapter shaped like a round's."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Give me three tips for staying focused while working from home.",
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "How do I make a good cup of tea?",
    "What is the difference between a list and a tuple in Python?",
    "Plan a one-day trip to a city you like.",
    "How can I save money on groceries each week?",
    "Explain recursion to a beginner.",
]


def embedded_model(data_dir: Path) -> Path:
    from collector.models import ensure_embedded

    return ensure_embedded(data_dir / "models")


def round_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A LoRA adapter like a round produces (rank r on all 7 projections), random nonzero weights."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.ipo import LORA_TARGETS

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, init_lora_weights=False,
                   task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.01)  # small: changes the output without wrecking the language
    model.save_pretrained(out)
    return out
