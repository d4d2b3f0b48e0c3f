"""The router swap: each MoE router becomes an instance of a subclass of its own class whose
forward calls the fused `route_topk` op.

Keeping the instance (and subclassing its class) keeps its parameters, buffers, state_dict keys
and transformers' `output_router_logits` capture, which matches routers with `isinstance`.
The forward returns the family's contract `(router_logits [T, E], weights [T, K], ids [T, K])`.

Cache-aware routing: with `reuse_bias > 0` the selection score of preferred experts gets the
bias; `bias_source="resident"` prefers the experts in the slot pool now, `"previous"` the experts
the previous token of the same sequence chose at this layer (reproducible whatever the cache
state). The weights always come from the unbiased scores.

A learned reuse bias (`remoe_engine.finetune.bias`, shipped in a router delta) sets each
router's `reuse_bias` to its layer's learned strength, or `reuse_strengths` to one strength per
expert; `route_preferring` is the one selection rule both training and inference call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine.families import RoutingSpec, module_attr, router_outputs, unpatched_forward
from remoe_engine.ops import route_topk, route_topk_previous, topk_overlap

BIAS_SOURCES = ("resident", "previous")


@dataclass
class RouterState:
    """What a patched router needs besides its own parameters."""

    spec: RoutingSpec | None  # None: the router runs as it is (route_topk cannot reproduce it)
    reuse_bias: float = 0.0
    bias_source: str = "resident"
    # The router's arguments after the hidden states, as its block passes them (for prefetch
    # guesses, which call the router outside its block).
    extra_args: Callable[[], tuple] = tuple
    # "resident": returns the bool [E] residency of this layer on the logits' device.
    resident: Callable[[], torch.Tensor] | None = None
    # Sequence shape (B, S) of the current forward, set by patch()'s pre-hook on the decoder.
    batch_shape: tuple[int, int] | None = None
    # "previous": the ids [B, K] the last token of each sequence chose, kept per sequence (per KV
    # cache, see offload._Sequences) under this router's `index`; absent at a sequence start.
    sequence_previous: dict = field(default_factory=dict)
    index: int = 0
    # Learned per-expert strengths float32 [E] (None: the scalar `reuse_bias` for every expert).
    # When set, `reuse_bias` holds their largest value: 0 turns the bias off as for a scalar.
    reuse_strengths: torch.Tensor | None = None
    # Top-k agreement with the unbiased router, counted when the bias is on. `agree` stays a
    # tensor on the logits' device (summed without a host sync; read in Handle.stats()).
    agree: torch.Tensor | int = 0
    routed: int = 0


_SUBCLASSES: dict[type, type] = {}


def patched_router_class(original: type) -> type:
    """A subclass of `original` whose forward uses `route_topk` (one class per original)."""
    if getattr(original, "_remoe_original_class", None) is not None:
        return original
    if original not in _SUBCLASSES:
        _SUBCLASSES[original] = type(
            f"Remoe{original.__name__}", (original,),
            {"forward": _patched_forward, "_remoe_original_class": original,
             "__doc__": f"{original.__name__} routed by remoe_engine.ops.route_topk."},
        )
    return _SUBCLASSES[original]


def _router_logits(router: nn.Module, hidden: torch.Tensor, spec: RoutingSpec,
                   *args, **kwargs) -> torch.Tensor:
    """The family's own logits, bit for bit: one linear map of the router's parameters (in fp32
    for DeepSeek, with the bias for GPT-OSS), or, for routers whose logits are not that, the
    first output of the router's own forward."""
    if spec.logits_from == "forward":
        return router_outputs(unpatched_forward(router, hidden, *args, **kwargs))[0]
    weight = module_attr(router, spec.weight_attr)
    bias = None if spec.bias_attr is None else module_attr(router, spec.bias_attr)
    if spec.logits_in_fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    return F.linear(hidden, weight, bias)


def _patched_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    state: RouterState = self._remoe
    spec = state.spec
    if spec is None:  # route_topk cannot reproduce this router: it runs as it is, unbiased
        return unpatched_forward(self, hidden_states, *args, **kwargs)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
    logits = _router_logits(self, hidden, spec, *args, **kwargs)  # [T, E]
    op_kwargs = spec.op_kwargs(self, args)
    bias = 0.0 if self.training else state.reuse_bias  # the bias is an inference-time lever
    if bias == 0.0:
        weights, ids = route_topk(logits, spec.top_k, **op_kwargs)
    elif state.bias_source == "resident":
        prefer = state.resident()  # [E] bool
        weights, ids = route_preferring(logits, spec.top_k, prefer, state.reuse_bias,
                                        state.reuse_strengths, **op_kwargs)
    else:
        weights, ids = _route_with_previous(state, logits, op_kwargs)
    if bias != 0.0:
        _, unbiased = route_topk(logits, spec.top_k, **op_kwargs)
        # Chosen ids the unbiased router also chose; summed on the device, no host sync here.
        state.agree = state.agree + topk_overlap(ids, unbiased).sum()
        state.routed += ids.numel()
    if spec.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    if spec.keeps_batch_dims and hidden_states.dim() == 3:
        lead = hidden_states.shape[:-1]
        return logits.view(*lead, -1), weights.view(*lead, -1), ids.view(*lead, -1)
    return logits, weights, ids


def _route_with_previous(state: RouterState, logits: torch.Tensor, kwargs: dict):
    """Route token by token within each sequence: token s prefers the ids token s-1 chose.

    The recurrence runs in one `route_topk_previous` call per layer (one kernel on CUDA), for
    decode (S = 1) and prefill alike, all B sequences at once.
    """
    T, E = logits.shape
    B, S = state.batch_shape if state.batch_shape is not None else (1, T)
    if B * S != T:  # a caller that flattened differently: treat as one sequence
        B, S = 1, T
    K = state.spec.top_k
    previous = state.sequence_previous.get(state.index)
    if previous is not None and previous.shape[0] != B:
        previous = None
    if state.reuse_strengths is not None:
        return _route_with_previous_strengths(state, logits.view(B, S, E), previous, kwargs)
    per_seq = logits.view(B, S, E)
    weights, ids = route_topk_previous(per_seq, K, previous=previous,
                                       reuse_bias=state.reuse_bias, **kwargs)
    state.sequence_previous[state.index] = ids[:, -1].clone()  # [B, K]; not the whole prefill
    if torch.is_grad_enabled() and logits.requires_grad:
        # The recurrent op has no autograd: the same weights, differentiable, from route_topk
        # with each row's preference (the previous position's ids) now known.
        prefer = torch.zeros(B, S, E, dtype=torch.bool, device=logits.device)
        prefer[:, 1:].scatter_(2, ids[:, :-1], True)
        if previous is not None:
            prefer[:, 0].scatter_(1, previous, True)
        weights, _ = route_topk(logits, K, prefer=prefer.view(T, E),
                                reuse_bias=state.reuse_bias, **kwargs)
        return weights, ids.view(T, K)
    return weights.view(T, K), ids.view(T, K)


def _route_with_previous_strengths(state: RouterState, per_seq: torch.Tensor,
                                   previous: torch.Tensor | None, kwargs: dict):
    """`_route_with_previous` for a learned per-expert reuse bias (`state.reuse_strengths`):
    `route_topk_previous` takes one scalar bias, so the S positions are walked here, all B
    sequences at once (a few launches per position at prefill; decode is one position)."""
    B, S, E = per_seq.shape
    K = state.spec.top_k
    weights = per_seq.new_empty(B, S, K, dtype=torch.float32)
    ids = torch.empty(B, S, K, dtype=torch.int64, device=per_seq.device)
    for s in range(S):
        if previous is None:
            w, i = route_topk(per_seq[:, s], K, **kwargs)
        else:
            prefer = torch.zeros(B, E, dtype=torch.bool, device=per_seq.device)
            prefer.scatter_(1, previous, True)
            w, i = route_preferring(per_seq[:, s], K, prefer, state.reuse_bias,
                                    state.reuse_strengths, **kwargs)
        weights[:, s], ids[:, s] = w, i
        previous = i
    state.sequence_previous[state.index] = previous
    return weights.view(B * S, K), ids.view(B * S, K)


def route_preferring(logits: torch.Tensor, top_k: int, prefer: torch.Tensor, reuse_bias: float,
                     strengths: torch.Tensor | None = None, **op_kwargs
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_topk` with the preferred experts' selection scores raised: by `reuse_bias`, or,
    with `strengths` [E], by each expert's own strength.

    A per-expert strength is folded into route_topk's `correction_bias` (which, like the reuse
    bias, is added to the selection score only): `strengths * prefer` plus the family's own
    correction. The op computes score + correction + 0 where route_topk's reuse bias computes
    score + 0 + bias, the same float, so strengths all equal to b select exactly what
    `reuse_bias=b` selects. A per-token prefer [T, E] with T > 1 routes row by row (the
    correction is one [E] vector per call).

    Args:
        logits: router logits [T, E].
        top_k: K.
        prefer: bool [E] or [T, E].
        reuse_bias: the scalar bias (used when `strengths` is None).
        strengths: float32 [E] on the logits' device, or None.
        op_kwargs: the family's route_topk arguments (`RoutingSpec.op_kwargs`).

    Returns:
        (weights [T, K], ids [T, K]) as route_topk returns them.
    """
    if strengths is None:
        return route_topk(logits, top_k, prefer=prefer, reuse_bias=reuse_bias, **op_kwargs)
    base = op_kwargs.pop("correction_bias", None)

    def corrected(row_prefer: torch.Tensor) -> torch.Tensor:
        bias = strengths * row_prefer.reshape(-1).to(strengths.dtype)
        return bias if base is None else base + bias

    if prefer.dim() == 1 or prefer.shape[0] == 1:
        return route_topk(logits, top_k, correction_bias=corrected(prefer), **op_kwargs)
    rows = [route_topk(logits[t : t + 1], top_k, correction_bias=corrected(prefer[t]),
                       **op_kwargs) for t in range(logits.shape[0])]
    return torch.cat([w for w, _ in rows]), torch.cat([i for _, i in rows])


# Attribute of a model holding the learned reuse bias a router delta gave it, for a later
# patch()/load().
LEARNED_ATTR = "_remoe_learned_bias"


def install_learned_bias(model: nn.Module, learned) -> None:
    """Give a model's routers learned strengths (a `finetune.bias.LearnedBias`, as a router
    delta ships them): the patched routers of a model under
    `patch()`/`load()` now, and a later `patch()` through the model's attribute.

    Raises:
        ValueError: strengths for another number of MoE layers or experts, or routers whose
            routing `route_topk` cannot reproduce (no bias possible).
    """
    from remoe_engine.families import find_moe_blocks

    blocks = find_moe_blocks(model)
    learned.check_model(len(blocks), int(blocks[0].experts.num_experts))
    setattr(model, LEARNED_ATTR, learned)
    for i, block in enumerate(blocks):
        state = getattr(block.router, "_remoe", None)
        if state is None:
            continue  # not patched: patch() applies it from the model's attribute
        if state.spec is None:
            raise ValueError(f"{type(model).__name__}: route_topk cannot reproduce this router, "
                             "so it cannot take the delta's reuse bias")
        scalar, vector = learned.layer(i)
        device = next(block.router.parameters()).device
        state.reuse_bias, state.bias_source = scalar, learned.source
        state.reuse_strengths = None if vector is None else vector.to(device)
    handle = getattr(model, "remoe", None)
    if handle is not None and hasattr(handle, "bias_source"):
        handle.reuse_bias = float(learned.strengths.max())
        handle.bias_source = learned.source


def unbiased_ids(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The top-k ids an installed router would choose for `hidden` [..., H] with no reuse bias:
    the family's exact rule (group limits, correction bias included), without touching the
    router's state (no agreement counts, no previous ids). Used for prefetch guesses.

    Returns:
        int64 [T, K] on hidden's device.
    """
    state = router._remoe
    spec, args = state.spec, state.extra_args()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if spec is None:
        return router_outputs(unpatched_forward(router, hidden, *args))[2].long()
    logits = _router_logits(router, hidden, spec, *args)
    return route_topk(logits, spec.top_k, **spec.op_kwargs(router, args))[1]


def install(router: nn.Module, state: RouterState) -> None:
    """Swap `router` to the patched subclass in place (reversible with `uninstall`)."""
    router._remoe = state
    router.__class__ = patched_router_class(type(router))


def uninstall(router: nn.Module) -> None:
    original = getattr(type(router), "_remoe_original_class", None)
    if original is not None:
        router.__class__ = original
    if "_remoe" in router.__dict__:
        del router.__dict__["_remoe"]
