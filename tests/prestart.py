"""The run's slow set-up, begun in the background when the first test starts.

A vLLM start is three Python processes importing torch and vLLM one after the other (about 25 s,
one core of the two busy), the embedded model's conversion is one core for about 20 s, and the
CUDA dependency resolution waits on the package index. Each used to block the run when its first
test asked for it; here they run in subprocesses while the tests that need none of them go first
(``conftest.pytest_collection_modifyitems``), and a fixture waits only for what is not ready yet.
Nothing is started that no selected test needs.

    python tests/prestart.py embedded MODELS_DIR      # the subprocess jobs, also usable alone
    python tests/prestart.py tiny SMOLLM2_DIR OUT
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_tiny_mistral(smollm2_dir: Path, out: Path) -> Path:
    """A tiny random Mistral-architecture model (head dim 64, so vLLM accepts it), with
    SmolLM2's tokenizer and chat template: covers the Mistral code path in seconds."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = MistralConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, sliding_window=None,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def start_cuda_resolution(folder: Path) -> tuple[subprocess.Popen, Path] | str:
    """Start pip's dry run (metadata only) of the image's dependency set for Python 3.11 on x86_64
    Linux, as the Space will install it (tests/test_space.py reads the result): the process and the
    folder of its output and report; the reason instead when the package index cannot be reached.
    python:3.11-slim is Debian 12 (glibc 2.36), where every manylinux wheel up to 2_36 installs."""
    import httpx

    try:
        httpx.get("https://pypi.org/simple/vllm/", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        return f"the package index cannot be reached from here ({type(e).__name__}): not resolved"
    reqs = folder / "requirements-cuda.txt"
    reqs.write_text(subprocess.run([sys.executable, "scripts/requirements.py", "cuda"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout)
    platforms = [a for glibc in range(17, 37) for a in ("--platform", f"manylinux_2_{glibc}_x86_64")]
    platforms += ["--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
           str(folder / "report.json"), "--python-version", "3.11", *platforms, "--only-binary", ":all:",
           "--index-url", "https://pypi.org/simple", "-r", str(reqs)]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""}
    with open(folder / "pip.out", "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), folder


class Prestart:
    """Jobs by the name of the fixture that waits for them. One long-lived thread runs them in
    order: the vLLM servers it starts get SIGKILL when their parent *thread* ends (the
    parent-death signal, storage.procs.die_with_parent), so it lives until ``close``."""

    def __init__(self) -> None:
        self.futures: dict[str, Future] = {}
        self._jobs: list[tuple[str, Callable[[], Any]]] = []
        self._servers: list[Any] = []
        self._hold = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, job: Callable[[], Any]) -> None:
        """Queue ``job`` (run in order after the jobs added before it) as ``name``'s value."""
        self.futures[name] = Future()
        self._jobs.append((name, job))

    def server(self, server) -> Any:
        """For a job: start a ``VLLMServer`` from the prestart thread and keep it for ``close``."""
        self._servers.append(server)
        server.start()
        return server

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prestart", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name, job in self._jobs:
            future = self.futures[name]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as e:  # a job's failure is its fixture's error, raised there
                future.set_exception(e)
        self._hold.wait()

    def result(self, name: str) -> Any:
        return self.futures[name].result()

    def close(self) -> None:
        """Stop what was started and not stopped by its fixture, then let the thread end."""
        for future in self.futures.values():
            future.cancel()
        for s in self._servers:
            s.stop()
        self._hold.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def run_job(args: list[str], log: Path) -> None:
    """One of this file's jobs in a subprocess (its own interpreter, so it neither holds the tests'
    GIL nor touches their torch random state); output to ``log``, which a failure quotes."""
    with open(log, "wb") as out:
        code = subprocess.call([sys.executable, str(Path(__file__)), *args], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"tests/prestart.py {' '.join(args)} exited with {code}:\n{log.read_text()[-3000:]}")


def embedded(models: Path, log: Path) -> Path:
    """The embedded model converted under ``models`` (``collector.models.ensure_embedded``)."""
    from collector.models import EMBEDDED_NAME

    run_job(["embedded", str(models)], log)
    return models / EMBEDDED_NAME


def tiny_mistral(smollm2_dir: Path, out: Path, log: Path) -> Path:
    """``build_tiny_mistral`` into ``out``."""
    run_job(["tiny", str(smollm2_dir), str(out)], log)
    return out


def main(argv: list[str]) -> None:
    if argv[0] == "embedded":
        from collector.models import ensure_embedded

        print(ensure_embedded(Path(argv[1])))
    elif argv[0] == "tiny":
        print(build_tiny_mistral(Path(argv[1]), Path(argv[2])))
    else:
        raise SystemExit(f"unknown job {argv[0]!r}: use embedded or tiny")


if __name__ == "__main__":
    main(sys.argv[1:])
