"""The expert computation over slot-pool weights, installed through transformers' ExpertsInterface.

`remoe_experts_forward(self, hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`
is registered as the experts implementation "remoe". `self` is the family's own experts module
(stripped of its weights); the weights come from the pool's slots. Two kernels compute them:

- fused (`ops.moe_experts`): one C++ call per MoE layer over every routed (token, expert) pair,
  reading each expert's rows once and keeping the gate in registers. It runs the family's gate
  as an `ops.ExpertsGate`, which `learn_gate` finds by probing the module's own `_apply_gate`
  (or `act_fn`) against every form the op computes; the form is used only where it reproduces
  the family's on every probe.
- per-expert ("loop"): the family's own `_apply_gate`, `act_fn`, biases, transposition and
  post-expert norm, one expert at a time in Python. It runs what the fused op cannot express
  (a gate of another form, a norm after each expert), and is the reference the fused op is
  tested against.

`patch()`/`load()` choose with `experts_kernel`: "auto" (fused on CPU wherever `learn_gate`
finds the gate; per-expert on CUDA until the CUDA kernel has been validated on a GPU), "fused"
(an error where it cannot run) or "loop".

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

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine import ops, reference
from remoe_engine.router import unbiased_ids

EXPERTS_IMPLEMENTATION = "remoe"
EXPERTS_KERNELS = ("auto", "fused", "loop")
# The activations the fused op computes, simplest first (the first form that matches wins).
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


@dataclass
class ExpertsState:
    """Attached to each patched experts module as `_remoe`."""

    layer: int  # transformers layer index of this MoE block (the pool maps it)
    pool: Any  # remoe_engine.pool.SlotPool
    waves: int = 0  # waves run: more than one per forward means the budget forced waves
    # Prefetch: (transformers layer index, router module) of the next MoE layer, or None.
    next_layer: tuple[int, nn.Module] | None = None
    # The fused kernel's gate, or None: this layer runs the per-expert loop.
    gate: ops.ExpertsGate | None = None
    _slot_views: list | None = None  # per slot: name -> tensor views of the slot buffer

    def slot_views(self, slot: int) -> dict[str, torch.Tensor]:
        if self.pool.slot_format == "compressed":
            return self.pool.slot_tensors(slot)  # the blob dequantized, for this call only
        # The slot buffer never moves, so its views are made once, not per expert call.
        if self._slot_views is None:
            self._slot_views = [self.pool.slot_tensors(s) for s in range(self.pool.num_slots)]
        return self._slot_views[slot]

    def fused(self, experts: nn.Module, hidden: torch.Tensor, pair_slots: torch.Tensor,
              top_k_weights: torch.Tensor) -> torch.Tensor:
        """The fused op on every pair of `pair_slots` (int64 [T, K] on the host, -1 = none):
        fp32 [T, H]."""
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        if hidden.device.type != "cpu":
            # A plain copy: non_blocking from pageable memory would sync the stream anyway.
            pair_slots = pair_slots.to(hidden.device)
        if self.pool.slot_format == "compressed":
            plan, up_rows = self.pool.compute_plan(up_name)
            return ops.moe_experts_compressed(hidden, pair_slots, top_k_weights,
                                              self.pool.buffer, plan, up_rows, gate=self.gate)
        weights = self.pool.weights  # name -> [num_slots, *shape] views of the slot buffer
        return ops.moe_experts(
            hidden, pair_slots, top_k_weights,
            weights[up_name], weights["down_proj"], gate=self.gate,
            up_bias=weights.get(f"{up_name}_bias"), down_bias=weights.get("down_proj_bias"),
            transposed=bool(experts.is_transposed))


def learn_gate(experts: nn.Module) -> tuple[ops.ExpertsGate | None, str]:
    """The fused op's form of this experts module's gate, found by probing it.

    Candidates: every `ops.ExpertsGate` over the op's layouts and activations, with the clamp
    limits and sigmoid scales the module holds as attributes (names containing "limit" or
    "alpha"). The module's own `_apply_gate` (or `act_fn`, without a gate) runs on random
    up-projection outputs at three scales (the largest saturates any clamp); the first candidate
    equal to it on all of them, to fp32 rounding, is the gate. The patched model is then checked
    against transformers for every family (`remoe families`).

    Returns:
        (gate, "") or (None, why the fused op cannot run this module).
    """
    if getattr(experts, "has_post_expert_norm", False):
        return None, "a norm after each expert"
    numbers = {name.lower(): float(value) for name, value in vars(experts).items()
               if isinstance(value, int | float) and not isinstance(value, bool)
               and math.isfinite(value)}
    limits = sorted({v for name, v in numbers.items() if "limit" in name and v > 0})
    alphas = sorted({v for name, v in numbers.items() if "alpha" in name})
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randn(8, 64, generator=generator) * scale for scale in (0.5, 4.0, 40.0)]
    if experts.has_gate:
        target = experts._apply_gate
        candidates = [
            ops.ExpertsGate(layout, activation, clamp, limit, alpha, up_offset)
            for clamp, limit in [("none", 0.0)] + [(c, v) for c in ("input", "output")
                                                   for v in limits]
            for up_offset in (0.0, 1.0)
            for layout in ("chunk", "interleave")
            for activation, alpha in [(a, 1.0) for a in _ACTIVATIONS]
            + [("swish_alpha", a) for a in alphas]]
    else:
        target = experts.act_fn
        candidates = [ops.ExpertsGate("none", activation) for activation in _ACTIVATIONS]
    try:
        with torch.no_grad():
            wants = [target(h) for h in probes]
    except Exception as error:  # e.g. an activation taking (gate, up): not a form we know
        return None, f"its gate cannot be probed ({type(error).__name__}: {error})"

    def equal(got: torch.Tensor, want: torch.Tensor) -> bool:
        # Relative to the probe's largest output: in the saturated tails (gelu of a large
        # negative input) two correct formulas differ by cancellation, not by form.
        return got.shape == want.shape and torch.allclose(
            got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))

    for candidate in candidates:
        if all(equal(reference.expert_gate(h, candidate), want)
               for h, want in zip(probes, wants, strict=True)):
            return candidate, ""
    return None, f"{type(experts).__name__}'s gate is none of the fused op's forms"


def choose_kernel(experts: nn.Module, device: torch.device, experts_kernel: str
                  ) -> tuple[ops.ExpertsGate | None, str]:
    """(gate for the fused op or None, what runs and why) for `patch(experts_kernel=...)`.

    Raises:
        NotImplementedError: experts_kernel="fused" where the fused op cannot run.
    """
    if experts_kernel == "loop":
        return None, "per-expert (asked for)"
    gate, why_not = learn_gate(experts)
    if gate is None and experts_kernel == "fused":
        raise NotImplementedError(f"experts_kernel='fused': {why_not}")
    if gate is None:
        return None, f"per-expert ({why_not})"
    if device.type != "cpu" and experts_kernel == "auto":
        # The CUDA kernel compiles in CI but has not run on a GPU yet: bench/gpu_check.sh checks
        # it against the per-expert path; until then "fused" must be asked for.
        return None, "per-expert (the CUDA fused kernel is opt-in: experts_kernel='fused')"
    return gate, "fused"


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
    valid = ids_cpu < self.num_experts  # expert-parallel sentinels carry no work
    experts = torch.unique(ids_cpu[valid])  # sorted
    if experts.numel() <= pool.max_pinnable(state.layer):
        order = experts.tolist()  # one wave: everything fits
    else:
        order = wave_order(ids_cpu, self.num_experts, pool.resident(state.layer))
    # slot_of[e]: expert e's slot in the current wave, -1 otherwise (and for the sentinels,
    # which all map to the extra last entry).
    slot_of = torch.full((self.num_experts + 1,), -1, dtype=torch.int64)
    pair_experts = ids_cpu.clamp(max=self.num_experts)
    for wave, slots in pool.waves(state.layer, order):
        state.waves += 1
        slot_of[wave] = slots
        _compute(self, state, hidden_states, slot_of[pair_experts], top_k_weights, out)
        slot_of[wave] = -1
    return out.to(hidden_states.dtype)


def _compute(experts: nn.Module, state: ExpertsState, hidden_states: torch.Tensor,
             pair_slots: torch.Tensor, top_k_weights: torch.Tensor, out: torch.Tensor) -> None:
    """out += every routed pair's weighted expert output, the pairs' experts pinned in their slots.

    Args:
        pair_slots: int64 [T, K] on the host: the slot of each (token, k) pair, -1 for a pair
            computed elsewhere (another wave, an expert-parallel sentinel).
        out: fp32 [T, H].
    """
    if state.gate is not None:
        out += state.fused(experts, hidden_states, pair_slots, top_k_weights)
        return
    K = pair_slots.shape[1]
    # Group the (token, k) pairs by slot with one sort: positions [T*K], per-slot runs.
    flat = pair_slots.reshape(-1)
    positions = torch.argsort(flat, stable=True)
    slots, counts = torch.unique_consecutive(flat[positions], return_counts=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    positions = positions.to(hidden_states.device)  # pageable: a non_blocking copy would sync
    tokens, ks = positions // K, positions % K  # [T*K] each, grouped by slot
    for slot, start, n in zip(slots.tolist(), starts, counts.tolist(), strict=True):
        if slot < 0:
            continue
        token, k = tokens[start : start + n], ks[start : start + n]
        y = expert_ffn(experts, hidden_states[token], state.slot_views(slot))
        y = y * top_k_weights[token, k, None]
        # index_put_ rather than index_add_: on CPU, index_add_ goes through an OpenMP
        # parallel region even for one row, which costs milliseconds per call on a busy
        # machine; a token uses an expert once, so the rows are unique either way.
        out.index_put_((token,), y.to(torch.float32), accumulate=True)


def _decode_one_token(experts: nn.Module, state: ExpertsState, hidden_states: torch.Tensor,
                      ids: torch.Tensor, top_k_weights: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """Decode (T = 1): the K experts are distinct, one acquire, no waves.

    Args:
        hidden_states: [1, H]; ids: [K] int64 on the host; top_k_weights: [1, K]; out: [1, H] fp32.
    """
    keep = ids < experts.num_experts  # expert-parallel sentinels carry no work
    kept = ids[keep] if not bool(keep.all()) else ids
    state.waves += 1
    slots = state.pool.acquire(state.layer, kept, wait=state.next_layer is None)
    if state.next_layer is not None:
        # This layer's own loads were enqueued first; the guesses queue behind them and finish
        # while this layer computes. A failed wait drops this call's pins itself.
        prefetch_next_layer(state, hidden_states)
        state.pool.wait(state.layer, kept)
    try:
        pair_slots = torch.full((1, ids.shape[0]), -1, dtype=torch.int64)
        pair_slots[0, keep] = slots
        if state.gate is not None:
            out += state.fused(experts, hidden_states, pair_slots, top_k_weights)
        else:
            for column, slot in enumerate(pair_slots[0].tolist()):
                if slot >= 0:
                    y = expert_ffn(experts, hidden_states, state.slot_views(slot))
                    out += (y * top_k_weights[:, column : column + 1]).to(torch.float32)
    finally:
        state.pool.release(state.layer, kept)
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
