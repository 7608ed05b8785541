"""Which adapter serves now, and how a new one goes live.

A promoted adapter is checked before vLLM sees it (rank, target modules, base model, readable
and finite weights), loaded under its versioned name into every endpoint, asked for a smoke
generation, and only then becomes the served version. The previous name is unloaded once its
in-flight requests have drained; its files stay on disk, so rollback is a flip back. ``Serving``
alone decides what is served; the record lives in the store (``storage.serving.ServingLog``), so
an app restart serves the same version. The engine is transport only.

Two modes (``--serving``):

- ``lora``: the served version is an adapter on the base; every token of every pair pays the
  adapter's extra matrix products.
- ``merged``: the served version's adapter is merged into the base (in a child process) and the
  servers reload those weights in place, so ordinary pairs run at the base model's speed. What
  needs another version at the same time (an arena pair's opponent) is a LoRA *delta* over the
  merged weights (``collector.merge.delta_adapter``): the base is the current adapter negated, an
  earlier version the concatenation of its adapter and the negated current one. A pair holds a
  lease on the weights while it generates; a swap takes them exclusively (its in-flight pairs
  finish first, new ones wait), so every answer was produced by the version the pair records.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from collector.engine import BASE, Engine, adapter_digest
from collector.errors import AdapterRejected, EngineError
from collector.merge import MARKER, delta_adapter, tmp_folder
from storage.procs import child_setup
from storage.serving import ServingLog
from storage.votes import VoteStore

logger = logging.getLogger(__name__)


def base_module_names(base_model: str) -> set[str]:
    """Leaf module names of the base model (q_proj, ...), read from safetensors headers only."""
    from safetensors import safe_open

    folder = Path(base_model)
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                parts = key.split(".")
                if parts[-1] in ("weight", "bias") and len(parts) >= 2:
                    names.add(parts[-2])
    return names


def preflight(adapter_dir: Path, base_model: str, max_rank: int) -> dict[str, Any]:
    """Check an adapter before loading it; AdapterRejected with the reason, else its config."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterRejected(f"{adapter_dir}: no adapter_config.json; is this a peft adapter folder?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise AdapterRejected(f"{cfg_path}: not valid JSON ({e})") from e
    rank = int(cfg.get("r", 0))
    if rank > max_rank:
        raise AdapterRejected(
            f"{adapter_dir}: LoRA rank {rank} is greater than the server's --max-lora-rank {max_rank}; "
            "retrain with a smaller --lora-r or restart vLLM with a larger max rank"
        )
    declared = cfg.get("base_model_name_or_path") or ""
    if declared and Path(declared).name != Path(base_model).name and declared != base_model:
        raise AdapterRejected(f"{adapter_dir}: trained on {declared!r}, but the server runs {base_model!r}")
    if Path(base_model).is_dir():
        modules = base_module_names(base_model)
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            if modules and not any(re.fullmatch(targets, m) or re.search(targets, m) for m in modules):
                raise AdapterRejected(
                    f"{adapter_dir}: target_modules pattern {targets!r} matches no module of the base model"
                )
        else:
            unknown = sorted(set(targets) - modules)
            if modules and unknown:
                raise AdapterRejected(
                    f"{adapter_dir}: target modules {unknown} are not in the base model "
                    f"(it has {sorted(modules)[:12]}...)"
                )
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterRejected(f"{adapter_dir}: adapter_model.safetensors is missing")
    try:
        import torch
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as st:
            keys = list(st.keys())
            if not keys:
                raise AdapterRejected(f"{weights}: holds no tensors")
            for key in keys:
                if not torch.isfinite(st.get_tensor(key)).all():
                    raise AdapterRejected(f"{weights}: tensor {key} has NaN or Inf values")
    except AdapterRejected:
        raise
    except Exception as e:
        raise AdapterRejected(f"{weights}: cannot be read ({type(e).__name__}: {e})") from e
    return cfg


class WeightsLease:
    """Many pairs generate on the served weights at once; a weight swap needs them alone. A
    waiting swap goes before pairs that arrive after it (they would otherwise keep it waiting
    for ever on a busy server)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout_s: float) -> Iterator[None]:
        """EngineError if the pairs in flight do not finish within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EngineError(f"the pairs in flight did not finish within {timeout_s:.0f} s; "
                                          "the weights were not swapped (try again)")
                    self._cond.wait(left)
                self._writer = True
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


MODES = ("merged", "lora")
ROOT = Path(__file__).resolve().parent.parent  # where `python -m collector.merge` is importable
DELTA_SEP = "~"  # an arena delta's name: "<version>~<merged version>"
MERGE_TIMEOUT_S = 3600
ROLLBACK = ":rollback"  # the _retry_at key of a CLI rollback request
RETRY_AFTER_S = 300.0  # sync() waits this long before trying again a version that failed for a passing reason


class Serving:
    """What is served over an Engine: the current version, its history, swaps and rollback."""

    def __init__(self, engine: Engine, store: VoteStore, adapters_dir: Path, base_model: str, max_rank: int,
                 mode: str = "lora", merged_dir: Path | None = None, drain_timeout_s: float = 600.0):
        if mode not in MODES:
            raise EngineError(f"unknown serving mode {mode!r}; choose one of {', '.join(MODES)}")
        self.engine = engine
        self.store = store
        self.log = ServingLog(store)
        self.adapters_dir = Path(adapters_dir)
        self.base_model = base_model
        self.max_rank = max_rank
        self.mode = mode
        self.merged_dir = Path(merged_dir) if merged_dir else self.adapters_dir.parent / "merged"
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self._lease = WeightsLease()
        self._merging = threading.Lock()  # one merge at a time: two would write the same folder
        self._pending: set[str] = set()  # merged for a swap or rollback on its way: not pruned
        self._retry_at: dict[str, float] = {}  # version -> when sync() tries it again after a transient failure
        self._current = BASE
        # Merged mode: the version whose merged weights the servers hold; None until restore()
        # knows (servers PrefLoop did not start may hold weights an earlier run reloaded).
        self._weights: str | None = BASE if engine.server is not None else None

    @property
    def current(self) -> str:
        """The version new same-policy pairs come from (``base`` or an adapter name)."""
        return self._current

    def history(self) -> list[str]:
        return self.log.history()

    # -- what a pair generates on --------------------------------------------------------------

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Hold while a pair is chosen and generated: in merged mode the weights do not change
        under it (a swap waits until it ends); in lora mode versions are adapters that stay
        loaded while used, and this costs nothing."""
        if self.mode != "merged":
            yield
            return
        with self._lease.shared():
            yield

    def route(self, version: str) -> str:
        """The model name a request for ``version`` is sent to (call under ``lease``): the
        version's adapter in lora mode; in merged mode the served weights themselves (``base``,
        vLLM's name for them) for the merged version, a delta adapter for any other."""
        if self.mode != "merged":
            return version
        if version == self._weights:
            return BASE
        with self._lock:
            return self._load_delta(version)

    def _delta_name(self, version: str) -> str:
        return f"{version}{DELTA_SEP}{self._weights}"

    def _load_delta(self, version: str) -> str:
        """The delta from the merged weights to ``version``, written and loaded if needed (with
        ``_lock`` held)."""
        name = self._delta_name(version)
        if name in self.engine.loaded:
            return name
        target = None if version == BASE else self.adapters_dir / version
        if target is not None and not target.is_dir():
            raise AdapterRejected(f"adapter {version!r} not found in {self.adapters_dir}")
        folder = delta_adapter(target, self.adapters_dir / self._weights, self.merged_dir / "deltas" / name,
                               self.base_model)
        self.engine.load_adapter(name, folder)
        return name

    def _drop_deltas(self) -> None:
        """Unload the deltas of the weights being replaced (with the lease exclusive: none in use)."""
        for name in [n for n in self.engine.loaded if DELTA_SEP in n]:
            self.engine.unload_adapter(name)
        shutil.rmtree(self.merged_dir / "deltas", ignore_errors=True)

    # -- merged weights ------------------------------------------------------------------------

    def _weights_folder(self, version: str) -> Path:
        """The folder of ``version``'s merged weights (the base model's own for the base), merged
        now in a child process if there is none for this adapter's content."""
        if version == BASE:
            return base_folder(self.base_model)
        adapter = self.adapters_dir / version
        if not adapter.is_dir():
            raise AdapterRejected(f"adapter {version!r} not found in {self.adapters_dir}")
        out = self.merged_dir / version
        if _holds(out, adapter):
            return out
        with self._merging:
            return out if _holds(out, adapter) else self._merge(version, adapter, out)  # or merged meanwhile

    def _merge(self, version: str, adapter: Path, out: Path) -> Path:
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "collector.merge", str(self.base_model), str(adapter), str(out)],
                capture_output=True, text=True, timeout=MERGE_TIMEOUT_S, cwd=ROOT,
                preexec_fn=child_setup(10))  # dies with the app; annotators' requests first
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp_folder(out), ignore_errors=True)
            raise EngineError(f"merging {version!r} took over {MERGE_TIMEOUT_S} s; it is tried again later") from None
        if proc.returncode != 0:
            shutil.rmtree(tmp_folder(out), ignore_errors=True)  # a killed child's half folder
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            if proc.returncode == 2:  # the adapter cannot be merged: never worth a retry
                raise AdapterRejected(f"adapter {version!r} could not be merged into the base: {last}")
            # Killed (the OOM killer: -9), out of disk or memory (3): the adapter may be fine.
            raise EngineError(f"the merge of {version!r} failed (exit {proc.returncode}): {last}; tried again later")
        logger.info("merged %s into the base in %.1f s", version, time.monotonic() - t0)
        return out

    def _reload(self, version: str, smoke: bool) -> None:
        """Make the servers hold ``version``'s merged weights (with the lease exclusive and
        ``_lock`` held). A failed reload or smoke answer puts the previous weights back."""
        folder = self._weights_folder(version)
        previous = self._weights
        try:  # found before anything changes: a failure must have weights to fall back on
            back = self._weights_folder(previous) if previous is not None else None
        except EngineError as e:
            raise EngineError(f"the weights serving now ({previous}) cannot be found to fall back on: {e}") from None
        try:
            self.engine.reload_weights(folder)
            if smoke:
                text = self.engine.chat([{"role": "user", "content": "Say hello."}], model=BASE, max_tokens=8,
                                        temperature=0.0)[0]
                if not text.strip():
                    raise AdapterRejected(f"merged {version!r} produced an empty smoke answer")
        except Exception as e:
            if version != BASE and isinstance(e, AdapterRejected):  # merged again next time, not trusted
                (folder / MARKER).unlink(missing_ok=True)
            if back is not None:
                try:
                    self.engine.reload_weights(back)
                except EngineError as again:  # the target is the previous weights: the watchdog puts them back
                    logger.error("could not put %s's weights back: %s", previous, again)
            # AdapterRejected (refused weights, an empty smoke answer) marks the version broken;
            # any other EngineError (servers down) leaves it to be tried again.
            raise
        self._drop_deltas()
        self._weights = version

    def _prune_merged(self) -> None:
        """Keep the merged folders of the version served and of the one a rollback would serve."""
        if not self.merged_dir.is_dir():
            return
        # Under _lock, no reload reads a folder meanwhile; under _merging, no merge writes one
        # (a merge in progress writes ".NAME.tmp" and renames it when done).
        with self._lock:
            if not self._merging.acquire(blocking=False):
                return  # a merge is running (minutes on a GPU model): the next swap prunes
            try:
                history = self.history()
                keep = {self._current, self._weights, *self._pending, *(history[-2:-1] or []), "deltas"}
                for folder in self.merged_dir.iterdir():
                    if folder.is_dir() and folder.name not in keep and not folder.name.startswith("."):
                        shutil.rmtree(folder, ignore_errors=True)
            finally:
                self._merging.release()

    # -- changing what is served ---------------------------------------------------------------

    def _serve(self, name: str, history: list[str]) -> None:
        """Flip to ``name`` (loaded already) and record it (call with ``_lock`` held)."""
        if self.mode == "lora" and name != BASE and name not in self.engine.loaded:
            raise EngineError(f"adapter {name!r} is not loaded; load it first")
        previous, self._current = self._current, name
        self.log.record(history)
        logger.info("serving %s (was %s)", name, previous)

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Around a change of what is served: in merged mode the lease, exclusively (pairs in
        flight finish, new ones wait), then ``_lock``."""
        if self.mode == "merged":
            with self._lease.exclusive(self.drain_timeout_s), self._lock:
                yield
        else:
            with self._lock:
                yield

    def restore(self) -> str:
        """At start: serve the persisted adapter, else the one before it, else the base."""
        with self._changing():
            history = self.history()
            while history:
                name = history[-1]
                try:
                    self._load(name)
                    self._serve(name, history)
                    break
                except EngineError as e:  # AdapterRejected included
                    logger.warning("cannot restore %s (%s); falling back", name, e)
                    history.pop()
            else:
                if self.mode == "merged" and self._weights is None:
                    self._load(BASE)  # EngineError: what the servers hold is unknown, nothing is served
                self._serve(BASE, history)
        logger.info("serving restored: %s", self.current)
        return self.current

    def _load(self, name: str, smoke: bool = False) -> None:
        """Make ``name`` servable (with ``_changing`` or ``_lock`` held): in lora mode load its
        adapter from this data dir's adapters; in merged mode reload the servers' weights."""
        if self.mode == "merged":
            if name != self._weights:
                if name != BASE:
                    preflight(self.adapters_dir / name, self.base_model, self.max_rank)
                self._reload(name, smoke)
            return
        if name == BASE:
            return
        path = self.adapters_dir / name
        loaded = self.engine.loaded.get(name)
        if loaded == str(path):
            return
        if not path.is_dir():
            raise AdapterRejected(f"adapter {name!r} not found in {self.adapters_dir}")
        preflight(path, self.base_model, self.max_rank)
        if loaded is not None:  # the same name from another folder: replace it
            self.engine.unload_adapter(name)
        self.engine.load_adapter(name, path)

    def swap(self, name: str) -> float:
        """Make ``name`` serve: pre-flight, load (merged: merge and reload), smoke-generate, flip.
        Returns seconds taken."""
        t0 = time.perf_counter()
        self._pending.add(name)
        try:
            if self.mode == "merged" and name != BASE:
                preflight(self.adapters_dir / name, self.base_model, self.max_rank)
                self._weights_folder(name)  # merged before the pairs are held, which then wait only for the reload
            with self._changing():
                previous = self.current
                if self.mode == "merged":
                    self._load(name, smoke=True)
                else:
                    self._load(name)
                    self._smoke(name)
                self._serve(name, [h for h in self.history() if h != name] + [name])
        finally:
            self._pending.discard(name)
        logger.info("swap %s -> %s in %.2fs", previous, name, time.perf_counter() - t0)
        if self.mode == "merged":
            self._prune_merged()
        else:
            self._retire(previous)
        return time.perf_counter() - t0

    def _smoke(self, name: str) -> None:
        """Lora mode: ``name`` must answer a short greedy question, else it is unloaded."""
        try:
            text = self.engine.chat(
                [{"role": "user", "content": "Say hello."}], model=name, max_tokens=8, temperature=0.0
            )[0]
        except AdapterRejected as e:  # the server answered, refusing it
            self.engine.unload_adapter(name)
            raise AdapterRejected(f"adapter {name!r} failed its smoke generation: {e}") from e
        except EngineError:  # no server to ask: nothing said about the adapter; tried again later
            self.engine.unload_adapter(name)
            raise
        if not text.strip():
            self.engine.unload_adapter(name)
            raise AdapterRejected(f"adapter {name!r} produced an empty smoke answer")

    def serve_on_purpose(self, name: str) -> float:
        """An admin's choice of version: served even if it was rolled back before (the schedule
        then keeps it); returns the seconds the swap took."""
        self.log.clear_rolled_back(name)
        return self.swap(name)

    def arena_opponent(self, rng) -> str | None:
        """An earlier served version or the base, ready to route to (call under ``lease``); None
        while the base serves."""
        if self.current == BASE:
            return None
        choices = [BASE] + [h for h in self.history() if h != self.current]
        pick = rng.choice(choices)
        for candidate in dict.fromkeys([pick, BASE]):  # the base when the pick cannot be served
            try:
                if self.mode == "merged":
                    self.route(candidate)
                elif candidate != BASE:
                    with self._lock:
                        self._load(candidate)
                return candidate
            except Exception as e:  # a broken or missing version costs the arena a pair, never the annotator
                logger.warning("arena opponent %s unavailable (%s)", candidate, e)
        return None

    def rollback(self) -> str:
        """Serve the version before the current one (or the base); returns the name now serving."""
        premerged = (self.history()[:-1] or [BASE])[-1]
        self._pending.add(premerged)
        try:
            if self.mode == "merged" and premerged not in (BASE, self._weights):
                self._weights_folder(premerged)  # merged before the pairs are held, as in swap
            with self._changing():
                history = self.history()
                current = history.pop() if history else BASE
                target = history[-1] if history else BASE
                self._load(target)
                self._serve(target, history)
                self.log.mark_rolled_back(current)
        finally:
            self._pending.discard(premerged)
        logger.info("rollback %s -> %s", current, target)
        if self.mode == "merged":
            self._prune_merged()
        else:
            self._retire(current)
        return target

    def _retire(self, name: str) -> None:
        """Unload ``name`` in the background once no request is using it."""
        if name == BASE:
            return

        def drain() -> None:
            while True:
                while self.engine.inflight(name) > 0:
                    time.sleep(0.2)
                # Under the lock: a swap or rollback back to ``name`` cannot interleave.
                with self._lock:
                    if name == self._current or name not in self.engine.loaded:
                        return
                    if self.engine.inflight(name) == 0:
                        self.engine.unload_adapter(name)
                        return

        threading.Thread(target=drain, name=f"retire-{name}", daemon=True).start()

    def sync(self, promoted: list[str]) -> str | None:
        """Serve the newest promoted adapter that is not serving yet and was never rolled back;
        first carry out a rollback asked for from the CLI (``python -m trainer rollback``)."""
        if time.monotonic() >= self._retry_at.get(ROLLBACK, 0.0) and self.log.take_rollback_request():
            try:
                return self.rollback()
            except AdapterRejected:  # the version before cannot serve: the request is answered with the error
                raise
            except EngineError:  # servers down, a merge killed: carried out later
                self.log.request_rollback()
                self._retry_at[ROLLBACK] = time.monotonic() + RETRY_AFTER_S
                raise
        for name in reversed(promoted):
            if self.log.skipped(name):
                continue
            if name in self.history():
                return None
            if time.monotonic() < self._retry_at.get(name, 0.0):
                return None  # failed for a passing reason (a merge killed, servers down): later
            try:
                self.swap(name)
            except AdapterRejected as e:
                # Remember it, so the scheduler does not retry a broken adapter every few seconds.
                self.log.mark_swap_failed(name, str(e))
                logger.error("adapter %s not swapped in: %s", name, e)
                continue
            except EngineError:
                self._retry_at[name] = time.monotonic() + RETRY_AFTER_S  # a merge can take minutes and GBs
                raise
            self._retry_at.pop(name, None)
            return name
        return None


def _holds(out: Path, adapter: Path) -> bool:
    """``out`` is a finished merge of this adapter's content (its marker names the digest)."""
    try:
        return json.loads((out / MARKER).read_text())["digest"] == adapter_digest(adapter)
    except (OSError, ValueError, KeyError):
        return False


def base_folder(base_model: str) -> Path:
    """The local folder of the base model's weights: the model itself, or its Hub snapshot
    (already in the cache: vLLM downloaded it to serve it)."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise EngineError(f"the base model {base_model!r} has no local copy to reload: {e}") from e
