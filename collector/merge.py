"""A version's adapter merged into the base weights, for in-place reload into a running vLLM
(``Engine.reload_weights``): a merged model serves at the base model's speed, where a LoRA costs
every token its extra matrix products.

The merged folder is written like any Hugging Face model (safetensors, its config) into a
temporary folder and renamed into place, so a crash leaves the old folder or the new one. Weights
that are not finite (an adapter trained into NaN) are refused before anything is written: the
running server never sees them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from collector.errors import AdapterRejected


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Merge the peft adapter at ``adapter`` into ``base``; write the model to ``out``. Returns
    ``out``. AdapterRejected if a merged weight is NaN or infinite."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    for name, tensor in merged.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise AdapterRejected(f"merging {adapter} into the base gives non-finite weights ({name}); not served")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
