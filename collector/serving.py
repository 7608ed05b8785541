"""Which adapter serves now, and how a new one goes live.

A promoted adapter is checked before vLLM sees it (rank, target modules, base model, readable
and finite weights), loaded under its versioned name into every endpoint, asked for a smoke
generation, and only then becomes the served version. The previous name is unloaded once its
in-flight requests have drained; its files stay on disk, so rollback is a flip back. ``Serving``
alone decides what is served; the record lives in the store (``storage.serving.ServingLog``), so
an app restart serves the same version. The engine is transport only.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from collector.engine import BASE, Engine
from collector.errors import AdapterRejected, EngineError
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


class Serving:
    """What is served over an Engine: the current version, its history, swaps and rollback."""

    def __init__(self, engine: Engine, store: VoteStore, adapters_dir: Path, base_model: str, max_rank: int):
        self.engine = engine
        self.store = store
        self.log = ServingLog(store)
        self.adapters_dir = Path(adapters_dir)
        self.base_model = base_model
        self.max_rank = max_rank
        self._lock = threading.Lock()
        self._current = BASE

    @property
    def current(self) -> str:
        """The version new same-policy pairs come from (``base`` or an adapter name)."""
        return self._current

    def history(self) -> list[str]:
        return self.log.history()

    def _serve(self, name: str, history: list[str]) -> None:
        """Flip to ``name`` (loaded already) and record it (call with ``_lock`` held)."""
        if name != BASE and name not in self.engine.loaded:
            raise EngineError(f"adapter {name!r} is not loaded; load it first")
        previous, self._current = self._current, name
        self.log.record(history)
        logger.info("serving %s (was %s)", name, previous)

    def restore(self) -> str:
        """At start: serve the persisted adapter, else the one before it, else the base."""
        with self._lock:
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
                self._serve(BASE, history)
        logger.info("serving restored: %s", self.current)
        return self.current

    def _load(self, name: str) -> None:
        """Load ``name`` from this data dir's adapters (call with ``_lock`` held)."""
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
        """Make ``name`` serve: pre-flight, load, smoke-generate, flip. Returns seconds taken."""
        t0 = time.perf_counter()
        with self._lock:
            self._load(name)
            try:
                text = self.engine.chat(
                    [{"role": "user", "content": "Say hello."}], model=name, max_tokens=8, temperature=0.0
                )[0]
            except EngineError as e:
                self.engine.unload_adapter(name)
                raise AdapterRejected(f"adapter {name!r} failed its smoke generation: {e}") from e
            if not text.strip():
                self.engine.unload_adapter(name)
                raise AdapterRejected(f"adapter {name!r} produced an empty smoke answer")
            previous = self.current
            self._serve(name, [h for h in self.history() if h != name] + [name])
        logger.info("swap %s -> %s in %.2fs", previous, name, time.perf_counter() - t0)
        self._retire(previous)
        return time.perf_counter() - t0

    def serve_on_purpose(self, name: str) -> float:
        """An admin's choice of version: served even if it was rolled back before (the schedule
        then keeps it); returns the seconds the swap took."""
        self.log.clear_rolled_back(name)
        return self.swap(name)

    def arena_opponent(self, rng) -> str | None:
        """An earlier served version or the base, loaded; None while the base serves."""
        if self.current == BASE:
            return None
        choices = [BASE] + [h for h in self.history() if h != self.current]
        pick = rng.choice(choices)
        try:
            with self._lock:
                self._load(pick)
        except EngineError as e:  # AdapterRejected included
            logger.warning("arena opponent %s unavailable (%s); using the base", pick, e)
            return BASE
        return pick

    def rollback(self) -> str:
        """Serve the version before the current one (or the base); returns the name now serving."""
        with self._lock:
            history = self.history()
            current = history.pop() if history else BASE
            target = history[-1] if history else BASE
            self._load(target)
            self._serve(target, history)
            self.log.mark_rolled_back(current)
        logger.info("rollback %s -> %s", current, target)
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
        if self.log.take_rollback_request():
            return self.rollback()
        for name in reversed(promoted):
            if self.log.skipped(name):
                continue
            if name in self.history():
                return None
            try:
                self.swap(name)
            except AdapterRejected as e:
                # Remember it, so the scheduler does not retry a broken adapter every few seconds.
                self.log.mark_swap_failed(name, str(e))
                logger.error("adapter %s not swapped in: %s", name, e)
                continue
            return name
        return None
