"""The one place that knows Hugging Face MoE families.

Each family maps to its routing spec (what `route_topk` must do to reproduce the family's router
exactly), its router attribute, and its on-disk expert key layout. Everything else (the router
swap, the expert computation, the store, the tracer, fine-tuning) asks this module and stays
generic. A new family is one entry in `FAMILIES`.
"""

from __future__ import annotations

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

    def op_kwargs(self, router: nn.Module | None = None) -> dict[str, Any]:
        """Keyword arguments for `route_topk` (minus logits and prefer/reuse_bias)."""
        correction_bias = None
        if self.correction_bias_attr is not None and router is not None:
            correction_bias = getattr(router, self.correction_bias_attr).float()
        return dict(
            scoring=self.scoring, renormalize=self.renormalize, correction_bias=correction_bias,
            n_group=self.n_group, topk_group=self.topk_group, group_score=self.group_score,
            routed_scaling=self.routed_scaling,
        )


@dataclass(frozen=True)
class Family:
    """How one transformers MoE family routes, where its router is, and how it stores experts."""

    model_type: str
    router_attr: str  # attribute of the MoE block holding the router module
    routing: Callable[[Any], RoutingSpec]  # config -> spec
    # On-disk expert layout: "per_expert" (`...experts.{E}.{gate,up,down}_proj.weight`),
    # "mixtral" (`block_sparse_moe.experts.{E}.w1/w3/w2`) or "fused" (GPT-OSS).
    disk_layout: str = "per_expert"


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
               lambda c: _softmax_topk(c, renormalize=True, fp32_weights=True), "mixtral"),
        Family("deepseek_v2", "gate", _deepseek_v2),
        Family("deepseek_v3", "gate", _deepseek_v3),
        Family("gpt_oss", "router", _gpt_oss, "fused"),
        # Families whose routers are one of the above, verified by tests/test_patch.py.
        Family("glm4_moe", "gate", _deepseek_v3),
        Family("dots1", "gate", _deepseek_v3),
        Family("flex_olmo", "gate", _softmax_topk),
        Family("minimax", "gate",
               lambda c: _softmax_topk(c, renormalize=True, fp32_weights=True), "mixtral"),
    ]
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_of(config) -> Family:
    """The Family of a transformers config (its text config for multimodal models).

    Raises:
        NotImplementedError: naming the model type and listing the supported ones.
    """
    text_config = getattr(config, "get_text_config", lambda: config)()
    model_type = getattr(text_config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"remoe-engine does not support MoE family {model_type!r} "
            f"({type(config).__name__}); supported: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


@dataclass
class MoEBlock:
    """One MoE block of a model, as found by `find_moe_blocks`."""

    layer_idx: int
    name: str  # module path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module


_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of a transformers v5 model, in layer order.

    A block is a module with an `experts` child carrying the fused-experts markers that
    `use_experts_implementation` sets, and a router at the family's router attribute.
    """
    family = family_of(model.config)
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not all(
            hasattr(experts, attr) for attr in ("has_gate", "is_transposed", "num_experts")
        ):
            continue
        router = getattr(module, family.router_attr, None)
        if router is None:
            continue
        match = _LAYER_RE.search(name + ".")
        layer_idx = int(match.group(1)) if match else len(blocks)
        blocks.append(MoEBlock(layer_idx, name, module, router, experts))
    return blocks


def routing_spec(model_or_config) -> RoutingSpec:
    """The RoutingSpec of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    text_config = getattr(config, "get_text_config", lambda: config)()
    return family_of(config).routing(text_config)



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


_PER_EXPERT = r"(?:^|\.)layers\.(?P<L>\d+)\.mlp\.experts\.(?P<E>\d+)\."
_MIXTRAL = r"(?:^|\.)layers\.(?P<L>\d+)\.block_sparse_moe\.experts\.(?P<E>\d+)\."
_FUSED = r"(?:^|\.)layers\.(?P<L>\d+)\.mlp\.experts\."

DISK_LAYOUTS: dict[str, DiskLayout] = {
    layout.name: layout
    for layout in [
        DiskLayout("per_expert", ("gate_up_proj", "down_proj"), (
            DiskPiece(_PER_EXPERT + r"gate_proj\.weight$", "gate_up_proj", 0),
            DiskPiece(_PER_EXPERT + r"up_proj\.weight$", "gate_up_proj", 1),
            DiskPiece(_PER_EXPERT + r"down_proj\.weight$", "down_proj", 0),
        ), key_patterns=(_FUSED,)),
        # Mixtral: w1 = gate, w3 = up, w2 = down.
        DiskLayout("mixtral", ("gate_up_proj", "down_proj"), (
            DiskPiece(_MIXTRAL + r"w1\.weight$", "gate_up_proj", 0),
            DiskPiece(_MIXTRAL + r"w3\.weight$", "gate_up_proj", 1),
            DiskPiece(_MIXTRAL + r"w2\.weight$", "down_proj", 0),
        ), key_patterns=(_FUSED, _MIXTRAL)),
        # GPT-OSS keeps its in-memory layout on disk: [E, H, 2I] interleaved, biases, [E, I, H].
        DiskLayout(
            "fused", ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
            tuple(DiskPiece(_FUSED + name + "$", name, 0, fused=True) for name in (
                "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
            key_patterns=(_FUSED,),
        ),
    ]
}


def family_of_model_type(model_type: str) -> Family:
    """The Family of a `config.json` model_type string.

    Raises:
        NotImplementedError: naming the model type and listing the supported ones.
    """
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"remoe-engine does not support MoE family {model_type!r}; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


def disk_layout_of(model_type: str) -> DiskLayout:
    """The on-disk expert layout of a model type."""
    return DISK_LAYOUTS[family_of_model_type(model_type).disk_layout]


def expert_key_patterns(model_type: str) -> tuple[str, ...]:
    """Regular expressions (re.search) matching every routed-expert key of a model type's
    checkpoints, on disk and after transformers' key conversion. Without named groups:
    transformers joins them into one expression, where a repeated group name is an error."""
    return tuple(re.sub(r"\(\?P<\w+>", "(?:", pattern)
                 for pattern in disk_layout_of(model_type).key_patterns)
