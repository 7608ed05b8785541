"""A version's adapter merged into the base weights, for in-place reload into a running vLLM
(``Engine.reload_weights``): a merged model serves at the base model's speed, where a LoRA costs
every token its extra matrix products.

The merged folder is written like any Hugging Face model (safetensors, its config) into a
temporary folder and renamed into place, so a crash leaves the old folder or the new one. Weights
that are not finite (an adapter trained into NaN) are refused before anything is written: the
running server never sees them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from collector.errors import AdapterRejected

MARKER = "prefloop-merged.json"  # in a merged folder: which adapter (by content digest) it holds


def tmp_folder(out: str | Path) -> Path:
    """Where ``out`` is written before it is renamed into place (a dot-folder: never pruned)."""
    out = Path(out)
    return out.with_name(f".{out.name}.tmp")


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
    tmp = tmp_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    from collector.engine import adapter_digest

    (tmp / MARKER).write_text(json.dumps({"adapter": str(adapter), "digest": adapter_digest(adapter)}))
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _leaf(module_key: str) -> str:
    return module_key.rsplit(".", 1)[-1]


def _lora_factors(adapter: str | Path) -> dict[str, tuple]:
    """``{module key: (A, B scaled)}`` of a peft LoRA adapter, in float32: the adapter adds B @ A
    to that module's weight. AdapterRejected for what is not a plain LoRA (DoRA, trained biases,
    saved modules), which no delta of low rank can express."""
    import torch
    from safetensors.torch import load_file

    adapter = Path(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
        raise AdapterRejected(f"{adapter}: DoRA, trained biases or saved modules cannot be served as a merged "
                              "delta; serve with --serving lora")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    alpha, rslora = float(cfg.get("lora_alpha", cfg.get("r", 8))), bool(cfg.get("use_rslora"))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    unknown = [k for k in weights if ".lora_A." not in k and ".lora_B." not in k]
    if unknown:  # embedding LoRA, trained norms...: served as they are by --serving lora only
        raise AdapterRejected(f"{adapter}: tensors other than LoRA A/B ({unknown[0]}, ...) cannot be served as a "
                              "merged delta; serve with --serving lora")
    out: dict[str, tuple] = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise AdapterRejected(f"{adapter}: {key} has no lora_B")
        r = a.shape[0]
        # peft's rule: a pattern applies to the modules whose key ends with it as a regex
        a_alpha = next((float(v) for k, v in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?(?:{k})", module)), alpha)
        scale = a_alpha / (r ** 0.5 if rslora else r)
        out[module] = (a.to(torch.float32), b.to(torch.float32) * scale)
    if not out:
        raise AdapterRejected(f"{adapter}: no LoRA weights")
    return out


def delta_adapter(target: str | Path | None, current: str | Path, out: str | Path, base_model: str) -> Path:
    """A LoRA adapter that turns the base merged with ``current`` into the base with ``target``
    (``None``: the base itself): ``B_t A_t - B_c A_c`` as one adapter of rank ``r_t + r_c``, the
    scalings folded into B (alpha = rank, so vLLM scales by 1), the union of both target modules.
    On a server serving ``current`` merged, it serves ``target`` exactly as a LoRA over the base
    would (up to the merged weights' rounding): arena pairs keep their meaning. Written atomically."""
    import torch
    from safetensors.torch import save_file

    cur = _lora_factors(current)
    tgt = _lora_factors(target) if target is not None else {}
    modules = sorted(set(cur) | set(tgt))
    rank = max((tgt[m][0].shape[0] if m in tgt else 0) + (cur[m][0].shape[0] if m in cur else 0) for m in modules)
    tensors = {}
    for m in modules:
        parts = ([tgt[m]] if m in tgt else []) + ([(cur[m][0], -cur[m][1])] if m in cur else [])
        a = torch.cat([p[0] for p in parts], dim=0)
        b = torch.cat([p[1] for p in parts], dim=1)
        pad = rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros((pad, a.shape[1]))], dim=0)
            b = torch.cat([b, b.new_zeros((b.shape[0], pad))], dim=1)
        tensors[f"{m}.lora_A.weight"] = a.contiguous()
        tensors[f"{m}.lora_B.weight"] = b.contiguous()
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterRejected(f"the delta to {target or 'the base'} has non-finite weights ({key})")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "use_rslora": False, "base_model_name_or_path": base_model,
              "target_modules": sorted({_leaf(m) for m in modules}), "fan_in_fan_out": False}
    out = Path(out)
    tmp = tmp_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m collector.merge BASE ADAPTER OUT``: what ``Serving`` runs in a child process, so
    that a merge's memory (a 7B model in bf16 is 14.5 GB) is returned when it ends. Exit 2 with one
    line when the adapter's weights cannot be merged, 3 for any other failure (memory, disk)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m collector.merge", description=main.__doc__)
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    try:
        merge_adapter(args.base, args.adapter, args.out, args.dtype)
    except AdapterRejected as e:  # the adapter's weights: the same next time
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - memory, disk, a library: worth another try later
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
