"""Routing traces: which experts every token chose in every MoE layer, recorded from a real model.

A trace is what every caching number of this project is computed from (expert reuse, cache hit
rates, bytes fetched per token), so it keeps enough metadata to say where it came from: the
model, a hash of its config, a hash of its router weights (two traces of the same model with a
fine-tuned router differ only there), and the text.

Token order: a trace holds sequences one after another (`offsets`, CSR style). Within a sequence
tokens are in position order; for `generate()` that is the prompt (prefill) followed by every
generated token that was fed back to the model (the last generated token never is, and neither
is anything after a sequence's end-of-sequence token). Padding is dropped. Routing of a token does
not depend on its batch mates, so a batched recording equals one sequence at a time.

Legend: L = MoE layers, N = tokens in the trace, K = top-k, E = routed experts, S = sequences,
B = batch, P = prompt length.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from remoe_engine.families import family_of, find_moe_blocks, router_outputs

__all__ = [
    "FORMAT_VERSION",
    "RouterTap",
    "RoutingTrace",
    "TraceFileError",
    "TraceMeta",
    "concatenate",
    "frozen_routers",
    "load",
    "record",
    "synthetic",
]

# Bumped when the file layout changes; `load` refuses versions it does not know.
FORMAT_VERSION = 1
_META_KEY = "remoe_trace"


class TraceFileError(ValueError):
    """A trace file that cannot be read: the message names the file and what is wrong."""


@dataclass
class TraceMeta:
    """Where a trace came from and the shape of its routing.

    Args:
        top_k: experts per token K.
        num_experts: routed experts per layer E.
        layers: decoder-layer index of each MoE layer in the trace (length L).
        model: model name or checkpoint path ("" if unknown).
        model_type: transformers model_type, e.g. "qwen3_moe".
        config_hash: sha256 (16 hex digits) of the model config, paths and versions left out.
        router_hash: sha256 (16 hex digits) of every router's weights, in layer order: the
            "router version" (a fine-tuned router changes it, nothing else does).
        expert_bytes: bytes of one routed expert's weights (all its tensors), None if unknown
            (e.g. experts offloaded and not in the module).
        source: what text was routed (file names, a description), free-form.
        mode: "forward", "generate" or "synthetic".
        extra: anything else worth keeping (JSON-serializable).
    """

    top_k: int
    num_experts: int
    layers: list[int]
    model: str = ""
    model_type: str = ""
    config_hash: str = ""
    router_hash: str = ""
    expert_bytes: int | None = None
    source: str = ""
    mode: str = "forward"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoutingTrace:
    """Per-layer top-k expert ids of every token, with sequence boundaries and metadata.

    Args:
        ids: int32 [L, N, K], the experts each token chose in each MoE layer, in the order the
            router returned them (its ranking for most families; the simulator stamps a
            token's experts in this order); distinct within a row, in [0, E).
        offsets: int64 [S + 1], sequence s is tokens offsets[s]:offsets[s + 1]; offsets[0] = 0,
            offsets[-1] = N, non-decreasing.
        meta: TraceMeta.
        token_ids: int64 [N], the input token at each routed position, or None.
        probs: float32 [L, N, E], softmax over the router's E logits (the `P_t` of the ReMoE
            loss, whatever the family's own scoring), or None.
    """

    ids: torch.Tensor  # [L, N, K] int32
    offsets: torch.Tensor  # [S + 1] int64
    meta: TraceMeta
    token_ids: torch.Tensor | None = None  # [N] int64
    probs: torch.Tensor | None = None  # [L, N, E] float32

    def __post_init__(self) -> None:
        self.ids = self.ids.to(torch.int32)
        self.offsets = self.offsets.to(torch.int64)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.to(torch.int64)
        if self.probs is not None:
            self.probs = self.probs.to(torch.float32)
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_experts(self) -> int:
        return self.meta.num_experts

    @property
    def num_sequences(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_accesses(self) -> int:
        """(token, layer, expert) accesses: L * N * K."""
        return int(self.ids.numel())

    def validate(self) -> None:
        """Check shapes and values; raise ValueError saying what is inconsistent."""
        ids, offsets, meta = self.ids, self.offsets, self.meta
        if ids.dim() != 3:
            raise ValueError(f"ids must be [layers, tokens, top_k], got shape {list(ids.shape)}")
        L, N, K = ids.shape
        if K != meta.top_k:
            raise ValueError(f"ids have {K} experts per token but the metadata says top_k "
                             f"{meta.top_k}")
        if len(meta.layers) != L:
            raise ValueError(f"ids have {L} layers but the metadata lists {len(meta.layers)} "
                             f"layer indices")
        if not 1 <= K <= meta.num_experts:
            raise ValueError(f"top_k {K} must be in [1, num_experts={meta.num_experts}]")
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"offsets must be 1-D with at least one entry, got shape "
                             f"{list(offsets.shape)}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != N or bool((offsets.diff() < 0).any()):
            raise ValueError(f"offsets must rise from 0 to the token count {N}, got "
                             f"{offsets[:4].tolist()}...{offsets[-2:].tolist()}")
        if N and (int(ids.min()) < 0 or int(ids.max()) >= meta.num_experts):
            raise ValueError(f"expert ids must be in [0, {meta.num_experts}), found "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if N and K > 1:
            ordered = ids.sort(dim=-1).values
            repeats = (ordered[..., 1:] == ordered[..., :-1]).any(-1)  # [L, N]
            if bool(repeats.any()):
                layer, token = (int(i) for i in repeats.nonzero()[0])
                raise ValueError(f"token {token} of layer {layer} lists an expert twice: "
                                 f"{ids[layer, token].tolist()}")
        if self.token_ids is not None and self.token_ids.shape != (N,):
            raise ValueError(f"token_ids must be [{N}], got {list(self.token_ids.shape)}")
        if self.probs is not None and self.probs.shape != (L, N, meta.num_experts):
            raise ValueError(f"probs must be [{L}, {N}, {meta.num_experts}], got "
                             f"{list(self.probs.shape)}")

    # ---- files -----------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"ids": self.ids, "offsets": self.offsets}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids
        if self.probs is not None:
            tensors["probs"] = self.probs
        return {name: t.contiguous() for name, t in tensors.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace: `.npz` for numpy, anything else as safetensors (tensors + JSON meta).

        Args:
            path: output file; written to a temporary name first, so an interrupted save never
                leaves a truncated trace under the final name.
        """
        path = os.fspath(path)
        header = json.dumps({"format_version": FORMAT_VERSION, **self.meta.to_dict()})
        tmp = path + ".partial"
        if path.endswith(".npz"):
            arrays = {name: t.numpy() for name, t in self._tensors().items()}
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to tmp
                np.savez(f, **arrays, **{_META_KEY: np.array(header)})
        else:
            from safetensors.torch import save_file

            save_file(self._tensors(), tmp, metadata={_META_KEY: header})
        os.replace(tmp, path)


def load(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace written by `RoutingTrace.save` (safetensors or npz, told apart by content).

    Args:
        path: the trace file.

    Returns:
        The RoutingTrace, validated.

    Raises:
        TraceFileError: naming the file and what is wrong (missing, not a trace, truncated,
            an unknown format version, inconsistent tensors).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TraceFileError(f"{path}: no such trace file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        if magic == b"PK\x03\x04":  # a zip archive: numpy's .npz
            tensors, header = _read_npz(path)
        else:
            tensors, header = _read_safetensors(path)
    except TraceFileError:
        raise
    except Exception as error:  # the readers' own errors say little about which file
        kind = "npz" if magic == b"PK\x03\x04" else "safetensors"
        raise TraceFileError(f"{path}: not a readable {kind} trace (truncated or corrupt?): "
                             f"{type(error).__name__}: {error}") from None
    try:
        meta_dict = json.loads(header)
        version = meta_dict.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise TraceFileError(f"{path}: trace format version {version!r} is not supported "
                                 f"(this remoe-engine reads version {FORMAT_VERSION})")
        meta = TraceMeta(**meta_dict)
    except (json.JSONDecodeError, TypeError) as error:
        raise TraceFileError(f"{path}: the trace metadata is malformed: {error}") from None
    missing = {"ids", "offsets"} - set(tensors)
    if missing:
        raise TraceFileError(f"{path}: the trace lacks the tensor(s) {sorted(missing)}")
    try:
        return RoutingTrace(ids=tensors["ids"], offsets=tensors["offsets"], meta=meta,
                            token_ids=tensors.get("token_ids"), probs=tensors.get("probs"))
    except ValueError as error:
        raise TraceFileError(f"{path}: inconsistent trace: {error}") from None


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = (f.metadata() or {}).get(_META_KEY)
        if header is None:
            raise TraceFileError(f"{path}: a safetensors file but not a remoe trace (no "
                                 f"{_META_KEY!r} metadata)")
        return {name: f.get_tensor(name) for name in f.keys()}, header


def _read_npz(path: str) -> tuple[dict[str, torch.Tensor], str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _META_KEY not in npz.files:
                raise TraceFileError(f"{path}: an npz file but not a remoe trace (no "
                                     f"{_META_KEY!r} entry)")
            header = str(npz[_META_KEY])
            tensors = {name: torch.from_numpy(npz[name]) for name in npz.files
                       if name != _META_KEY}
    except zipfile.BadZipFile as error:
        raise TraceFileError(f"{path}: not a readable npz trace (truncated or corrupt?): "
                             f"{error}") from None
    return tensors, header


# ---- recording -------------------------------------------------------------------------------


class RouterTap:
    """The one way this project observes routers: records every router call, outputs unchanged.

    A forward hook on each MoE block's router reads the router's own output
    `(logits [T, E], weights [T, K], ids [T, K])` (the v5 contract of every family, and of the
    patched router) and its input hidden states [T, H]. The hook returns None, so the model
    computes exactly what it would without it. Hooks are removed on exit, also when the model
    raises. Tracing, evaluation and fine-tuning all read routers through this class.

    Args:
        model: a transformers MoE model of a supported family.
        probs: keep softmax(logits) float32 [T, E] of each call, on the host.
        logits: keep each call's logits as the router returned them: on their device, with
            their autograd graph (the fine-tuning loss reads them). Use `take()` per forward.
        reference: per MoE layer a frozen copy of a router (see `frozen_routers`): each call also
            keeps that router's fp32 logits and its own choice of experts for the same hidden
            states, without gradient. This compares two routers on identical inputs (a
            fine-tuned router against the original, or a biased choice against the unbiased
            one), each with its family's own rule.
        ids_on_host: copy the ids to host int32 (one copy per layer and call: fine for tracing
            and evaluation, not a serving path); False keeps them on their device.

    Attributes:
        blocks: the MoE blocks, in layer order.
        ids, probs, logits, reference_logits, reference_ids: per MoE layer, one tensor per call,
            in call order.
    """

    def __init__(self, model: nn.Module, *, probs: bool = False, logits: bool = False,
                 reference: list[nn.Module] | None = None,
                 ids_on_host: bool = True) -> None:
        self.blocks = find_moe_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE blocks to record")
        if reference is not None and len(reference) != len(self.blocks):
            raise ValueError(f"reference has {len(reference)} routers for {len(self.blocks)} "
                             "MoE layers")
        self.keep_probs, self.keep_logits = probs, logits
        self.reference, self.ids_on_host = reference, ids_on_host
        L = len(self.blocks)
        self.ids: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.probs: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.reference_logits: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.reference_ids: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._handles: list[Any] = []

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            logits, _, ids = router_outputs(output)  # [T, E] (None for a few routers), [T, K]
            ids = ids.detach().reshape(-1, ids.shape[-1])
            self.ids[layer].append(ids.to("cpu", torch.int32) if self.ids_on_host else ids)
            if (self.keep_probs or self.keep_logits) and logits is None:
                raise ValueError(f"{type(module).__name__} returns no router logits to record")
            if logits is not None:
                logits = logits.reshape(-1, logits.shape[-1])
            if self.keep_probs:
                self.probs[layer].append(torch.softmax(logits.detach().float(), dim=-1).cpu())
            if self.keep_logits:
                self.logits[layer].append(logits)
            if self.reference is not None:
                frozen = self.reference[layer]
                inputs = [a.detach().float() if isinstance(a, torch.Tensor)
                          and a.is_floating_point() else a for a in args]
                with torch.no_grad():
                    ref_logits, _, ref_ids = router_outputs(frozen(*inputs))
                if ref_logits is None:
                    raise ValueError(f"{type(module).__name__} returns no router logits to "
                                     "compare with")
                self.reference_logits[layer].append(ref_logits.reshape(-1, ref_logits.shape[-1]))
                self.reference_ids[layer].append(ref_ids.reshape(-1, ref_ids.shape[-1]).cpu())

        return hook

    def __enter__(self) -> RouterTap:
        try:
            for layer, block in enumerate(self.blocks):
                self._handles.append(block.router.register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget every recorded call (the hooks stay)."""
        for calls in (self.ids, self.probs, self.logits, self.reference_logits,
                      self.reference_ids):
            for per_layer in calls:
                per_layer.clear()

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Each layer's (logits [T, E], ids [T, K], reference logits [T, E] or None) of the one
        forward since the last take (or clear), then forgets them.

        Raises:
            RuntimeError: unless every router ran exactly once.
        """
        calls = [len(per_layer) for per_layer in self.ids]
        if calls != [1] * len(self.blocks) or (self.keep_logits and
                                               any(len(x) != 1 for x in self.logits)):
            raise RuntimeError(f"expected one router call per MoE layer, got {calls}")
        out = [(self.logits[i][0] if self.keep_logits else None, self.ids[i][0],
                self.reference_logits[i][0] if self.reference is not None else None)
               for i in range(len(self.blocks))]
        self.clear()
        return out

    def to_trace(self, model: nn.Module, offsets: torch.Tensor, *,
                 token_ids: torch.Tensor | None = None, source: str = "",
                 mode: str = "forward") -> RoutingTrace:
        """The recorded calls as one trace, when they came in trace order (windows of one forward
        batch after another, or one token at a time): per layer, every call's rows concatenated.

        Args:
            model: the tapped model (for the metadata).
            offsets: int64 [S + 1] sequence boundaries of the concatenated rows.
            token_ids: int64 [N] the token at each row, or None.
            source, mode: for the metadata.
        """
        ids = torch.stack([torch.cat(calls) for calls in self.ids]).cpu()  # [L, N, K]
        probs = (torch.stack([torch.cat(calls) for calls in self.probs])
                 if self.keep_probs else None)
        meta = _recorded_meta(model, self.blocks, top_k=int(ids.shape[-1]), source=source,
                              model_name=None, generate_kwargs=None, mode=mode)
        return RoutingTrace(ids=ids, offsets=offsets, meta=meta, token_ids=token_ids,
                            probs=probs)


def frozen_routers(model: nn.Module) -> list[nn.Module]:
    """Frozen fp32 copies of a model's routers, in MoE-layer order, unpatched: the reference a
    `RouterTap` compares with after the routers change (fine-tuning, a router delta, a bias)."""
    import copy

    frozen = []
    for block in find_moe_blocks(model):
        # A patched router's state reaches the pool, which is not copied: copy without it.
        state = block.router.__dict__.pop("_remoe", None)
        try:
            router = copy.deepcopy(block.router)
        finally:
            if state is not None:
                block.router._remoe = state
        original = getattr(type(router), "_remoe_original_class", None)
        if original is not None:  # a patched router: its own forward, not route_topk's
            router.__class__ = original
        router.float().eval().requires_grad_(False)
        frozen.append(router)
    return frozen


@torch.no_grad()
def record(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    probs: bool = False,
    generate_kwargs: dict[str, Any] | None = None,
    source: str = "",
    model_name: str | None = None,
) -> RoutingTrace:
    """Record the routing of a forward pass or of `model.generate()`.

    Args:
        model: a transformers v5 MoE causal LM of a supported family.
        input_ids: int64 [B, P] (or [P]) token ids; with padding, pass `attention_mask`.
        attention_mask: int/bool [B, P], 1 for real tokens; padded positions are not recorded.
            Left padding is what `generate()` expects for batches.
        probs: also record softmax(router logits) [L, N, E] float32 (needed for KL metrics).
        generate_kwargs: None records one forward over the input; a dict (e.g.
            `{"max_new_tokens": 64, "do_sample": False}`) runs `model.generate(**generate_kwargs)`
            and records the prefill and every decode step, per sequence in token order. Needs the
            KV cache and one sequence per prompt (no beams, no num_return_sequences > 1).
        source: description of the text (stored in the metadata).
        model_name: name for the metadata (default: the config's `_name_or_path`).

    Returns:
        The RoutingTrace; its `token_ids` are the tokens whose routing it holds (for generate,
        the prompt followed by the generated tokens fed back to the model).

    Raises:
        ValueError: for inputs that cannot be recorded (shape, beams, no KV cache).
    """
    input_ids, mask, kwargs = _record_inputs(input_ids, attention_mask, generate_kwargs)
    B, P = input_ids.shape
    generating = generate_kwargs is not None
    tap = RouterTap(model, probs=probs)
    with tap:
        if generating:
            out = model.generate(input_ids=input_ids, attention_mask=mask.long(), **kwargs)
            sequences = getattr(out, "sequences", out)  # [B, P + G]
        else:
            model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)

    fed, mask = input_ids.cpu(), mask.cpu()  # [B, P + steps]: the token at each routed position
    if generating:
        steps = len(tap.ids[0]) - 1  # decode calls after the prefill
        fed, mask = _with_fed_back(model, fed, mask, sequences[:, P:].cpu(), steps, kwargs)

    ids = torch.stack([_in_trace_order(calls, B, P, mask) for calls in tap.ids])  # [L, N, K]
    prob = (torch.stack([_in_trace_order(calls, B, P, mask) for calls in tap.probs])
            if probs else None)
    lengths = mask.sum(dim=1)  # [B]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    meta = _recorded_meta(model, tap.blocks, top_k=int(ids.shape[-1]), source=source,
                          model_name=model_name, generate_kwargs=kwargs if generating else None)
    return RoutingTrace(ids=ids, offsets=offsets, meta=meta, token_ids=fed[mask], probs=prob)


def _record_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   generate_kwargs: dict[str, Any] | None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """`record`'s inputs, checked: ids [B, P], bool mask [B, P], generate kwargs."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids "
                         f"{list(input_ids.shape)}")
    mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool())
    kwargs = dict(generate_kwargs or {})
    for name in ("num_beams", "num_return_sequences"):
        if int(kwargs.get(name) or 1) != 1:
            raise ValueError(f"record: generate with {name}={kwargs[name]} is not supported "
                             "(one recorded sequence per prompt)")
    return input_ids, mask, kwargs


def _with_fed_back(model: nn.Module, fed: torch.Tensor, mask: torch.Tensor,
                   generated: torch.Tensor, steps: int, kwargs: dict[str, Any]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's tokens and mask [B, P] extended by the `steps` generated tokens [B, G] that
    were fed back to the model. A generated token is fed back unless its sequence already ended
    (a real engine would not run it): the end-of-sequence token itself and everything after it
    are masked out."""
    eos = kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                           dtype=torch.int64)
    ended = torch.isin(generated, eos_ids).long().cumsum(dim=1) > 0  # [B, G]
    return (torch.cat([fed, generated[:, :steps]], dim=1),
            torch.cat([mask, ~ended[:, :steps]], dim=1))


def _in_trace_order(calls: list[torch.Tensor], B: int, P: int, mask: torch.Tensor) -> torch.Tensor:
    """Router calls (the prefill [B * P, X], then one [B, X] per decode step) -> [N, X] in trace
    order: sequence by sequence, positions in order, masked positions dropped."""
    if calls[0].shape[0] != B * P or any(c.shape[0] != B for c in calls[1:]):
        raise ValueError(
            "record: router calls of unexpected sizes "
            f"{[c.shape[0] for c in calls[:4]]}... for batch {B} x prompt {P}: generate() "
            "must use the KV cache, one token per sequence per decode step")
    per_position = [calls[0].view(B, P, -1)] + [c.view(B, 1, -1) for c in calls[1:]]
    return torch.cat(per_position, dim=1)[mask]  # [B, P + steps, X] -> [N, X]


def _recorded_meta(model: nn.Module, blocks: list, *, top_k: int, source: str,
                   model_name: str | None, generate_kwargs: dict[str, Any] | None,
                   mode: str | None = None) -> TraceMeta:
    """A trace's metadata; `mode` defaults to "forward", or "generate" with generate_kwargs."""
    config = model.config
    experts = blocks[0].experts
    num_experts = int(experts.num_experts)
    expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters(recurse=False))
    scalars = {k: v for k, v in (generate_kwargs or {}).items()
               if isinstance(v, (int, float, str, bool))}
    return TraceMeta(
        top_k=top_k,
        num_experts=num_experts,
        layers=[b.layer_idx for b in blocks],
        model=model_name if model_name is not None else str(getattr(config, "_name_or_path", "")),
        model_type=family_of(config).model_type,
        config_hash=config_hash(config),
        router_hash=router_hash(model),
        expert_bytes=expert_bytes // num_experts if expert_bytes else None,
        source=source,
        mode=mode or ("forward" if generate_kwargs is None else "generate"),
        extra={} if generate_kwargs is None else {"generate_kwargs": scalars},
    )


def concatenate(traces: list[RoutingTrace]) -> RoutingTrace:
    """Join traces of the same model and router, sequence lists one after another.

    Args:
        traces: at least one trace; all with the same layers, K, E and router hash.

    Returns:
        A trace with the first trace's metadata and every sequence of all of them.

    Raises:
        ValueError: if the traces do not come from the same routing.
    """
    if not traces:
        raise ValueError("concatenate needs at least one trace")
    first = traces[0]
    for other in traces[1:]:
        for name in ("layers", "top_k", "num_experts", "router_hash"):
            if getattr(other.meta, name) != getattr(first.meta, name):
                raise ValueError(f"cannot concatenate traces with different {name}: "
                                 f"{getattr(first.meta, name)} vs {getattr(other.meta, name)}")
        if (other.probs is None) != (first.probs is None) or (
                (other.token_ids is None) != (first.token_ids is None)):
            raise ValueError("cannot concatenate traces with and without probs / token_ids")
    starts = torch.tensor([0] + [t.num_tokens for t in traces[:-1]]).cumsum(0)
    shifted = [t.offsets[1:] + int(start) for t, start in zip(traces, starts, strict=True)]
    offsets = torch.cat([traces[0].offsets[:1], *shifted])
    return RoutingTrace(
        ids=torch.cat([t.ids for t in traces], dim=1),
        offsets=offsets,
        meta=first.meta,
        token_ids=None if first.token_ids is None else torch.cat([t.token_ids for t in traces]),
        probs=None if first.probs is None else torch.cat([t.probs for t in traces], dim=1),
    )


# Config entries that say how a model was saved or loaded, not what it computes: a model built
# from a config and the same model saved and reloaded must hash alike.
_LOAD_TIME_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype",
                                    "torch_dtype"})


def config_hash(config: Any) -> str:
    """sha256 (16 hex digits) of a transformers config, without paths, versions, load-time
    entries (dtype, architectures) and private keys.

    Args:
        config: a `PretrainedConfig`.

    Returns:
        The same string for the same architecture and hyperparameters wherever it was loaded from.
    """
    items = {k: v for k, v in config.to_dict().items()
             if not k.startswith("_") and k not in _LOAD_TIME_CONFIG_KEYS}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def router_hash(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every MoE router's parameters and buffers, in layer order.

    Args:
        model: a transformers MoE model.

    Returns:
        A digest that changes when (and only when, among routing inputs) a router weight changes.
    """
    digest = hashlib.sha256()
    for block in find_moe_blocks(model):
        state = dict(block.router.named_parameters())
        state.update(block.router.named_buffers())
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            digest.update(f"{block.layer_idx}.{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def synthetic(
    num_tokens: int,
    *,
    layers: int = 4,
    experts: int = 64,
    top_k: int = 8,
    correlation: float = 0.5,
    skew: float = 0.5,
    sequences: int = 1,
    seed: int = 0,
) -> RoutingTrace:
    """A routing trace with realistic locality, for benchmarks and tests (no model needed).

    Each layer's router logits follow an AR(1) process over tokens (consecutive tokens route
    alike, as in real text) plus a fixed per-expert popularity bias drawn from a Zipf law (some
    experts are hot); each token takes the top-k. The defaults give an EOR of about 0.4 at
    E = 64, K = 6 to 8, close to the built-in model's on held-out text.

    Args:
        num_tokens: N, split into `sequences` nearly equal sequences.
        layers, experts, top_k: L, E, K.
        correlation: AR(1) coefficient in [0, 1): 0 = independent tokens, near 1 = sticky.
        skew: Zipf exponent of expert popularity (0 = uniform).
        sequences: number of sequences S.
        seed: random seed.

    Returns:
        RoutingTrace with mode "synthetic".
    """
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(layers * experts, 1, num_tokens, generator=gen)  # [L*E, 1, N]
    # AR(1) as a causal convolution with weights correlation^j, truncated where they are < 1e-3.
    taps = 1 if correlation == 0 else max(1, int(np.ceil(np.log(1e-3) / np.log(correlation))))
    kernel = (correlation ** torch.arange(taps - 1, -1, -1, dtype=torch.float32))
    kernel = kernel * (1.0 - correlation**2) ** 0.5
    smooth = torch.nn.functional.conv1d(noise, kernel.view(1, 1, -1), padding=taps - 1)
    logits = smooth[..., :num_tokens].view(layers, experts, num_tokens).transpose(1, 2)
    ranks = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)]) + 1
    popularity = -skew * torch.log(ranks.float())  # [L, E]
    ids = (logits + popularity[:, None, :]).topk(top_k, dim=-1).indices  # [L, N, K]
    bounds = torch.linspace(0, num_tokens, sequences + 1).round().long()
    meta = TraceMeta(top_k=top_k, num_experts=experts, layers=list(range(layers)),
                     model="synthetic", source=f"AR(1) correlation={correlation} skew={skew} "
                     f"seed={seed}", mode="synthetic")
    return RoutingTrace(ids=ids, offsets=bounds, meta=meta)
