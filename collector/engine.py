"""The vLLM OpenAI-compatible server(s) that PrefLoop samples from.

``VLLMServer`` manages one server as a subprocess (own process group, 127.0.0.1, random API key,
runtime LoRA loading on). ``Engine`` talks to one or more endpoints, managed or attached
(``--vllm-url``): requests spread across healthy endpoints, adapters load into all of them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from collector.errors import AdapterRejected, EngineError
from storage.procs import child_setup, reap_pid_file, write_pid_file

logger = logging.getLogger(__name__)

BASE = "base"  # served name of the base model (no adapter)
PID_MARKER = "vllm.entrypoints.openai.api_server"
LOG_ROTATE_BYTES = 20 * 2**20


def rotate_log(path: Path, max_bytes: int = LOG_ROTATE_BYTES, keep: int = 3) -> None:
    """Before a start: move a log over ``max_bytes`` to ``.1`` (``.1`` to ``.2``, ...; ``keep`` kept)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size < max_bytes:
        return
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


@dataclass
class EngineConfig:
    """How to run or reach vLLM.

    Fields:
        model (str): local folder or Hub id of the base model (managed server only).
        urls (list[str], default []): attach to these running servers instead of launching one.
        api_key (str | None, default None): key for attached servers; a managed one gets a random key.
        max_lora_rank (int, default 16): largest adapter rank the server accepts.
        max_loras (int, default 4): adapters in one batch (serving, a draining previous, arena opponent).
        max_model_len (int, default 2048): context length.
        dtype (str, default "bfloat16"): weights and activations dtype.
        cpu_kvcache_gb (int, default 2): KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).
        gpu_memory_utilization (float | None, default None): share of GPU memory for vLLM (CUDA).
        quantization (str | None, default None): vLLM --quantization, e.g. "bitsandbytes" (CUDA).
        startup_timeout (float, default 600.0): seconds to wait for the server to become healthy.
        log_path (Path | None, default None): where the managed server's output goes.
        extra_args (list[str], default []): more `vllm serve` flags, passed as is.
        enable_lora (bool, default True): runtime LoRA; off only for benchmarks' no-LoRA ceiling.
        pid_file (Path | None, default None): where the managed server's process group is noted, so
            that a start after a crash of the app stops the server it left behind.
        niceness (int, default 0): how much lower the server's CPU priority is than the app's. On a
            CPU machine vLLM computes on every core; the app sets 10 there, so that a vote is
            answered at once however busy generation is (bench/vote_under_load.py).
        env (dict, default {}): more environment for the managed server (e.g. PREFLOOP_HUB_ADAPTERS).
        weight_reload (bool, default False): the server can replace its weights in place
            (``Engine.reload_weights``): vLLM's dev routes on, which PrefLoop's plugin puts behind
            the API key (vLLM guards only /v1 and a few others).
    """

    model: str = ""
    urls: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_lora_rank: int = 16
    max_loras: int = 4
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    cpu_kvcache_gb: int = 2
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    startup_timeout: float = 600.0
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    enable_lora: bool = True
    pid_file: Path | None = None
    niceness: int = 0
    env: dict[str, str] = field(default_factory=dict)
    weight_reload: bool = False


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not Path(path).exists():
        return "(no log)"
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class VLLMServer:
    """One vLLM server as a subprocess in its own process group."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.port = free_port()
        # Passed in the environment (VLLM_API_KEY), never on the command line, where every local
        # user could read it in the process list.
        self.api_key = secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(config.log_path or f"vllm-{self.port}.log")
        self.pid_file = config.pid_file
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        c = self.config
        # `python -m` rather than the `vllm` script: under vllm-cpu the script fails its own
        # version lookup (the distribution is named vllm-cpu).
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", c.model, "--served-model-name", BASE,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", c.dtype, "--max-model-len", str(c.max_model_len),
            "--disable-uvicorn-access-log",
        ]
        if c.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras", str(c.max_loras)]
        if c.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.quantization:
            cmd += ["--quantization", c.quantization]
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        """The server's environment: this one's, plus PrefLoop's defaults where unset."""
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_API_KEY"] = self.api_key
        env["PREFLOOP_DIE_WITH_PARENT"] = "1"  # collector/vllm_plugin.py: each vLLM process dies with its parent
        if self.config.weight_reload:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /pause, /collective_rpc, /resume (Engine.reload_weights)
            env["PREFLOOP_GUARD_DEV_ROUTES"] = "1"  # collector/vllm_plugin.py: behind the API key
        env.update(self.config.env)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.cpu_kvcache_gb))
        if len(os.sched_getaffinity(0)) <= 2:
            # vLLM-CPU keeps one core for its front end and computes on the rest: on 2 cores that
            # halves the model's share. Computing on both is 27% more pairs/min through an adapter
            # (24.5 -> 31.0 at 8 annotators, bench/pair_latency.py); set the variable to override.
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if cpu_build():
            # vLLM-CPU cannot load its own ahead-of-time compiled model back (it compiles again on
            # every start, 50 s for the embedded model); inductor's cache works: 13 s after the first.
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        return env

    def start(self) -> None:
        """Start the server in its own process group. It gets SIGKILL if this process dies
        (parent-death signal), and its group is written to ``pid_file`` so that the next start
        reaps whatever a kill left behind (vLLM's own workers included)."""
        env = self.environment()
        if self.pid_file is not None:
            reaped = reap_pid_file(self.pid_file)
            if reaped:
                logger.warning("stopped a vLLM server (pid %d) left behind by an earlier run", reaped)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        logger.info("starting vLLM on %s (log: %s)", self.url, self.log_path)
        with os.fdopen(fd, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=child_setup(self.config.niceness),
            )
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self.proc.pid, PID_MARKER)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until /health answers; on exit or timeout raise EngineError with the log tail."""
        deadline = time.monotonic() + (timeout or self.config.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EngineError(
                    f"vLLM exited with code {self.proc.returncode} while starting; last lines of "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    logger.info("vLLM ready on %s", self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise EngineError(
            f"vLLM did not become healthy within {timeout or self.config.startup_timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Start again on the same port and key (after a crash), and wait until healthy."""
        self.stop(grace=5.0)
        self.start()
        self.wait_ready()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``grace`` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure no worker of its group survives it.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        logger.info("vLLM on %s stopped", self.url)
        self.proc = None
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)


UNKNOWN = "unknown"  # Endpoint.held of an endpoint that went away


@dataclass
class Endpoint:
    url: str
    api_key: str | None
    healthy: bool = True  # answered its last request or health check
    # What it is known to hold: the weights reloaded into it (None: those it started with;
    # UNKNOWN after it stopped answering: it may have restarted), and whether the adapters are
    # all in it. It takes requests only while these match what is served (Engine.in_sync).
    held: Path | None | str = None
    adapters_ok: bool = True

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class Engine:
    """Transport to the serving endpoints: start or attach, load and unload adapters, stream.
    Which version serves is ``collector.serving.Serving``'s to say; requests name their model."""

    def __init__(self, endpoints: list[Endpoint], server: VLLMServer | None = None, hub_repo: str | None = None):
        if not endpoints:
            raise EngineError("no vLLM endpoint: give --vllm-url or let PrefLoop start one")
        self.endpoints = endpoints
        self.server = server
        self.hub_repo = hub_repo  # adapters are loaded by the endpoints from this Hub model repo
        self._rr = itertools.cycle(range(len(endpoints)))
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one weight reload at a time: a swap's, or a resync's
        self.loaded: dict[str, str] = {}  # adapter name -> path
        self._vllm_names: dict[str, str] = {}  # adapter name -> the name vLLM knows it by
        self._inflight: dict[str, int] = {}
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.weights: Path | None = None  # weights reloaded in place (None: the model the servers started with)

    @classmethod
    def launch(cls, config: EngineConfig) -> Engine:
        """Start a managed server and wait for it to be healthy."""
        server = VLLMServer(config)
        server.start()
        return cls.started(server)

    @classmethod
    def started(cls, server: VLLMServer) -> Engine:
        """The engine of a managed server already started (``VLLMServer.start``), once it is
        healthy; stopped if it does not become so."""
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return cls([Endpoint(server.url, server.api_key)], server)

    @classmethod
    def attach(cls, urls: list[str], api_key: str | None = None, hub_repo: str | None = None) -> Engine:
        """Attach to running servers; with ``hub_repo`` they load adapters from the Hub themselves."""
        engine = cls([Endpoint(u.rstrip("/"), api_key) for u in urls], hub_repo=hub_repo)
        for ep in engine.endpoints:
            if not engine._check(ep):
                engine._lost(ep)  # when it answers, the watchdog brings it in sync first
        healthy = [ep for ep in engine.endpoints if ep.healthy]
        if not healthy:
            raise EngineError(f"none of the vLLM endpoints answer: {', '.join(urls)}; is the server running?")
        for ep in healthy:
            try:
                names = engine.models(ep)
            except httpx.HTTPStatusError as e:
                raise EngineError(f"vLLM at {ep.url} refused /v1/models ({e.response.status_code}); "
                                  "check --vllm-api-key") from e
            if BASE not in names:
                raise EngineError(
                    f"vLLM at {ep.url} serves {names}, not {BASE!r}: start it with --served-model-name {BASE} "
                    "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
        return engine

    def close(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()

    # -- health: restart a dead managed server, resync recovered endpoints ------------------

    def start_watchdog(self, every_s: float = 5.0) -> None:
        self._watchdog = threading.Thread(target=self._watch, args=(every_s,), name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.heal()
            except Exception:
                logger.exception("vLLM health check failed")

    def heal(self) -> None:
        """One health pass: restart the managed server if it died; an endpoint that answers but
        may have lost what is served (it went away, or missed a reload) gets the served weights
        and the adapters back before it takes a request again."""
        if self.server is not None and not self.server.alive() and not self._stop.is_set():
            logger.error("vLLM died (exit %s); restarting it", self.server.proc and self.server.proc.returncode)
            self._lost(self.endpoints[0])
            self.server.restart()
        for ep in self.endpoints:
            if not self._probe(ep):
                self._lost(ep)
                continue
            if not self.in_sync(ep) or not self._has_adapters(ep):
                self._resync(ep)
            ep.healthy = True

    def in_sync(self, ep: Endpoint) -> bool:
        """``ep`` holds the served weights and every adapter: requests may go to it."""
        return ep.adapters_ok and ep.held == self.weights

    def _lost(self, ep: Endpoint) -> None:
        """``ep`` did not answer: it may come back restarted, with its first weights and no adapter."""
        ep.healthy, ep.held, ep.adapters_ok = False, UNKNOWN, False

    def _has_adapters(self, ep: Endpoint) -> bool:
        if not self.loaded:
            return True
        try:
            return {self.vllm_name(n) for n in self.loaded} <= set(self.models(ep, raw=True))
        except httpx.HTTPError:
            return False

    def _resync(self, ep: Endpoint) -> None:
        """Put the served weights (reloaded in place) and then the adapters back into ``ep``.
        What fails leaves it out of sync (no request goes to it) for the next pass to retry; a
        reload meanwhile moves the target, and the endpoint stays out until it holds that."""
        with self._reload_lock:
            target = self.weights
            if ep.held != target:
                if target is None:  # nothing reloaded: a restarted server holds the right weights
                    ep.held = None
                else:
                    try:
                        self._reload_on(ep, target, 600.0)
                    except (EngineError, httpx.HTTPError) as e:
                        logger.error("could not reload the served weights %s into %s: %s", target, ep.url, e)
                        return
                    ep.held = target
        for name, path in list(self.loaded.items()):
            try:
                if self.hub_repo:
                    self._resolve_on(ep, name)
                    continue
                r = self._post_load(ep, name, path)
            except AdapterRejected as e:
                logger.error("could not reload %s into %s: %s", name, ep.url, e)
                continue
            except httpx.HTTPError as e:
                logger.error("%s went away while its adapters were reloaded: %s", ep.url, e)
                return
            if r.status_code not in (200, 400):
                logger.error("could not reload %s into %s: %s", name, ep.url, _error_text(r))
        ep.adapters_ok = True
        logger.info("endpoint %s in sync: weights %s, adapters %s", ep.url, self.weights or "as started",
                    sorted(self.loaded))

    # -- endpoints -----------------------------------------------------------------------

    def _probe(self, ep: Endpoint) -> bool:
        try:
            return httpx.get(f"{ep.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _check(self, ep: Endpoint) -> bool:
        ep.healthy = self._probe(ep)
        return ep.healthy

    def pick(self) -> Endpoint:
        """The next healthy endpoint that holds what is served, round robin; rechecks those when
        none looks healthy (one that lost what is served waits for the watchdog's resync)."""
        with self._lock:
            for _ in range(len(self.endpoints)):
                ep = self.endpoints[next(self._rr)]
                if ep.healthy and self.in_sync(ep):
                    return ep
        for ep in self.endpoints:
            if self.in_sync(ep) and self._check(ep):
                return ep
        raise EngineError("no vLLM endpoint is healthy; see the vLLM log")

    def models(self, ep: Endpoint | None = None, raw: bool = False) -> list[str]:
        """Model names the endpoint serves: the base and adapters, by PrefLoop's names (``raw``:
        as vLLM knows them, ``round-0001@digest``)."""
        ep = ep or self.pick()
        r = httpx.get(f"{ep.url}/v1/models", headers=ep.headers, timeout=10)
        r.raise_for_status()
        return [m["id"] if raw else m["id"].split(VERSION_SEP)[0] for m in r.json()["data"]]

    # -- adapters ------------------------------------------------------------------------

    def vllm_name(self, name: str) -> str:
        """The name vLLM serves ``name`` under: ``round-0001@<content digest>``. Several apps (or
        replicas) may attach to one server, each with its own ``round-0001``; the digest keeps
        them apart, where the bare name made the second app silently serve the first's adapter."""
        return self._vllm_names.get(name, name)

    def _post_load(self, ep: Endpoint, name: str, path: str | Path) -> httpx.Response:
        return httpx.post(f"{ep.url}/v1/load_lora_adapter", headers=ep.headers, timeout=120,
                          json={"lora_name": self.vllm_name(name), "lora_path": str(path)})

    def reload_weights(self, path: str | Path, timeout_s: float = 600.0) -> float:
        """Replace the base weights of every endpoint in place with the model folder ``path``
        (safetensors; e.g. a version's adapter merged into the base), without a restart; returns
        the seconds it took. Each endpoint finishes what it is generating and holds new requests
        (vLLM's pause, mode "wait", which also clears its prefix cache), reloads through its
        workers' ``reload_weights`` (vLLM's layer-wise in-place reload), and resumes, also when the
        reload fails (AdapterRejected when the weights are refused, and the endpoint serves what
        it had: vLLM copies into the existing tensors only after reading the new ones). Adapters
        stay registered; vLLM loads them again from their folders at their next request. From the
        call on, these weights are the target: an endpoint that does not get them takes no request
        until the watchdog has put them in (EngineError when none could). Needs servers started
        with ``weight_reload`` (dev routes)."""
        started = time.monotonic()
        with self._reload_lock:
            # What every endpoint must hold from now on: one that does not get it takes no request
            # until the watchdog has put it in (or a later reload moves the target back).
            self.weights = Path(path)
            done, refused = 0, None
            for ep in self.endpoints:
                if not ep.healthy and not self._probe(ep):
                    self._lost(ep)
                    continue
                try:
                    self._reload_on(ep, path, timeout_s)
                except AdapterRejected as e:  # it keeps what it had
                    refused = refused or e
                    continue
                except EngineError as e:  # cannot pause or reload at all: it keeps what it had
                    logger.error("%s", e)
                    continue
                except httpx.HTTPError as e:
                    self._lost(ep)
                    logger.warning("endpoint %s did not answer during a weight reload (%s); it takes no request "
                                   "until it holds %s", ep.url, e, path)
                    continue
                ep.held = self.weights
                done += 1
            if refused is not None:
                raise refused
            if not done:
                raise EngineError(f"no vLLM endpoint could reload the weights in {path}; see the vLLM log")
        seconds = time.monotonic() - started
        logger.info("weights reloaded from %s in %.1f s", path, seconds)
        return seconds

    def check_reload(self) -> None:
        """EngineError unless every endpoint can reload its weights in place (vLLM's dev routes,
        behind its API key: collector/vllm_plugin.py)."""
        for ep in self.endpoints:
            try:
                r = httpx.get(f"{ep.url}/is_paused", headers=ep.headers, timeout=10)
            except httpx.HTTPError as e:
                raise EngineError(f"vLLM at {ep.url} did not answer: {e}") from None
            if r.status_code != 200:
                raise EngineError(
                    f"vLLM at {ep.url} cannot reload weights in place ({r.status_code}), which --serving merged "
                    "needs: start it with VLLM_SERVER_DEV_MODE=1 and PREFLOOP_GUARD_DEV_ROUTES=1 (PrefLoop installed), "
                    "on a filesystem it shares with the app, or use --serving lora")

    def _reload_on(self, ep: Endpoint, path: str | Path, timeout_s: float) -> None:
        """Pause ``ep``, reload its weights from ``path``, resume it. AdapterRejected if it refuses
        these weights, EngineError if it cannot pause, httpx.HTTPError if it does not answer."""
        r = httpx.post(f"{ep.url}/pause", params={"mode": "wait", "clear_cache": "true"},
                       headers=ep.headers, timeout=timeout_s)
        if r.status_code != 200:
            raise EngineError(f"vLLM at {ep.url} cannot pause for a weight reload ({r.status_code}: "
                              f"{_error_text(r)}); start it with weight reload on (dev routes)")
        try:
            r = httpx.post(f"{ep.url}/collective_rpc", headers=ep.headers, timeout=timeout_s,
                           json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
            if r.status_code != 200:
                why = _error_text(r)
                if "memory" in why.lower():  # the machine's state, not the weights': worth another try
                    raise EngineError(f"vLLM at {ep.url} ran out of memory reloading {path}: {why}")
                raise AdapterRejected(f"vLLM at {ep.url} refused the weights in {path}: {why}")
        finally:
            httpx.post(f"{ep.url}/resume", headers=ep.headers, timeout=60)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a peft adapter under ``name`` into every endpoint; AdapterRejected on refusal.

        With ``hub_repo`` the endpoints do not read PrefLoop's files: they load the published round
        ``hub_repo/name`` from the Hub themselves (collector/vllm_plugin.py), on a first request
        made here (and again by themselves after a restart)."""
        if self.hub_repo:
            self._vllm_names[name] = f"{self.hub_repo}/{name}"
            for ep in self.endpoints:
                self._resolve_on(ep, name)
            self.loaded[name] = str(path)
            logger.info("adapter %s loaded from the Hub as %s", name, self.vllm_name(name))
            return
        self._vllm_names[name] = f"{name}{VERSION_SEP}{adapter_digest(path)}"
        for ep in self.endpoints:
            try:
                r = self._post_load(ep, name, path)
            except httpx.HTTPError as e:
                self._lost(ep)
                logger.warning("endpoint %s unreachable while loading %s: %s", ep.url, name, e)
                continue
            if r.status_code == 400 and "already" in r.text:
                continue
            if r.status_code != 200:
                raise AdapterRejected(f"vLLM at {ep.url} refused adapter {name!r} ({path}): {_error_text(r)}")
        self.loaded[name] = str(path)
        logger.info("adapter %s loaded from %s", name, path)

    def _resolve_on(self, ep: Endpoint, name: str) -> None:
        """Make ``ep`` load ``hub_repo/name`` from the Hub: one token asked of it."""
        try:
            r = httpx.post(f"{ep.url}/v1/chat/completions", headers=ep.headers, timeout=600, json={
                "model": self.vllm_name(name), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        except httpx.HTTPError as e:
            self._lost(ep)
            logger.warning("endpoint %s unreachable while loading %s: %s", ep.url, name, e)
            return
        if r.status_code != 200:
            raise AdapterRejected(
                f"vLLM at {ep.url} cannot load {self.vllm_name(name)} from the Hub ({_error_text(r)}): is the round "
                "published, and was the server started with PrefLoop installed and PREFLOOP_HUB_ADAPTERS="
                f"{self.hub_repo}?")

    def unload_adapter(self, name: str) -> None:
        for ep in self.endpoints:
            try:
                httpx.post(f"{ep.url}/v1/unload_lora_adapter", headers=ep.headers, timeout=30,
                           json={"lora_name": self.vllm_name(name)})
            except httpx.HTTPError as e:
                logger.warning("endpoint %s unreachable while unloading %s: %s", ep.url, name, e)
        self.loaded.pop(name, None)
        self._vllm_names.pop(name, None)
        logger.info("adapter %s unloaded", name)

    def inflight(self, model: str) -> int:
        """Requests now streaming from ``model`` (an adapter name or the base)."""
        with self._lock:
            return self._inflight.get(model, 0)

    def _track(self, model: str, delta: int) -> None:
        with self._lock:
            self._inflight[model] = self._inflight.get(model, 0) + delta

    # -- generation ----------------------------------------------------------------------

    def stream_chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST a streaming chat completion; yields the parsed SSE chunks. An endpoint that
        cannot be reached is marked down and the request goes to the next one."""
        body = {**body, "stream": True}
        self._track(body["model"], +1)
        sent = {**body, "model": self.vllm_name(body["model"])}
        try:
            for _ in range(len(self.endpoints)):
                ep = self.pick()
                try:
                    yield from self._stream_from(ep, sent)
                    return
                except httpx.ConnectError as e:
                    self._lost(ep)
                    logger.warning("vLLM at %s unreachable (%s); trying another endpoint", ep.url, e)
                except httpx.HTTPError as e:  # broke mid-stream: the answer is lost, say so
                    self._lost(ep)
                    raise EngineError(f"the stream from vLLM at {ep.url} broke: {e}; ask for a new pair") from e
            raise EngineError("no vLLM endpoint could be reached; see the vLLM log")
        finally:
            self._track(body["model"], -1)

    def _stream_from(self, ep: Endpoint, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with httpx.stream(
            "POST", f"{ep.url}/v1/chat/completions", headers=ep.headers, json=body,
            timeout=httpx.Timeout(600.0, connect=5.0),
        ) as r:
            if r.status_code != 200:
                r.read()
                raise EngineError(f"vLLM at {ep.url} answered {r.status_code}: {_error_text(r)}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data.strip() == "[DONE]":
                    return
                yield json.loads(data)

    def chat(self, messages: list[dict[str, str]], model: str | None = None, **params: Any) -> list[str]:
        """A non-streaming chat completion; returns the text of each choice."""
        for _ in range(len(self.endpoints)):
            ep = self.pick()
            try:
                r = httpx.post(
                    f"{ep.url}/v1/chat/completions", headers=ep.headers, timeout=600,
                    json={"model": self.vllm_name(model or BASE), "messages": messages, **params},
                )
            except httpx.ConnectError:
                self._lost(ep)
                continue
            except httpx.HTTPError as e:  # went away mid-answer
                self._lost(ep)
                raise EngineError(f"vLLM at {ep.url} did not answer: {e}") from None
            if 400 <= r.status_code < 500:  # refused what was asked (e.g. an adapter it cannot load)
                raise AdapterRejected(f"vLLM at {ep.url} answered {r.status_code}: {_error_text(r)}")
            if r.status_code != 200:
                raise EngineError(f"vLLM at {ep.url} answered {r.status_code}: {_error_text(r)}")
            return [c["message"]["content"] for c in r.json()["choices"]]
        raise EngineError("no vLLM endpoint could be reached; see the vLLM log")


VERSION_SEP = "@"


def adapter_digest(path: str | Path) -> str:
    """A short digest of an adapter's files (config and weights): equal content, equal name."""
    h = hashlib.sha256()
    folder = Path(path)
    for f in sorted(folder.glob("adapter_*")):
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:12]


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        msg = body.get("message") or body.get("error", {}).get("message") or body
    except (ValueError, AttributeError):
        msg = r.text
    return str(msg)[:500]
