"""`patch(model)` and `load(path)`: Hugging Face MoE models with their experts in the slot pool.

patch: the experts of a model already in memory move into a host-tier ExpertStore (and out of
the model), the pool serves them, each router becomes a `route_topk` subclass of itself, and the
experts run through transformers' ExpertsInterface ("remoe"). `Handle.unpatch()` puts back the
original weights (rebuilt byte for byte from the store), classes and experts implementation.

load: builds the model with parameter-less experts modules, so `from_pretrained` never reads an
expert tensor, then serves the experts from the checkpoint's safetensors files (or a file
written by `remoe pack`) through the pool, under `memory_budget` or `slots_per_layer`.

Shared experts, dense layers and each family's own block and return contract are untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remoe_engine import experts as experts_impl
from remoe_engine import router as router_impl
from remoe_engine.families import (
    MoEBlock,
    expert_key_patterns,
    family_of,
    learn_routing,
    moe_blocks_or_raise,
)
from remoe_engine.pool import SLOT_FORMATS, SlotPool, check_pool_size

STORES = ("host", "disk")


@dataclass
class Handle:
    """What `patch()` / `load()` return (for `load`, also `model.remoe`)."""

    model: nn.Module
    blocks: list[MoEBlock]
    pool: Any
    store: Any
    reuse_bias: float
    bias_source: str
    _restore: list = field(default_factory=list)
    _hooks: list = field(default_factory=list)
    # What _attach installed, so stats() need not reach through the modules.
    _router_states: list = field(default_factory=list)
    _experts_states: list = field(default_factory=list)
    _patched: bool = True
    _loaded: bool = False  # from load(): the experts were never in memory, nothing to restore
    prefetch: bool = False  # decode steps prefetch the next MoE layer's guessed experts
    # What computes the experts: "fused", or "per-expert (why)" (experts.choose_kernel).
    experts_kernel: str = ""

    def stats(self) -> dict:
        """Pool counters (hits, misses, evictions, bytes read/copied, stall seconds), per layer and
        total, plus the routers' top-k agreement with the unbiased router when the bias is on."""
        stats = self.pool.stats()
        # Summed on the device first: one host sync for all routers, here only.
        agree = int(sum(state.agree for state in self._router_states))
        routed = sum(state.routed for state in self._router_states)
        stats["topk_agreement"] = agree / routed if routed else 1.0
        stats["reuse_bias"] = self.reuse_bias
        stats["bias_source"] = self.bias_source
        stats["prefetch"] = self.prefetch
        stats["waves"] = sum(state.waves for state in self._experts_states)
        stats["experts_kernel"] = self.experts_kernel
        return stats

    def set_experts_kernel(self, experts_kernel: str) -> None:
        """Switch what computes the experts ("auto", "fused" or "loop", as for `patch`) without
        patching again, e.g. to compare the two on one model. Outputs agree to rounding."""
        _check_experts_kernel(experts_kernel)
        gates, self.experts_kernel = _choose_kernels(self.blocks, self.pool.device,
                                                     experts_kernel)
        for state, gate in zip(self._experts_states, gates, strict=True):
            state.gate = gate

    def reset_stats(self) -> None:
        self.pool.reset_stats()
        for state in self._router_states:
            state.agree = state.routed = 0

    def unpatch(self) -> nn.Module:
        """Restore the original model: weights (rebuilt from the store), routers, experts
        implementation. Returns the model."""
        if self._loaded:
            raise RuntimeError(
                "unpatch(): this model came from remoe_engine.load() and its experts were never "
                "in memory; use transformers' from_pretrained() for an unpatched model")
        if not self._patched:
            return self.model
        for hook in self._hooks:
            hook.remove()
        for undo in reversed(self._restore):
            undo()
        self._patched = False
        return self.model


def _check_kwargs(slots_per_layer, memory_budget, policy, store, reuse_bias, bias_source,
                  prefetch=False, experts_kernel="auto") -> tuple[int | None, int | None]:
    """Every argument of patch()/load() that is not about files, checked before the model is
    touched (the pool's size through the pool's own check). Returns (slots_per_layer, budget
    in bytes)."""
    if not isinstance(prefetch, bool):
        raise ValueError(f"prefetch must be True or False, got {prefetch!r}")
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    _check_experts_kernel(experts_kernel)
    if bias_source not in router_impl.BIAS_SOURCES:
        raise ValueError(
            f"bias_source must be one of {router_impl.BIAS_SOURCES}, got {bias_source!r}")
    if not (reuse_bias >= 0.0 and reuse_bias < float("inf")):
        raise ValueError(f"reuse_bias must be a finite number >= 0, got {reuse_bias!r}")
    return check_pool_size(slots_per_layer, memory_budget, policy)


def _check_experts_kernel(experts_kernel) -> None:
    if experts_kernel not in experts_impl.EXPERTS_KERNELS:
        raise ValueError(f"experts_kernel must be one of {experts_impl.EXPERTS_KERNELS}, got "
                         f"{experts_kernel!r}")


def _make_pool(store, device, slots_per_layer, memory_budget, policy, **pool_kwargs):
    if slots_per_layer is None and memory_budget is None:
        slots_per_layer = store.num_experts  # no budget: every expert fits
    return SlotPool(store, device=device, slots_per_layer=slots_per_layer,
                    memory_budget=memory_budget, policy=policy, **pool_kwargs)


def _restore_experts(blocks: list[MoEBlock], store, devices: list[torch.device],
                     requires_grad: list[bool]) -> None:
    """Put the experts back as parameters, rebuilt byte for byte from the host-tier store."""
    E = store.num_experts
    for i, block in enumerate(blocks):
        views = store.layout.views(store.host_blobs[i * E : (i + 1) * E])  # name -> [E, *shape]
        for name, tensor in views.items():
            param = nn.Parameter(tensor.to(devices[i], copy=True), requires_grad=requires_grad[i])
            setattr(block.experts, name, param)


def _attach(model: nn.Module, blocks: list[MoEBlock], pool, device: torch.device, *,
            reuse_bias: float, bias_source: str, handle: Handle, prefetch: bool = False,
            experts_kernel: str = "auto") -> None:
    """Swap routers, install the experts implementation and the sequence hook."""
    spec = learn_routing(model).spec  # checked against the bias by _blocks_or_raise
    # Before anything is installed: experts_kernel="fused" may refuse.
    gates, handle.experts_kernel = _choose_kernels(blocks, device, experts_kernel)
    for i, block in enumerate(blocks):
        state = router_impl.RouterState(spec=spec, reuse_bias=reuse_bias, bias_source=bias_source)
        state.resident = _resident_fn(pool, block.layer_idx, device)
        state.extra_args = block.router_extra_args
        router_impl.install(block.router, state)
        handle._router_states.append(state)
        handle._restore.append(lambda r=block.router: router_impl.uninstall(r))
        following = blocks[i + 1] if prefetch and i + 1 < len(blocks) else None
        block.experts._remoe = experts_impl.ExpertsState(
            layer=block.layer_idx, pool=pool, gate=gates[i],
            next_layer=None if following is None else (following.layer_idx, following.router))
        handle._experts_states.append(block.experts._remoe)
        handle._restore.append(lambda e=block.experts: e.__dict__.pop("_remoe", None))
    learned = getattr(model, router_impl.LEARNED_ATTR, None)  # from apply_router_delta()
    if learned is not None:
        router_impl.install_learned_bias(model, learned)
        handle.reuse_bias, handle.bias_source = float(learned.strengths.max()), learned.source
    # The routers see tokens flattened to [T, H]; the "previous" bias source needs the sequence
    # shape, and must forget the previous tokens' experts when a forward starts new sequences.
    # One pre-hook on the decoder sees both (its input ids and its cache) once per forward.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    sequences = _Sequences(handle._router_states)
    handle._hooks.append(decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: sequences.start_forward(args, kwargs), with_kwargs=True))
    # always_call: an exception inside the forward must not leave the engine locked.
    handle._hooks.append(decoder.register_forward_hook(
        lambda mod, args, out: sequences.end_forward(out), always_call=True))

    experts_impl.register()
    previous_impl = model.config._experts_implementation
    model.set_experts_implementation(experts_impl.EXPERTS_IMPLEMENTATION)
    handle._restore.append(lambda: model.set_experts_implementation(previous_impl))
    # generate() must not auto-compile around host syncs and Python loops.
    previous_disable = getattr(model.generation_config, "disable_compile", False)
    model.generation_config.disable_compile = True
    handle._restore.append(
        lambda: setattr(model.generation_config, "disable_compile", previous_disable))


def _check_slot_format(slot_format) -> None:
    if slot_format not in ("auto", *SLOT_FORMATS):
        raise ValueError(f"slot_format must be one of {('auto', *SLOT_FORMATS)}, got "
                         f"{slot_format!r}")


def _resolve_slot_format(slot_format: str, store, blocks: list[MoEBlock], device: torch.device,
                         experts_kernel: str) -> str:
    """What the pool's slots hold (load()'s `slot_format`), decided before the pool exists.

    Raises:
        ValueError: "compressed" for a store that is not compressed.
    """
    if store.compressed is None:
        if slot_format == "compressed":
            raise ValueError("slot_format='compressed': these experts are not compressed; pack "
                             "them with `remoe pack --quantize` or load an FP8 / MXFP4 checkpoint")
        return "dequantized"
    if slot_format != "auto":
        return slot_format
    # Compressed slots pay only where the fused op decodes them as it reads (the CPU kernel,
    # measured by bench/bench_quant_e2e.py); the per-expert path would dequantize every expert on
    # every use, and the CUDA path (dequantize the routed blobs, then the dense op) has not run on
    # a GPU yet, so it is opt-in there.
    fused = device.type == "cpu" and all(
        gate is not None for gate in _choose_kernels(blocks, device, experts_kernel)[0])
    return "compressed" if fused else "dequantized"


def _choose_kernels(blocks: list[MoEBlock], device: torch.device, experts_kernel: str
                    ) -> tuple[list, str]:
    """Each block's fused-op gate (None: the per-expert loop), and what runs, in words."""
    chosen = {}  # experts class -> (gate, what runs): one probe per class
    for block in blocks:
        if type(block.experts) not in chosen:
            chosen[type(block.experts)] = experts_impl.choose_kernel(block.experts, device,
                                                                     experts_kernel)
    gates = [chosen[type(block.experts)][0] for block in blocks]
    return gates, "; ".join(sorted({what for _, what in chosen.values()}))


def _resident_fn(pool, layer: int, device: torch.device):
    if device.type != "cuda":
        return lambda: pool.resident_mask(layer)  # [E] bool, already on the host

    def resident() -> torch.Tensor:
        # Through pinned memory: a non_blocking copy from pageable memory is not asynchronous
        # (the driver waits for the stream before it copies), which would put a host sync in
        # every routed layer. The pinned block comes from torch's caching host allocator, which
        # reuses it only after this copy has completed.
        return pool.resident_mask(layer).pin_memory().to(device, non_blocking=True)  # [E] bool
    return resident


class _Sequences:
    """One forward at a time through the engine, and each sequence's own routing state.

    Concurrent `generate()` calls share the routers, the pool and its pins. Forwards are
    serialized (a lock held from the decoder's pre-hook to its post-hook): one forward pins and
    releases its slots before the next starts, so no call fails for slots another holds, and the
    counters add up. On one device the forwards would queue for the compute anyway.

    The "previous" bias source prefers the experts the previous token OF THE SAME SEQUENCE chose,
    so that state belongs to the sequence, not to the router module: it is kept per KV cache
    object (a generate() call's own cache), and a forward without a cache starts afresh.
    """

    def __init__(self, states: list) -> None:
        import threading
        import weakref

        self.states = states
        self.lock = threading.RLock()
        # cache object -> {router state index: previous ids [B, K]}
        self.by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def start_forward(self, args: tuple, kwargs: dict) -> None:
        """Tell every router the forward's sequence shape (B, S) and its sequences' previous
        experts (none when the cache is empty: new sequences)."""
        self.lock.acquire()
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        batch_shape = (tuple(int(n) for n in tokens.shape[:2])
                       if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None)
        # transformers 5.24 renamed `past_key_values` to `cache`; accept both.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        length = 0
        if cache is not None:
            try:
                length = int(cache.get_seq_length())
            except (AttributeError, TypeError):
                length = 0
        previous: dict = {}
        self.pending = previous if cache is None else None
        if cache is not None:
            try:
                if length == 0 or cache not in self.by_cache:
                    self.by_cache[cache] = {}
                previous = self.by_cache[cache]
            except TypeError:  # a cache that cannot be weakly referenced: one sequence per call
                previous = {}
        for index, state in enumerate(self.states):
            state.batch_shape = batch_shape
            state.sequence_previous = previous
            state.index = index

    def end_forward(self, output) -> None:
        """Release the engine; a forward that started without a cache and made one (a prefill
        without generate()) keeps its sequences' state under that cache for the next steps."""
        try:
            created = getattr(output, "past_key_values", None)
            if created is None:
                created = getattr(output, "cache", None)
            if self.pending is not None and created is not None:
                try:
                    self.by_cache[created] = self.pending
                except TypeError:
                    pass
        finally:
            self.pending = None
            self.lock.release()


def _blocks_or_raise(model: nn.Module, reuse_bias: float) -> list[MoEBlock]:
    """The model's MoE blocks, with its routing learned and checked against the reuse bias
    before anything is changed."""
    family_of(model.config)  # raises NotImplementedError naming the class for unknown families
    blocks = moe_blocks_or_raise(model)
    learned = learn_routing(model)
    if learned.spec is None and reuse_bias > 0:
        raise NotImplementedError(f"reuse_bias={reuse_bias}: {learned.unsupported}")
    return blocks


def patch(model: nn.Module, *, slots_per_layer: int | None = None,
          memory_budget: int | str | None = None, policy: str = "lru", store: str = "host",
          reuse_bias: float = 0.0, bias_source: str = "resident", prefetch: bool = False,
          experts_kernel: str = "auto") -> Handle:
    """Serve the experts of an in-memory transformers MoE model from the slot pool.

    Args:
        model: a transformers v5 MoE model of a supported family (`families.FAMILIES`).
        slots_per_layer: expert slots per MoE layer (per-layer pool scope).
        memory_budget: bytes (or "6GiB") for one global pool. Neither given: every expert fits.
        policy: eviction policy, "lru" or "lfu".
        store: "host" (the experts move to host memory, pinned when the model is on a GPU).
        reuse_bias: added to the selection score of preferred experts (0 = exact routing).
        bias_source: "resident" (experts in the pool) or "previous" (the previous token's).
        prefetch: at decode, guess the next MoE layer's experts with its router and start
            loading them early (opt-in: a wrong guess costs a read and may evict a hit; see
            `remoe_engine.experts` and `bench/bench_prefetch.py`). It changes only what is
            resident, so outputs are unchanged, except with a reuse bias toward the "resident"
            experts, which then sees a different pool.
        experts_kernel: "auto" (the fused C++ op on CPU wherever it reproduces the family's
            gate, else the per-expert loop), "fused" (NotImplementedError where it cannot run)
            or "loop" (the per-expert path). `Handle.experts_kernel` says what runs.
    Returns:
        a Handle with stats() and unpatch().
    """
    from remoe_engine.store import ExpertStore

    slots_per_layer, memory_budget = _check_kwargs(slots_per_layer, memory_budget, policy, store,
                                                   reuse_bias, bias_source, prefetch,
                                                   experts_kernel)
    if store != "host":
        raise ValueError("patch() takes a model in memory: store must be 'host' "
                         "(use remoe_engine.load(path, store='disk') to stream from files)")
    if getattr(model, "_remoe_patched", False):
        raise RuntimeError(f"{type(model).__name__} is already patched; unpatch() it first")
    blocks = _blocks_or_raise(model, reuse_bias)
    first = [next(b.experts.parameters()) for b in blocks]
    devices = [p.device for p in first]
    requires_grad = [p.requires_grad for p in first]
    device = devices[0]
    if len(set(devices)) > 1:
        # One pool lives on one device; a model split across GPUs (device_map="auto") would
        # compute some layers' experts on the wrong device.
        where = {}
        for block, d in zip(blocks, devices, strict=True):
            where.setdefault(str(d), []).append(block.layer_idx)
        raise NotImplementedError(
            f"{type(model).__name__}'s experts are on several devices ("
            + "; ".join(f"{d}: layers {layers}" for d, layers in where.items())
            + "): remoe-engine serves one device per model; move the model to one device")
    # take=True: each layer's experts leave the model right after they are copied.
    # Pinned only for a GPU pool: pinning is for asynchronous host-to-GPU copies, and it takes
    # host memory the OS can never page out.
    expert_store = ExpertStore.from_model(model, take=True, pin_memory=device.type == "cuda")
    handle = Handle(model, blocks, None, expert_store, reuse_bias, bias_source, prefetch=prefetch)
    handle._restore.append(
        lambda: _restore_experts(blocks, expert_store, devices, requires_grad))
    try:
        handle.pool = _make_pool(expert_store, device, slots_per_layer, memory_budget, policy)
    except Exception:
        handle.unpatch()  # a bad budget must not leave the model without its experts
        raise
    try:
        _attach(model, blocks, handle.pool, device, reuse_bias=reuse_bias,
                bias_source=bias_source, handle=handle, prefetch=prefetch,
                experts_kernel=experts_kernel)
    except Exception:
        handle.unpatch()  # e.g. experts_kernel="fused" refused: the model gets its experts back
        raise
    model._remoe_patched = True
    handle._restore.append(lambda: model.__dict__.pop("_remoe_patched", None))
    return handle


# ------------------------------------------------------------------------------------- load


def _experts_classes(model_class: type) -> dict[str, type]:
    """Experts classes (decorated with use_experts_implementation) of a model's modeling file."""
    module = importlib.import_module(model_class.__module__)
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and name.endswith("Experts")
            and hasattr(obj, "_apply_gate")}


def _parameterless(original: type) -> type:
    """A subclass of an experts class that builds no parameters (so none is ever read)."""

    def __init__(self, config, *args, **kwargs):
        with torch.device("meta"):
            original.__init__(self, config, *args, **kwargs)
        # What the store must provide, name -> shape [E, *per-expert shape] (checked in load()).
        self._remoe_expected_shapes = {n: tuple(p.shape)
                                       for n, p in self.named_parameters(recurse=False)}
        for name in list(self._remoe_expected_shapes):
            delattr(self, name)

    return type(f"Offloaded{original.__name__}", (original,), {
        "__init__": __init__,
        # transformers' post-load init would otherwise try to initialize the missing weights.
        "_is_hf_initialized": True,
    })


@contextlib.contextmanager
def _experts_never_loaded(model_class: type, model_type: str):
    module = importlib.import_module(model_class.__module__)
    saved = _experts_classes(model_class)
    ignored = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None)
    try:
        for name, cls in saved.items():
            setattr(module, name, _parameterless(cls))
        # The expert keys are on disk but have no parameter: expected, not worth a warning.
        model_class._keys_to_ignore_on_load_unexpected = [
            *(ignored or []), *expert_key_patterns(model_type),
            *_compressed_key_patterns(expert_key_patterns(model_type))]
        yield
    finally:
        for name, cls in saved.items():
            setattr(module, name, cls)
        model_class._keys_to_ignore_on_load_unexpected = ignored


def _compressed_key_patterns(patterns: tuple[str, ...]) -> list[str]:
    """The keys beside compressed experts (FP8 `weight_scale_inv`, MXFP4 `_blocks`/`_scales`)
    that the expert key patterns (anchored at the weight's own name) leave out."""
    return [p.removesuffix("$") + suffix for p in patterns if p.endswith("$")
            for suffix in ("_scale_inv$", "_blocks$", "_scales$")]


def _dequantizing(config, kwargs: dict) -> dict:
    """from_pretrained's kwargs for a checkpoint whose config names FP8 or MXFP4 quantization:
    transformers dequantizes the layers it loads (the experts come from the store, dequantized on
    each load), instead of swapping in its own FP8 / MXFP4 experts classes on a GPU."""
    quant = getattr(config, "quantization_config", None)
    if quant is None or "quantization_config" in kwargs:
        return kwargs
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    method = getattr(method, "value", method)
    if method not in ("fp8", "mxfp4"):
        return kwargs
    from transformers import FineGrainedFP8Config, Mxfp4Config

    settings = quant if isinstance(quant, dict) else quant.to_dict()
    cls = FineGrainedFP8Config if method == "fp8" else Mxfp4Config
    return {**kwargs, "quantization_config": cls.from_dict({**settings, "dequantize": True})}


def _check_store_matches(expert_store, blocks: list[MoEBlock], model_type: str) -> None:
    """The store holds exactly the experts the model asks for: its MoE layers, expert count,
    tensor names and per-expert shapes, in a float dtype the slots can hold.

    Raises:
        StoreError: one line naming the store and the first difference.
    """
    from remoe_engine.store import StoreError

    where = f"experts in '{expert_store.source}'"
    if expert_store.model_type not in (model_type, "?"):
        raise StoreError(f"{where} are of a '{expert_store.model_type}' model, but the "
                         f"checkpoint is '{model_type}'")
    layers = [b.layer_idx for b in blocks]
    if list(expert_store.layers) != layers:
        missing = sorted(set(layers) - set(expert_store.layers))
        extra = sorted(set(expert_store.layers) - set(layers))
        raise StoreError(
            f"{where} cover MoE layers {_ranges(expert_store.layers)}, but the model has MoE "
            f"layers {_ranges(layers)}" + (f" (missing: {_ranges(missing)})" if missing else "")
            + (f" (not in the model: {_ranges(extra)})" if extra else ""))
    expected = blocks[0].experts.__dict__.get("_remoe_expected_shapes", {})
    have = {t.name: t.shape for t in expert_store.layout.tensors}
    if expected and set(expected) != set(have):
        raise StoreError(f"{where} hold tensors {sorted(have)}, but the model's experts have "
                         f"{sorted(expected)}")
    num_experts = int(blocks[0].experts.num_experts)
    if expert_store.num_experts != num_experts:
        raise StoreError(f"{where} have {expert_store.num_experts} experts per layer, but the "
                         f"model has {num_experts}")
    for name, shape in expected.items():
        if tuple(shape[1:]) != tuple(have[name]):
            raise StoreError(f"{where}: '{name}' is {list(have[name])} per expert, but the model "
                             f"expects {list(shape[1:])}")
    if expert_store.layout.dtype not in _SLOT_DTYPES:
        raise StoreError(f"{where} are {expert_store.layout.dtype}; remoe-engine computes "
                         f"experts in {', '.join(str(d) for d in _SLOT_DTYPES)}")


_SLOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ranges(values) -> str:
    """[0, 1, 2, 5] -> "0-2, 5" for messages about layer lists."""
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return "[" + ", ".join(out) + "]"


def _detach_from_files(model: nn.Module, files: list[str]) -> int:
    """Copy every CPU tensor of `model` that is memory-mapped from one of `files` into memory of
    its own. transformers keeps safetensors weights mmapped when it needs no conversion; a
    later truncation of the file would then kill the process with SIGBUS on the next access.

    Returns:
        bytes copied.
    """
    mapped = _mapped_ranges({os.path.realpath(f) for f in files})
    if not mapped:
        return 0
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is None or tensor.device.type != "cpu" or tensor.is_meta:
                    continue
                storage = tensor.untyped_storage()
                begin = storage.data_ptr()
                if any(lo <= begin < hi for lo, hi in mapped):
                    tensor.data = tensor.data.clone()
                    copied += storage.nbytes()
    return copied


def _mapped_ranges(paths: set[str]) -> list[tuple[int, int]]:
    """Address ranges [lo, hi) of this process mapped from one of `paths` (Linux); without
    /proc, every file-backed mapping is assumed possible and nothing is reported."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.realpath(parts[5].strip()) in paths:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def _model_class(config) -> type:
    """The class a checkpoint's model is: its causal-LM class, else the class its config names
    (multimodal models, and families transformers maps to no causal LM, e.g. Mistral 4)."""
    import transformers
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        pass
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise NotImplementedError(f"{type(config).__name__}: transformers maps it to no causal-LM "
                              "class and its config.json names no architecture")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device, checked before anything is loaded."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r} but CUDA is not available here (torch "
                               f"{torch.__version__}, CUDA build {torch.version.cuda})")
        from remoe_engine import ops

        if not ops.cuda_kernels_built():
            raise RuntimeError(f"device={str(device)!r} but this build of remoe_engine has no "
                               "CUDA kernels: reinstall it with nvcc and a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={str(device)!r} but only {torch.cuda.device_count()} "
                               "CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return device


def load(path: str | os.PathLike, *, memory_budget: int | str | None = None,
         slots_per_layer: int | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, store: str = "disk", policy: str = "lru",
         reuse_bias: float = 0.0, bias_source: str = "resident", packed: str | None = None,
         num_threads: int = 4, o_direct: bool | str = "auto", prefetch: bool = False,
         experts_kernel: str = "auto", slot_format: str = "auto",
         **from_pretrained_kwargs) -> nn.Module:
    """Load a transformers MoE checkpoint without ever materializing its experts.

    Args:
        path: a Hugging Face checkpoint directory (safetensors, one or many shards).
        memory_budget: bytes or "6GiB" for the expert pool (global scope).
        slots_per_layer: expert slots per MoE layer instead of a budget.
        device: where the model and the pool live (default: cuda if available, else cpu).
        dtype: model dtype (default: the checkpoint's), float32, bfloat16 or float16. The
            experts compute in it too: a load into a slot converts once (e.g. float32 on a CPU
            without fast bf16, where it is several times faster than bf16).
        store: "disk" (read experts from the files on each miss) or "host" (read them all into
            host memory once; pinned when the device is a GPU).
        policy, reuse_bias, bias_source, prefetch, experts_kernel: as for `patch`.
        packed: a file written by `remoe pack` to read experts from instead of the checkpoint.
        num_threads: reader threads of the pool (concurrent storage reads).
        o_direct: read expert files with O_DIRECT, bypassing the page cache: "auto" (default:
            where the filesystem supports it, else buffered), True (required) or False.
        slot_format: for compressed experts (`remoe pack --quantize`, FP8 / MXFP4 checkpoints),
            what a pool slot holds: "compressed" (the blob: the budget holds as many more
            experts as the compression ratio, misses move only compressed bytes, and the fused
            experts op decodes the codes as it reads them; on CUDA it dequantizes the routed
            blobs each call, opt-in until bench/gpu_check.sh has run it on a GPU), "dequantized"
            (the expert in the compute dtype, dequantized on every load), or "auto" (default:
            compressed on the CPU wherever the fused op computes every MoE layer, dequantized
            otherwise, as measured by bench/bench_quant_e2e.py). `stats()["slot_format"]` says
            which runs.
    Returns:
        the transformers model; `model.remoe` is its Handle.

    Raises:
        StoreError: the expert files are missing, corrupt, not regular files, or do not match
            the model (layers, experts, tensor names, shapes).
    """
    from transformers import AutoConfig

    from remoe_engine.store import ExpertStore

    slots_per_layer, memory_budget = _check_kwargs(slots_per_layer, memory_budget, policy, store,
                                                   reuse_bias, bias_source, prefetch,
                                                   experts_kernel)
    _check_slot_format(slot_format)
    if dtype is not None and dtype not in _SLOT_DTYPES:
        raise ValueError(f"dtype must be one of {_SLOT_DTYPES} or None, got {dtype!r}")
    if o_direct not in (True, False, "auto"):
        raise ValueError(f"o_direct must be True, False or 'auto', got {o_direct!r}")
    if not (isinstance(num_threads, int) and 1 <= num_threads <= 256):
        raise ValueError(f"num_threads must be an int in [1, 256], got {num_threads!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    device = _resolve_device(device)  # before minutes of loading, not after
    config = AutoConfig.from_pretrained(path)
    family_of(config)
    # The expert files first: a bad store fails in milliseconds, before from_pretrained reads
    # gigabytes (and before it could block on a FIFO in place of a shard).
    expert_store = (ExpertStore.from_packed(packed) if packed is not None
                    else ExpertStore.from_checkpoint(path))
    model_class = _model_class(config)
    with _experts_never_loaded(model_class, family_of(config).model_type):
        model = model_class.from_pretrained(path, dtype=dtype or "auto",
                                            **_dequantizing(config, from_pretrained_kwargs))
    model.to(device).eval()
    if device.type == "cpu":
        # The model must not depend on the checkpoint's bytes after loading (SIGBUS otherwise).
        checkpoint_files = [os.path.join(path, f) for f in os.listdir(path)
                            if f.endswith(".safetensors")]
        _detach_from_files(model, checkpoint_files)
    blocks = _blocks_or_raise(model, reuse_bias)
    _check_store_matches(expert_store, blocks, family_of(config).model_type)
    compute_dtype = model.dtype
    if store == "host":
        expert_store = expert_store.host_copy(compute_dtype, pin_memory=device.type == "cuda")
    slot_format = _resolve_slot_format(slot_format, expert_store, blocks, device, experts_kernel)
    pool = _make_pool(expert_store, device, slots_per_layer, memory_budget, policy,
                      num_threads=num_threads, o_direct=o_direct, dtype=compute_dtype,
                      slot_format=slot_format)
    handle = Handle(model, blocks, pool, expert_store, reuse_bias, bias_source, _loaded=True,
                    prefetch=prefetch)
    _attach(model, blocks, pool, device, reuse_bias=reuse_bias, bias_source=bias_source,
            handle=handle, prefetch=prefetch, experts_kernel=experts_kernel)
    model.remoe = handle
    return model
