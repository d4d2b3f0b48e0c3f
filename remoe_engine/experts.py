"""The expert computation over slot-pool weights, installed through transformers' ExpertsInterface.

`remoe_experts_forward(self, hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`
is registered as the experts implementation "remoe". `self` is the family's own experts module
(stripped of its weights), so the family's `_apply_gate` (GPT-OSS's clamped, interleaved gate),
`act_fn`, bias and transposition flags apply unchanged; the weights come from the pool's slots.

Waves: when a layer needs more distinct experts than the pool can pin at once (a long prefill
under a small budget), it runs them in waves of at most `max_pinnable` experts. Wave order is the
prefill policy: experts already resident go first (hits cost nothing and evict nothing), then the
missing ones ordered by the position of the last token that uses them, so the experts the end of
the prompt routes to are loaded last and are what the pool holds when decoding starts. This is
why a large prefill does not needlessly flush the decode working set: what it leaves behind is
the working set of its final tokens, which is what the next decode token most likely needs.

Prefetch (opt-in, decode only): with `ExpertsState.next_layer` set, a decode step of layer l
guesses the experts of the next MoE layer by applying that layer's router (its family's exact
rule, without the reuse bias) to this layer's MoE input (the hidden state the next router will
see, less one attention block and one MoE block: "pre-gating") and asks the pool to start
loading the guesses that are not resident. The loads run on the pool's reader threads while
layer l's experts and the next attention compute. A wrong guess costs a read and may evict an
expert that would have hit, so it is off by default and measured with and without
(`bench/bench_prefetch.py`). Prefetch changes residency only: outputs are unchanged unless a
reuse bias prefers the resident experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine.router import unbiased_ids

EXPERTS_IMPLEMENTATION = "remoe"


@dataclass
class ExpertsState:
    """Attached to each patched experts module as `_remoe`."""

    layer: int  # transformers layer index of this MoE block (the pool maps it)
    pool: Any  # remoe_engine.pool.SlotPool
    waves: int = 0  # waves run: more than one per forward means the budget forced waves
    # Prefetch: (transformers layer index, router module) of the next MoE layer, or None.
    next_layer: tuple[int, nn.Module] | None = None
    _slot_views: list | None = None  # per slot: name -> tensor views of the slot buffer

    def slot_views(self, slot: int) -> dict[str, torch.Tensor]:
        # The slot buffer never moves, so its views are made once, not per expert call.
        if self._slot_views is None:
            self._slot_views = [self.pool.slot_tensors(s) for s in range(self.pool.num_slots)]
        return self._slot_views[slot]


def expert_ffn(experts: nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor]):
    """One expert's FFN on its tokens, with the family's own gate and layout.

    Args:
        experts: the family's experts module (supplies `_apply_gate` and layout flags).
        x: [n, H] hidden states of the tokens routed to this expert.
        weights: slot views: gate_up_proj [2I, H] ([H, 2I] if transposed; up_proj [I, H] for
            experts without a gate), down_proj [H, I] ([I, H] if transposed), and the biases
            when the family has them.
    Returns:
        [n, H] in x's dtype.
    """
    transposed = experts.is_transposed
    # Gated experts hold gate and up in one tensor; the rest (Nemotron-H) only an up projection.
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up = weights[up_name]
    h = x @ up if transposed else F.linear(x, up)
    if experts.has_bias:
        h = h + weights[f"{up_name}_bias"]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    down = weights["down_proj"]
    y = h @ down if transposed else F.linear(h, down)
    if experts.has_bias:
        y = y + weights["down_proj_bias"]
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y


def wave_order(ids_cpu: torch.Tensor, num_experts: int, resident: dict[int, int]) -> list[int]:
    """Distinct experts of `ids_cpu` [T, K] in the order the waves should run them.

    Resident experts (`resident`: expert -> slot) first, then missing ones by the last token
    position that uses them (module docstring). Expert-parallel sentinels (id >= E) are dropped.
    """
    T = ids_cpu.shape[0]
    flat = ids_cpu.reshape(-1)
    valid = flat < num_experts
    positions = torch.arange(T).repeat_interleave(ids_cpu.shape[1])[valid]
    last_use = torch.full((num_experts,), -1, dtype=torch.int64)
    last_use.scatter_reduce_(0, flat[valid], positions, reduce="amax")
    used = (last_use >= 0).nonzero().flatten()
    is_resident = torch.tensor([e in resident for e in used.tolist()], dtype=torch.bool)
    hits = used[is_resident]
    misses = used[~is_resident]
    misses = misses[torch.argsort(last_use[misses], stable=True)]
    return hits.tolist() + misses.tolist()


def remoe_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                          top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """ExpertsInterface implementation: the experts' FFNs over slot-pool weights.

    Args:
        hidden_states: [T, H] model dtype.
        top_k_index: [T, K] int64 expert ids (ids >= num_experts are expert-parallel sentinels).
        top_k_weights: [T, K] routing weights.
    Returns:
        [T, H] in hidden_states' dtype.
    """
    state: ExpertsState | None = self.__dict__.get("_remoe")
    if state is None:
        raise RuntimeError(
            f"{type(self).__name__} uses the 'remoe' experts implementation but was not patched "
            "by remoe_engine.patch() / load()"
        )
    pool = state.pool
    T, K = top_k_index.shape
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    if T == 0:
        return out.to(hidden_states.dtype)
    # Host sync: the pool resolves expert ids to slots on the host (one per layer per forward).
    ids_cpu = top_k_index.detach().to("cpu")  # [T, K]
    if T == 1 and K <= pool.max_pinnable(state.layer):
        return _decode_one_token(self, state, hidden_states, ids_cpu[0], top_k_weights, out)
    # Group the T*K (token, k) pairs by expert with one sort: positions [T*K], per-expert runs.
    flat = ids_cpu.reshape(-1)
    positions = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[positions], return_counts=True)
    keep = experts < self.num_experts  # expert-parallel sentinels carry no work
    starts = (torch.cumsum(counts, 0) - counts)[keep].tolist()
    counts = counts[keep].tolist()
    experts = experts[keep].tolist()
    run = {e: (start, n) for e, start, n in zip(experts, starts, counts, strict=True)}
    positions = positions.to(hidden_states.device, non_blocking=True)
    tokens, ks = positions // K, positions % K  # [T*K] each, grouped by expert

    if len(experts) <= pool.max_pinnable(state.layer):
        order = experts  # one wave: everything fits
    else:
        order = wave_order(ids_cpu, self.num_experts, pool.resident(state.layer))
    for wave, slots in pool.waves(state.layer, order):
        state.waves += 1
        for expert, slot in zip(wave.tolist(), slots.tolist(), strict=True):
            start, n = run[expert]
            token, k = tokens[start : start + n], ks[start : start + n]
            y = expert_ffn(self, hidden_states[token], state.slot_views(slot))
            y = y * top_k_weights[token, k, None]
            # index_put_ rather than index_add_: on CPU, index_add_ goes through an OpenMP
            # parallel region even for one row, which costs milliseconds per call on a busy
            # machine; a token uses an expert once, so the rows are unique either way.
            out.index_put_((token,), y.to(torch.float32), accumulate=True)
    return out.to(hidden_states.dtype)


def _decode_one_token(experts: nn.Module, state: ExpertsState, hidden_states: torch.Tensor,
                      ids: torch.Tensor, top_k_weights: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """Decode (T = 1): the K experts are distinct, one acquire, no grouping.

    Args:
        hidden_states: [1, H]; ids: [K] int64 on the host; top_k_weights: [1, K]; out: [1, H] fp32.
    """
    keep = ids < experts.num_experts  # expert-parallel sentinels carry no work
    ids = ids[keep] if not bool(keep.all()) else ids
    columns = keep.nonzero().flatten().tolist()
    state.waves += 1
    slots = state.pool.acquire(state.layer, ids, wait=state.next_layer is None)
    if state.next_layer is not None:
        # This layer's own loads were enqueued first; the guesses queue behind them and finish
        # while this layer computes. A failed wait drops this call's pins itself.
        prefetch_next_layer(state, hidden_states)
        state.pool.wait(state.layer, ids)
    try:
        for column, slot in zip(columns, slots.tolist(), strict=True):
            y = expert_ffn(experts, hidden_states, state.slot_views(slot))
            out += (y * top_k_weights[:, column : column + 1]).to(torch.float32)
    finally:
        state.pool.release(state.layer, ids)
    return out.to(hidden_states.dtype)


def prefetch_next_layer(state: ExpertsState, hidden_states: torch.Tensor) -> int:
    """Start loading the next MoE layer's likely experts (module docstring, "Prefetch").

    Args:
        state: this layer's state, with `next_layer` set.
        hidden_states: [1, H], this layer's MoE input.

    Returns:
        Loads started.
    """
    layer, router = state.next_layer
    with torch.no_grad():
        guess = unbiased_ids(router, hidden_states)[0].to("cpu")  # [K]; host sync
    return state.pool.prefetch(layer, guess)


def register() -> None:
    """Register the "remoe" experts implementation with transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, remoe_experts_forward)
