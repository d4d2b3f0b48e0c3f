"""The one place that knows Hugging Face MoE families, mostly by asking the model and transformers.

- Which models: every model type whose experts go through transformers' ExpertsInterface
  (`experts_interface_model_types`).
- Where the router is (`router_call_of`): the MoE block's child whose expert ids reach the
  experts, and the block attributes it passes along.
- How it routes (`learn_routing`): the `route_topk` arguments that reproduce every router of the
  model exactly on random hidden states; `FAMILIES` is a cache of known answers, verified the same
  way, never the gate.
- How checkpoints store experts (`learned_layout`): transformers' own conversion rules.

Everything else (the router swap, the expert computation, the store, the tracer, fine-tuning)
asks this module and stays generic.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class RoutingSpec:
    """The arguments of `remoe_engine.ops.route_topk` that reproduce a family's router."""

    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid" | "softmax_over_topk"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3)
    routed_scaling: float = 1.0
    # Name of the router's buffer added to the selection score only (DeepSeek-V3).
    correction_bias_attr: str | None = None
    # HF returns the weights in the logits' dtype (Qwen, OLMoE, GPT-OSS) or keeps fp32 (Mixtral,
    # DeepSeek); the patched router must hand the experts the same dtype.
    weights_in_logits_dtype: bool = True
    # DeepSeek routers compute their logits in fp32 whatever the model dtype.
    logits_in_fp32: bool = False
    # Where the patched router gets its logits: "linear" computes F.linear of the router's
    # `weight_attr` and `bias_attr` (dotted paths; the fast path), "forward" takes the first
    # output of the router's own forward (routers whose logits are not one linear map).
    logits_from: str = "linear"
    weight_attr: str = "weight"
    bias_attr: str | None = None
    # The router returns [B, S, ...] for [B, S, H] hidden states (Zaya) instead of [T, ...].
    keeps_batch_dims: bool = False

    def op_kwargs(self, router: nn.Module | None = None, args: tuple = ()) -> dict[str, Any]:
        """Keyword arguments for `route_topk` (minus logits and prefer/reuse_bias); `args` are
        the router's arguments after the hidden states ("args.N" names the N-th)."""
        correction_bias = None
        if self.correction_bias_attr is not None and router is not None:
            path = self.correction_bias_attr
            tensor = (args[int(path[5:])] if path.startswith("args.")
                      else module_attr(router, path))
            correction_bias = tensor.float().reshape(-1)
        return dict(
            scoring=self.scoring, renormalize=self.renormalize, correction_bias=correction_bias,
            n_group=self.n_group, topk_group=self.topk_group, group_score=self.group_score,
            routed_scaling=self.routed_scaling,
        )


@dataclass(frozen=True)
class Family:
    """A family of the table: where its router is and how it routes. A cache, not a gate: patch()
    verifies the entry on the model (`learn_routing`); how checkpoints store the experts is
    learned from transformers (`learned_layout`)."""

    model_type: str
    router_attr: str  # attribute of the MoE block holding the router module
    routing: Callable[[Any], RoutingSpec]  # config -> spec


def _softmax_topk(config, *, renormalize: bool | None = None, fp32_weights: bool = False):
    norm = getattr(config, "norm_topk_prob", False) if renormalize is None else renormalize
    return RoutingSpec(top_k=config.num_experts_per_tok, scoring="softmax", renormalize=bool(norm),
                       weights_in_logits_dtype=not fp32_weights)


def _deepseek_v2(config) -> RoutingSpec:
    # norm_topk_prob is ignored by transformers' DeepSeek-V2 router; group max only in
    # group_limited_greedy.
    grouped = config.topk_method == "group_limited_greedy"
    return RoutingSpec(
        top_k=config.num_experts_per_tok, scoring="softmax", renormalize=False,
        n_group=config.n_group if grouped else 1, topk_group=config.topk_group if grouped else 1,
        group_score="max", routed_scaling=float(config.routed_scaling_factor),
        weights_in_logits_dtype=False, logits_in_fp32=True,
    )


def _deepseek_v3(config) -> RoutingSpec:
    return RoutingSpec(
        top_k=config.num_experts_per_tok, scoring="sigmoid",
        renormalize=bool(config.norm_topk_prob), n_group=config.n_group,
        topk_group=config.topk_group, group_score="top2_sum",
        routed_scaling=float(config.routed_scaling_factor),
        correction_bias_attr="e_score_correction_bias", weights_in_logits_dtype=False,
        logits_in_fp32=True,
    )


def _gpt_oss(config) -> RoutingSpec:
    return RoutingSpec(top_k=config.num_experts_per_tok, scoring="softmax_over_topk")


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("qwen2_moe", "gate", _softmax_topk),
        Family("qwen3_moe", "gate", _softmax_topk),
        Family("qwen3_next", "gate", _softmax_topk),
        Family("olmoe", "gate", _softmax_topk),
        Family("mixtral", "gate",
               lambda c: _softmax_topk(c, renormalize=True, fp32_weights=True)),
        Family("deepseek_v2", "gate", _deepseek_v2),
        Family("deepseek_v3", "gate", _deepseek_v3),
        Family("gpt_oss", "router", _gpt_oss),
        # Families whose routers are one of the above, verified by tests/test_patch.py.
        Family("glm4_moe", "gate", _deepseek_v3),
        Family("dots1", "gate", _deepseek_v3),
        Family("flex_olmo", "gate", _softmax_topk),
        Family("minimax", "gate",
               lambda c: _softmax_topk(c, renormalize=True, fp32_weights=True)),
    ]
}


def experts_interface_model_types() -> list[str]:
    """Every model type of the installed transformers whose modeling file uses
    `use_experts_implementation` (fused experts behind ExpertsInterface)."""
    return list(_interface_types())


def text_config_of(config):
    """The text model's config (a multimodal config's `get_text_config()`, else itself)."""
    return getattr(config, "get_text_config", lambda: config)()


def _model_type(config) -> str | None:
    return getattr(text_config_of(config), "model_type", None)


def family_of(config) -> Family:
    """The Family of a transformers config (its text config for multimodal models): the table's
    entry, or for another model type whose experts go through ExpertsInterface, a family whose
    router and routing are learned from the model (`learn_routing`).

    Raises:
        NotImplementedError: naming the model type, for models without ExpertsInterface experts.
    """
    model_type = _model_type(config)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if _uses_experts_interface(model_type):
        return Family(model_type, router_attr="", routing=_learned_only)
    raise _not_experts_interface(f"{model_type!r} ({type(config).__name__})")


def _not_experts_interface(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"remoe-engine does not support model type {what}: its experts do not go through "
        "transformers' ExpertsInterface (fused experts); "
        f"{len(_interface_types())} model types of this transformers do")


_INTERFACE_TYPES: list[str] | None = None


def _interface_types() -> list[str]:
    # Read once per process: it scans every modeling file of transformers.
    global _INTERFACE_TYPES
    if _INTERFACE_TYPES is None:
        from remoe_engine.tiny_models import moe_model_types

        _INTERFACE_TYPES = moe_model_types()
    return _INTERFACE_TYPES


def _uses_experts_interface(model_type: str | None) -> bool:
    """Whether a model type's modeling file (its folder's: "qwen3_5_moe_text" lives in
    models/qwen3_5_moe) uses ExpertsInterface."""
    if model_type is None:
        return False
    if model_type in _interface_types():
        return True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        folder = CONFIG_MAPPING[model_type].__module__.split(".")[2]
    except (KeyError, IndexError):
        return False
    return folder in _interface_types()


def _learned_only(config) -> RoutingSpec:
    raise LookupError("no table entry: learn the routing from the model (learn_routing)")


@dataclass
class MoEBlock:
    """One MoE block of a model, as found by `find_moe_blocks`."""

    layer_idx: int
    name: str  # module path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    # The block's attributes it passes to its router after the hidden states (MiniMax-M2 passes
    # its e_score_correction_bias), as dotted paths on the block.
    router_args: tuple[str, ...] = ()

    def router_extra_args(self) -> tuple:
        """The router's arguments after the hidden states, as the block passes them."""
        return tuple(module_attr(self.block, path) for path in self.router_args)


_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_EXPERTS_MARKERS = ("has_gate", "is_transposed", "num_experts")


def is_experts_module(module: nn.Module) -> bool:
    """An experts container that `use_experts_implementation` decorated."""
    return all(hasattr(module, attr) for attr in _EXPERTS_MARKERS)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of a transformers v5 model, in layer order.

    A block is a module with an `experts` child carrying the fused-experts markers that
    `use_experts_implementation` sets, and a router: the table family's router attribute, else
    the block's child that routes (`router_call_of`).
    """
    family = family_of(model.config)
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not is_experts_module(experts):
            continue
        attr, router_args = ((family.router_attr, ()) if family.router_attr
                             else router_call_of(module, model.config))
        router = getattr(module, attr, None) if attr else None
        if router is None:
            continue
        match = _LAYER_RE.search(name + ".")
        layer_idx = int(match.group(1)) if match else len(blocks)
        blocks.append(MoEBlock(layer_idx, name, module, router, experts, router_args))
    return blocks


def moe_blocks_or_raise(model: nn.Module) -> list[MoEBlock]:
    """`find_moe_blocks`, or an error that says why a model has none remoe-engine can serve.

    Raises:
        NotImplementedError: no fused experts; experts without a router that routes from hidden
            states alone; or two MoE blocks in one decoder layer (Ernie 4.5 VL's text and vision
            experts), which the pool's one-layer-one-block mapping cannot hold.
    """
    blocks = find_moe_blocks(model)
    name = type(model).__name__
    if not blocks:
        experts = [type(m).__name__ for m in model.modules() if is_experts_module(m)]
        if not experts:
            raise NotImplementedError(f"{name}: no MoE block with fused experts was found")
        raise NotImplementedError(
            f"{name}: {len(experts)} {experts[0]} modules, but no router that routes from hidden "
            "states alone next to them (e.g. a router that hashes token ids)")
    layers = [b.layer_idx for b in blocks]
    twice = sorted({i for i in layers if layers.count(i) > 1})
    if twice:
        inside = [b.name for b in blocks if b.layer_idx == twice[0]]
        raise NotImplementedError(
            f"{name}: decoder layer {twice[0]} holds {len(inside)} MoE blocks ({', '.join(inside)}"
            "); remoe-engine serves one MoE block per layer")
    return blocks


_ROUTER_CALL: dict[type, tuple[str | None, tuple[str, ...]]] = {}


class _ExpertsReached(Exception):
    """Stops a probing forward of an MoE block where its experts would run."""


def router_call_of(block: nn.Module, config) -> tuple[str | None, tuple[str, ...]]:
    """(the attribute of an MoE block that holds its router, the block attributes it passes to
    the router after the hidden states), learned once per block class.

    The block runs on random hidden states up to its experts (a pre-hook stops it there, so
    experts without weights, as `load()` builds them, are never touched); the router is the child
    whose output holds the ids the experts receive, and its extra arguments are found among the
    block's parameters and buffers by identity.
    """
    if type(block) in _ROUTER_CALL:
        return _ROUTER_CALL[type(block)]
    import torch

    calls: dict[str, tuple] = {}
    outputs: dict[str, Any] = {}
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def stop(module, args):
        if len(args) >= 2 and isinstance(args[1], torch.Tensor):
            seen["ids"] = args[1]
        raise _ExpertsReached

    handles.append(block.experts.register_forward_pre_hook(stop))
    def record(name: str):
        def hook(module, args, out) -> None:  # returns None: the output stays as it is
            calls[name], outputs[name] = args, out
        return hook

    for name, child in block.named_children():
        if name != "experts":
            handles.append(child.register_forward_hook(record(name)))
    param = next((p for p in block.parameters() if p.device.type != "meta"), None)
    text_config = text_config_of(config)
    found: tuple[str | None, tuple[str, ...]] = (None, ())
    try:
        if param is not None:
            hidden = torch.randn(1, 3, text_config.hidden_size,
                                 generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                block(hidden.to(param.device, param.dtype))
    except _ExpertsReached:
        pass
    except Exception:  # a block that needs more than hidden states: no router found  # noqa: BLE001
        pass
    finally:
        for handle in handles:
            handle.remove()
    ids = seen.get("ids")
    for name, out in outputs.items():
        routed = router_outputs(out)[2]
        if ids is not None and routed is not None and routed.shape == ids.shape and torch.equal(
                routed.reshape(ids.shape).long(), ids.long()):
            tensors = {id(t): path for path, t in [*block.named_parameters(),
                                                   *block.named_buffers()]}
            extra = tuple(tensors.get(id(a), "?") for a in calls[name][1:])
            found = (name, extra) if "?" not in extra else (None, ())
            break
    if found[0] is None:  # the block needs more than hidden states (Gemma 4's decoder layer)
        found = (_router_child(block, text_config.hidden_size), ())
    _ROUTER_CALL[type(block)] = found
    return found


def _router_child(block: nn.Module, hidden_size: int) -> str | None:
    """The child named or typed like a router that returns expert ids for hidden states alone."""
    import torch

    for name, child in block.named_children():
        kind = type(child).__name__
        if name == "experts" or not (name in ("gate", "router") or kind.endswith(("Router",
                                                                                   "Gate"))):
            continue
        param = next((p for p in child.parameters() if p.device.type != "meta"), None)
        if param is None:
            continue
        for shape in ((3, hidden_size), (1, 3, hidden_size)):
            try:
                with torch.no_grad():
                    out = child(torch.randn(*shape).to(param.device, param.dtype))
            except Exception:  # not callable with hidden states alone  # noqa: BLE001
                continue
            if router_outputs(out)[2] is not None:
                return name
    return None


def unpatched_forward(router: nn.Module, *args, **kwargs):
    """The router's own forward (its original class's, when patch() swapped the class)."""
    cls = getattr(type(router), "_remoe_original_class", type(router))
    return cls.forward(router, *args, **kwargs)


def _ids_in(output: Any):
    """The expert ids a router's output holds: its last integer tensor of rank >= 2."""
    import torch

    items = list(output) if isinstance(output, (tuple, list)) else [output]
    return next((t for t in reversed(items) if isinstance(t, torch.Tensor)
                 and not t.is_floating_point() and t.dim() >= 2), None)


def router_outputs(output: Any):
    """(logits [T, E] or None, weights [T, K] or None, ids [T, K] or None) of a router's output:
    the v5 contract is (logits, weights, ids); a few routers return (weights, ids)."""
    import torch

    items = list(output) if isinstance(output, (tuple, list)) else [output]
    ids = _ids_in(items)
    if ids is None:
        return None, None, None
    floats = [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]
    weights = next((t for t in floats if t.shape == ids.shape), None)
    logits = next((t for t in floats if t.shape[:-1] == ids.shape[:-1]
                   and t.shape != ids.shape), None)
    # Zaya returns [B, S, ...]; the contract is [T, ...].
    K = ids.shape[-1]
    return (None if logits is None else logits.reshape(-1, logits.shape[-1]),
            None if weights is None else weights.reshape(-1, K), ids.reshape(-1, K))


def module_attr(module: nn.Module, path: str):
    """`module.a.b` for the dotted path "a.b"."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def routing_spec(model_or_config) -> RoutingSpec:
    """The RoutingSpec of a model (learned and verified on it, see `learn_routing`) or of a
    config (the table's; for a learned family only top_k, from the config's fields).

    Raises:
        NotImplementedError: a model whose router route_topk cannot reproduce (the reason).
    """
    if isinstance(model_or_config, nn.Module):
        learned = learn_routing(model_or_config)
        if learned.spec is None:
            raise NotImplementedError(learned.unsupported)
        return learned.spec
    config = model_or_config
    text_config = text_config_of(config)
    try:
        return family_of(config).routing(text_config)
    except LookupError:
        return RoutingSpec(top_k=config_top_k(text_config))


def config_top_k(config) -> int:
    """Experts per token from a config's field (families name it differently)."""
    for name in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token",
                 "moe_k", "experts_per_token"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
            return int(max(value))
    raise NotImplementedError(f"{type(config).__name__}: no experts-per-token field")


# --- Routing learned from the model ----------------------------------------------------------


@dataclass(frozen=True)
class LearnedRouting:
    """What `learn_routing` found: a spec route_topk reproduces the routers with, or why not.

    `spec` None means the routers run as they are (exact, without the reuse bias), and
    `unsupported` says what route_topk could not reproduce.
    """

    spec: RoutingSpec | None
    top_k: int
    unsupported: str | None = None
    source: str = "learned"  # "table" (the cached entry verified) or "learned" (searched)


# Probe scales: ordinary logits, near-ties (tiny hidden states) and saturated scores.
_PROBE_SCALES = (1.0, 0.02, 6.0)
_PROBE_TOKENS = 48


def learn_routing(model: nn.Module) -> LearnedRouting:
    """Find the route_topk arguments that reproduce every router of a model exactly, by running
    each router on random hidden states (several scales, near-ties included) and comparing the
    experts and weights it returns with route_topk's. The table's entry, when the family has one,
    is tried first; the result is cached on the model.

    Returns:
        LearnedRouting; spec None with the reason when no argument set reproduces a router.
    """
    cached = model.__dict__.get("_remoe_routing")
    if cached is not None:
        return cached
    import dataclasses

    import torch

    blocks = moe_blocks_or_raise(model)
    config = text_config_of(model.config)
    probes = [_probe(block, seed) for seed, block in enumerate(blocks)]
    top_k = int(probes[0][0][1][2].shape[1])
    table = FAMILIES.get(_model_type(model.config))
    candidates = [(table.routing(config), "table")] if table is not None else []
    candidates += [(c, "learned") for c in _candidate_specs(config, blocks[0], top_k)]
    # Where the logits come from depends on the router, not on the candidate: found once (in the
    # table's precision first, where it gives one).
    prefer_fp32 = bool(candidates) and candidates[0][0].logits_in_fp32
    logits_source = _logits_source(blocks[0].router, probes[0], prefer_fp32)
    best_reason = None
    with torch.no_grad():
        # No logits (a router returning only weights and ids): nothing to try, it runs as it is.
        for spec, source in candidates if logits_source is not None else []:
            spec = dataclasses.replace(spec, **logits_source)
            reason = next((r for block, probe in zip(blocks, probes, strict=True)
                           if (r := _mismatch(spec, block, probe)) is not None), None)
            if reason is None:
                spec = dataclasses.replace(spec, keeps_batch_dims=_keeps_batch_dims(blocks[0]))
                result = LearnedRouting(spec, top_k, source=source)
                break
            best_reason = best_reason or reason
        else:
            why = _why_not(blocks[0].router, probes[0]) or best_reason
            result = LearnedRouting(None, top_k, unsupported=(
                f"{type(blocks[0].router).__name__}: route_topk cannot reproduce this router "
                f"({why}); it runs as it is, without the reuse bias"))
    model.__dict__["_remoe_routing"] = result
    return result


def _keeps_batch_dims(block: MoEBlock) -> bool:
    """Whether the router answers [1, T, H] hidden states with [1, T, K] ids."""
    import torch

    weight = next(p for p in block.router.parameters() if p.dim() == 2)
    hidden = torch.zeros(1, 2, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            ids = _ids_in(unpatched_forward(block.router, hidden, *block.router_extra_args()))
    except Exception:  # a router that only takes [T, H] (it never keeps batch dims)  # noqa: BLE001
        return False
    return ids is not None and ids.dim() == 3


def _probe(block: MoEBlock, seed: int):
    """[(hidden [T, H], (logits, weights, ids))] of a router's own forward at each probe scale."""
    import torch

    router = block.router
    weight = next(p for p in router.parameters() if p.dim() == 2)
    gen = torch.Generator().manual_seed(1234 + seed)
    out = []
    with torch.no_grad():
        for scale in _PROBE_SCALES:
            hidden = (torch.randn(_PROBE_TOKENS, weight.shape[-1], generator=gen) * scale).to(
                weight.device, next(iter(router.parameters())).dtype)
            try:
                routed = unpatched_forward(router, hidden, *block.router_extra_args())
            except (IndexError, RuntimeError, ValueError):  # wants [B, S, H] (Zaya, AFMoE)
                routed = unpatched_forward(router, hidden[None], *block.router_extra_args())
            out.append((hidden, router_outputs(routed)))
    return out


def _why_not(router: nn.Module, probe) -> str | None:
    logits, weights, ids = probe[0][1]
    if ids is None:
        return "it returns no expert ids"
    if logits is None:
        return "it returns no router logits"
    if weights is None:
        return "it returns no routing weights"
    if router.training:
        return "it is in training mode (jitter noise)"
    return None


def _logits_source(router: nn.Module, probe, prefer_fp32: bool) -> dict | None:
    """RoutingSpec fields saying where the logits come from: one linear map of the router's own
    parameters when that reproduces the router's logits (the fast path), else its forward;
    None when the router returns no logits."""
    import torch
    import torch.nn.functional as F

    hidden, (logits, _, _) = probe[0]
    if logits is None:
        return None
    E = logits.shape[-1]
    params = dict(router.named_parameters())
    weights = [n for n, p in params.items()
               if p.dim() == 2 and p.shape == (E, hidden.shape[-1])]
    biases = [None] + [n for n, p in params.items() if p.dim() == 1 and p.shape[0] == E
                       and n.split(".")[-1] == "bias"]
    for weight_attr in weights:
        for bias_attr in biases:
            for fp32 in (prefer_fp32, not prefer_fp32):
                w, b = params[weight_attr], None if bias_attr is None else params[bias_attr]
                x = hidden
                if fp32:
                    x, w, b = x.float(), w.float(), None if b is None else b.float()
                mine = F.linear(x, w, b)
                if mine.dtype == logits.dtype and torch.equal(mine, logits):
                    return dict(logits_from="linear", weight_attr=weight_attr,
                                bias_attr=bias_attr, logits_in_fp32=fp32)
    return dict(logits_from="forward")


def _mismatch(spec: RoutingSpec, block: MoEBlock, probe) -> str | None:
    """None when route_topk with `spec` returns the router's own experts and weights on every
    probe; else the first difference."""
    import torch

    from remoe_engine.ops import route_topk

    try:
        kwargs = spec.op_kwargs(block.router, block.router_extra_args())
    except (AttributeError, RuntimeError, IndexError) as error:
        return str(error)
    for scale, (_, (logits, weights, ids)) in zip(_PROBE_SCALES, probe, strict=True):
        if logits is None or weights is None or ids is None:
            return "no logits, weights or ids to compare"
        try:
            mine_w, mine_ids = route_topk(logits, spec.top_k, **kwargs)
        except (RuntimeError, ValueError) as error:
            return str(error).splitlines()[0]
        want_ids, order = ids.long().sort(dim=-1)
        got_ids, got_order = mine_ids.sort(dim=-1)
        if not torch.equal(want_ids, got_ids):
            token = int((want_ids != got_ids).any(-1).nonzero()[0])
            return (f"at scale {scale}, token {token}: the router chose "
                    f"{want_ids[token].tolist()}, route_topk {got_ids[token].tolist()}")
        want_w = weights.float().gather(-1, order)
        got_w = mine_w.gather(-1, got_order)
        if spec.weights_in_logits_dtype:
            got_w = got_w.to(logits.dtype).float()
        if not torch.allclose(want_w, got_w, rtol=1e-5, atol=1e-6):
            token = int((want_w - got_w).abs().amax(-1).argmax())
            return (f"at scale {scale}, token {token}: weights {want_w[token].tolist()} vs "
                    f"route_topk {got_w[token].tolist()}")
        expected = logits.dtype if spec.weights_in_logits_dtype else torch.float32
        if weights.dtype != expected:
            return f"weights in {weights.dtype}, the spec gives {expected}"
    return None


def _candidate_specs(config, block: MoEBlock, top_k: int):
    """Every route_topk argument set worth trying for a router, most common first."""
    import itertools

    import torch

    router = block.router
    E = int(next(p for p in router.parameters() if p.dim() == 2).shape[0])
    corrections = [None] + [
        name for name, t in itertools.chain(router.named_buffers(), router.named_parameters())
        if t.is_floating_point() and t.numel() == E and t.dim() <= 2
        and name.split(".")[-1] != "bias"] + [
        f"args.{i}" for i, t in enumerate(block.router_extra_args())
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == E]
    n_group = getattr(config, "n_group", None) or 1
    topk_group = getattr(config, "topk_group", None) or 1
    groups = [(1, 1, "max")]
    if isinstance(n_group, int) and n_group > 1 and E % n_group == 0:
        groups += [(n_group, topk_group, "top2_sum"), (n_group, topk_group, "max")]
    scalings = [1.0] + sorted({
        float(value) for name in ("routed_scaling_factor", "router_scaling_factor", "route_scale",
                                  "moe_router_scaling_factor")
        if isinstance(value := getattr(config, name, None), (int, float))
        and not isinstance(value, bool) and value not in (0, 1)})
    norm = getattr(config, "norm_topk_prob", None)
    renorms = [bool(norm), not bool(norm)] if norm is not None else [True, False]
    for scoring, renorm, correction, (g, tg, gs), scale, in_dtype in itertools.product(
            ("softmax", "sigmoid", "softmax_over_topk"), renorms, corrections, groups, scalings,
            (True, False)):
        yield RoutingSpec(top_k=top_k, scoring=scoring, renormalize=renorm, n_group=g,
                          topk_group=tg, group_score=gs, routed_scaling=scale,
                          correction_bias_attr=correction, weights_in_logits_dtype=in_dtype)


# --- On-disk expert layouts (read by remoe_engine.store) -------------------------------------


@dataclass(frozen=True)
class DiskPiece:
    """One checkpoint tensor that fills one tensor of an expert's slot, or part of it.

    `pattern` is matched (re.search) against every checkpoint key; group `L` is the layer index and,
    for per-expert keys, group `E` the expert index. A fused key (`fused=True`, no `E` group) holds
    all experts stacked on dim 0: expert e is its e-th slice, contiguous on disk.
    """

    pattern: str
    param: str  # the experts module parameter (and slot tensor) it lands in, e.g. "gate_up_proj"
    part: int = 0  # position along the param's dim 0 when pieces concatenate (gate 0, up 1)
    fused: bool = False


@dataclass(frozen=True)
class DiskLayout:
    """How a family's checkpoint stores routed experts, and the slot order of their tensors.

    `params` are the experts module's fused parameters in slot order; each is the dim-0
    concatenation of its pieces ordered by `part`, which is exactly how transformers' conversion
    mapping builds the in-memory tensor (`gate_up_proj[e] = cat([gate_proj_e, up_proj_e], 0)`).
    """

    name: str
    params: tuple[str, ...]
    pieces: tuple[DiskPiece, ...]
    # Every key of the routed experts, as stored and as transformers names them after its
    # conversion (fused, under the block's `mlp.experts`): what `load()` expects to leave unread.
    key_patterns: tuple[str, ...] = ()
    # Other ways the same parameters may be stored, tried in order when this one matches no key.
    alternatives: tuple[DiskLayout, ...] = ()
    # The experts module keeps its matrices [in, out] (`is_transposed`, GPT-OSS), not [out, in].
    transposed: bool = False


def disk_layout_of(model_type: str, config: dict | None = None) -> DiskLayout:
    """The on-disk expert layout of a model type, learned from transformers (`learned_layout`;
    `config`, a checkpoint's config.json, helps where the type's default config builds nothing).

    Raises:
        NotImplementedError: a model type whose experts transformers does not fuse, or whose
            checkpoint conversion remoe-engine cannot express as byte ranges.
    """
    if model_type not in FAMILIES and not _uses_experts_interface(model_type):
        raise _not_experts_interface(repr(model_type))
    if model_type not in _LEARNED_LAYOUTS:
        _LEARNED_LAYOUTS[model_type] = learned_layout(model_type, config)
    return _LEARNED_LAYOUTS[model_type]


_LEARNED_LAYOUTS: dict[str, DiskLayout] = {}
# A key's layer and anything between the layer and the pattern that follows.
_LAYER_PREFIX = r"(?:^|\.)layers\.(?P<L>\d+)\.(?:[\w.]*?\.)?"
_MERGE_OPS = {"MergeModulelist": 0, "Concatenate": 1}


def learned_layout(model_type: str, config: dict | None = None) -> DiskLayout:
    """How checkpoints of a model type store routed experts, from transformers itself: the
    experts module's fused parameters (a model built on the meta device) and the checkpoint
    conversion rules `from_pretrained` applies to them (`conversion_mapping`).

    - A converter that stacks per-expert tensors (`MergeModulelist(dim=0)`) and concatenates them
      (`Concatenate(dim=1)`) becomes per-expert pieces, in its source order.
    - A renaming onto the experts parameter, or no rule at all, means the checkpoint stores the
      parameter fused, all experts stacked on dim 0.

    As `from_pretrained`, which applies a rule only where its source keys exist, the layout holds
    alternatives (`DiskLayout.alternatives`): the type's own rules, the fused parameters as the
    model names them (a checkpoint `save_pretrained` wrote fused), and every other stacking rule
    transformers has for these parameters. The store takes the first that matches the files.

    Raises:
        NotImplementedError: naming the conversion step that is not a byte-range copy, when no
            alternative is left.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    experts_path, params, names, transposed = _experts_params(model_type, config)
    # The rules are registered under the model type, its folder's, or a model class's name
    # ("Dots3NoteTextModel").
    own = next((r for key in (model_type, *names)
                if (r := get_checkpoint_conversion_mapping(key))), None) or []
    layouts, refusal = [], None
    for rules in [own, [], *_every_rule_set()]:
        if refusal is not None:
            break  # the type's own rules refused: another family's stacking would be wrong
        try:
            layout = _layout_from_rules(model_type, experts_path, params, rules,
                                        own=rules is own or not rules)
        except _IrrelevantRules:
            continue
        except NotImplementedError as error:
            if rules is own:
                refusal = error
            continue
        if layout.pieces not in [known.pieces for known in layouts]:
            layouts.append(layout)
    if refusal is not None:
        raise refusal
    first = layouts[0]
    return dataclasses.replace(first, alternatives=tuple(layouts[1:]), transposed=transposed,
                               key_patterns=tuple(
        dict.fromkeys(p for layout in layouts for p in layout.key_patterns)))


class _IrrelevantRules(Exception):
    """A rule set that builds none of these experts' parameters."""


def _every_rule_set() -> list[list]:
    """Every distinct list of conversion rules transformers registers (the stacking rules of
    qwen2_moe, mixtral, ... that other families reuse)."""
    try:
        from transformers.conversion_mapping import _build_checkpoint_conversion_mapping

        mapping = _build_checkpoint_conversion_mapping()
    except (ImportError, AttributeError, TypeError):
        return []
    seen, out = set(), []
    for rules in mapping.values():
        key = repr([(type(r).__name__, r.source_patterns, r.target_patterns) for r in rules])
        if key not in seen and any(type(r).__name__ == "WeightConverter" for r in rules):
            seen.add(key)
            out.append(rules)
    return out


def _layout_from_rules(model_type: str, experts_path: str, params: list[str],
                       rules: list, own: bool = True) -> DiskLayout:
    pieces = []
    for param in params:
        target = f"experts.{param}"
        converter = next((r for r in rules if type(r).__name__ == "WeightConverter"
                          and any(t.endswith(target) for t in r.target_patterns)), None)
        renaming = next((r for r in rules if type(r).__name__ == "WeightRenaming"
                         and any(t.endswith(target) for t in r.target_patterns)), None)
        if converter is not None:
            for op in converter.operations:
                name = type(op).__name__
                if name not in _MERGE_OPS or getattr(op, "dim", None) != _MERGE_OPS[name]:
                    raise NotImplementedError(
                        f"{model_type}: its checkpoint builds experts.{param} with {name}"
                        f"(dim={getattr(op, 'dim', None)}), not a byte-range copy")
            for part, source in enumerate(converter.source_patterns):
                fused = "*" not in source
                pattern = _expert_glob(source) if not fused else re.escape(source.lstrip("."))
                pieces.append(DiskPiece(_LAYER_PREFIX + pattern + "$", param, part, fused))
        elif not own:
            raise _IrrelevantRules  # another family's rules must build every parameter
        elif renaming is not None:
            source = renaming.source_patterns[0].lstrip("^")
            source = source[2:] if source.startswith("\\.") else source.lstrip(".")
            pieces.append(DiskPiece(_LAYER_PREFIX + source + "$", param, 0, fused=True))
        else:
            pieces.append(DiskPiece(_LAYER_PREFIX + re.escape(f"{experts_path}.{param}") + "$",
                                    param, 0, fused=True))
    if rules and all(p.fused for p in pieces) and not any(
            type(r).__name__ == "WeightRenaming" and any(
                t.endswith(f"experts.{param}") for t in r.target_patterns for param in params)
            for r in rules):
        raise _IrrelevantRules
    in_memory = r"(?:^|\.)layers\.\d+\." + re.escape(experts_path) + r"\."
    return DiskLayout(model_type, tuple(params), tuple(pieces),
                      key_patterns=(in_memory, *(p.pattern for p in pieces)))


def _expert_glob(source: str) -> str:
    """A converter's source pattern ("mlp.experts.*.gate_proj.weight", or the same written as a
    regex, "\\.experts.*.w1.weight") as a regex whose `*` is the expert index group `E`."""
    plain = source.lstrip("^").replace("\\.", ".").lstrip(".")
    return re.escape(plain).replace(r"\.\*\.", r"\.(?P<E>\d+)\.").replace(
        r"\*", r"(?P<E>\d+)")


def _experts_params(model_type: str, config: dict | None
                    ) -> tuple[str, list[str], list[str], bool]:
    """(the experts module's path below its layer, e.g. "mlp.experts"; its parameter names in
    registration order, the slot order; the names conversion rules may be registered under;
    whether it keeps its matrices [in, out]) of a model type, from a model built on the meta
    device (the type's default config, else `config`)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model, errors = None, []
    # The type's defaults, then the checkpoint's own config: its text part, then all of it
    # (DeepSeek-OCR-2's text model has no class of its own; the checkpoint's class builds it).
    attempts = [(model_type, {})]
    for part in (config, (config or {}).get("_full")):
        if part:
            attempts.append((part.get("model_type", model_type),
                             {k: v for k, v in part.items() if k not in ("model_type", "_full")}))
    named = ((config or {}).get("_full") or config or {}).get("architectures") or []
    builders = [AutoModelForCausalLM.from_config, AutoModel.from_config] + [
        getattr(transformers, name)._from_config for name in named if hasattr(transformers, name)]
    for kind, overrides in attempts:
        for build in builders:
            try:
                with torch.device("meta"):
                    model = build(AutoConfig.for_model(kind, **overrides))
                break
            except Exception as error:  # a config transformers cannot build from  # noqa: BLE001
                errors.append(f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
        if model is not None and any(is_experts_module(m) for m in model.modules()):
            break
        model = None  # e.g. Gemma 4's default config turns its MoE block off: try `config`
    if model is None:
        raise NotImplementedError(
            f"{model_type}: transformers builds no model with fused experts from its config"
            + (f" ({errors[-1]})" if errors else ""))
    names = [type(model).__module__.split(".")[2]] + [
        type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Model")]
    for name, module in model.named_modules():
        if is_experts_module(module):
            match = re.search(r"(?:^|\.)layers\.\d+\.(.+)$", name)
            if match is None:
                continue
            return (match.group(1), [n for n, _ in module.named_parameters(recurse=False)], names,
                    bool(getattr(module, "is_transposed", False)))
    raise NotImplementedError(f"{model_type}: no fused experts module under a decoder layer")


def expert_key_patterns(model_type: str) -> tuple[str, ...]:
    """Regular expressions (re.search) matching every routed-expert key of a model type's
    checkpoints, on disk and after transformers' key conversion. Without named groups:
    transformers joins them into one expression, where a repeated group name is an error."""
    return tuple(re.sub(r"\(\?P<\w+>", "(?:", pattern)
                 for pattern in disk_layout_of(model_type).key_patterns)
