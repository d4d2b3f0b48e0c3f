"""Expert-cache simulator: replay a routing trace through LRU, LFU and Belady/OPT caches.

The replay models decode at batch size 1: tokens in trace order, each token visiting the MoE
layers in order and needing its K experts of a layer at once. The access model (pinning, LFU
counts, tie-breaks) is stated in csrc/sim/cache_sim_cpu.cpp and `remoe_engine.sim_reference`,
and it is the slot pool's: the pool pins a token's experts of a layer while the layer runs, so a
cache needs at least K slots (a real pool with fewer processes the experts in waves; the
simulator refuses instead). Other points a reader should know:

- scope "layer": every MoE layer has its own cache of `slots` slots (the pool's per-layer
  budgets). scope "global": one cache of `slots` slots shared by all layers, keyed by
  (layer, expert).
- The cache starts empty and by default is never flushed between the trace's sequences (a
  server's pool keeps its experts between requests); first uses count as misses. With
  `flush="sequence"` every sequence starts from an empty cache instead (each request on a cold
  pool, e.g. to measure a single prompt's own locality).
- Prefill tokens are replayed like decode tokens, one at a time.
- OPT is Belady's rule under the same pinning: on a miss evict the unpinned resident expert
  whose next use is farthest. It is the offline ceiling for a fixed trace.
- Floors (docs/design.md section 9): a token fetches `M = misses x S_e` bytes; over a link of B
  bytes/s its time per output token is at least `M / B` (compute not included).

LRU results come from one pass of LRU stack distances (`lru_sweep`), which give every cache size
at once; `simulate_cache` replays LRU directly too, and the tests check the two agree.

Legend: L = MoE layers, N = tokens, K = top-k, E = experts, C = cache sizes, G = streams,
R = requests per stream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from remoe_engine import ops  # noqa: F401  (loads remoe_engine._C: registers torch.ops.remoe.*)
from remoe_engine.trace import RoutingTrace

__all__ = [
    "FLUSHES",
    "POLICIES",
    "SCOPES",
    "SimResult",
    "lru_stack_distances",
    "lru_sweep",
    "plot_hit_rates",
    "requests_of",
    "simulate",
    "simulate_cache",
    "sweep",
]

POLICIES = ("lru", "lfu", "opt")
SCOPES = ("layer", "global")
FLUSHES = ("never", "sequence")


def simulate_cache(requests: torch.Tensor, capacities: Sequence[int], policy: str) -> torch.Tensor:
    """Replay request streams through caches of several sizes (the C++ kernel).

    Args:
        requests: int32/int64 [G, R, K] keys; G independent streams of R requests, each needing
            its K distinct keys resident at once.
        capacities: cache sizes in slots, each >= K.
        policy: "lru", "lfu" or "opt".

    Returns:
        hits int32 [len(capacities), G, R]: keys of each request resident before it.
    """
    return torch.ops.remoe.simulate_cache.default(requests, [int(c) for c in capacities], policy)


def lru_stack_distances(requests: torch.Tensor) -> torch.Tensor:
    """LRU stack distance of every access (the C++ kernel).

    Args:
        requests: int32/int64 [G, R, K] keys, as for `simulate_cache`.

    Returns:
        int32 [G, R, K]: 0 for a first use, else 1 + the distinct keys used since the key's
        previous use (before its request). With C >= K slots an access hits iff 1 <= d <= C.
    """
    return torch.ops.remoe.lru_stack_distances.default(requests)


def lru_sweep(requests: torch.Tensor, capacities: Sequence[int]) -> torch.Tensor:
    """LRU hits at every capacity from one stack-distance pass (the C++ kernel).

    Args:
        requests: int32/int64 [G, R, K] keys, as for `simulate_cache`.
        capacities: cache sizes in slots, each >= K.

    Returns:
        hits int32 [len(capacities), G, R], equal to `simulate_cache(requests, capacities,
        "lru")` but in one pass however many sizes are asked for.
    """
    return torch.ops.remoe.lru_sweep.default(requests, [int(c) for c in capacities])


@torch.library.register_fake("remoe::simulate_cache")
def _simulate_cache_fake(requests, capacities, policy):
    torch._check(requests.dim() == 3, lambda: "simulate_cache: requests must be 3-D")
    G, R, _ = requests.shape
    return requests.new_empty((len(capacities), G, R), dtype=torch.int32)


@torch.library.register_fake("remoe::lru_sweep")
def _lru_sweep_fake(requests, capacities):
    torch._check(requests.dim() == 3, lambda: "lru_sweep: requests must be 3-D")
    G, R, _ = requests.shape
    return requests.new_empty((len(capacities), G, R), dtype=torch.int32)


@torch.library.register_fake("remoe::lru_stack_distances")
def _lru_stack_distances_fake(requests):
    torch._check(requests.dim() == 3, lambda: "lru_stack_distances: requests must be 3-D")
    return requests.new_empty(requests.shape, dtype=torch.int32)


def requests_of(trace: RoutingTrace, scope: str) -> torch.Tensor:
    """The request streams a trace replays as.

    Args:
        trace: the routing trace.
        scope: "layer" (one stream per layer, keys are expert ids) or "global" (one stream of
            (token, layer) requests in token-major order, key = layer * E + expert).

    Returns:
        int32 [L, N, K] for "layer", [1, N * L, K] for "global".
    """
    if scope == "layer":
        return trace.ids
    if scope == "global":
        return _global_keys(trace.ids, trace.num_experts).unsqueeze(0)
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _global_keys(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, N, K] expert ids -> [N * L, K] keys layer * E + expert, token-major."""
    L, N, K = ids.shape
    offset = (torch.arange(L, dtype=torch.int32) * num_experts).view(L, 1, 1)
    return (ids + offset).transpose(0, 1).reshape(N * L, K).contiguous()


@dataclass
class SimResult:
    """Replay of one trace through one policy at one cache size.

    Args:
        policy: "lru", "lfu" or "opt".
        scope: "layer" or "global".
        slots: slots per layer (scope "layer") or in total (scope "global").
        total_slots: slots over all layers.
        tokens: tokens replayed (N).
        accesses: expert accesses, N * L * K.
        hits, misses: over the whole trace.
        hit_rate: hits / accesses.
        hits_per_layer, misses_per_layer: [L].
        misses_per_token: mean over tokens of the misses of all its layers; p50/p90 likewise.
        bytes_per_expert: S_e, None if unknown.
        bytes_fetched: misses * S_e; bytes_per_token: its mean per token.
        bandwidth_gbps: link bandwidth B in GB/s (1e9 bytes/s), None if not given.
        tpot_floor_ms, tpot_floor_p50_ms, tpot_floor_p90_ms: per-token `misses * S_e / B` in ms
            (mean, median, 90th percentile), None without S_e and B.
    """

    policy: str
    scope: str
    slots: int
    total_slots: int
    tokens: int
    accesses: int
    hits: int
    misses: int
    hit_rate: float
    hits_per_layer: list[int]
    misses_per_layer: list[int]
    misses_per_token: float
    misses_per_token_p50: float
    misses_per_token_p90: float
    bytes_per_expert: int | None = None
    bytes_fetched: int | None = None
    bytes_per_token: float | None = None
    bandwidth_gbps: float | None = None
    tpot_floor_ms: float | None = None
    tpot_floor_p50_ms: float | None = None
    tpot_floor_p90_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _check_slots(trace: RoutingTrace, slots: Sequence[int], scope: str) -> list[int]:
    slots = [int(s) for s in slots]
    if not slots:
        raise ValueError("no cache sizes given")
    K = trace.top_k
    too_small = [s for s in slots if s < K]
    if too_small:
        unit = "slots per layer" if scope == "layer" else "slots in total"
        raise ValueError(
            f"{too_small[0]} {unit} < top_k {K}: a token's {K} experts of a layer are pinned "
            f"together, so a cache needs at least {K} slots")
    return slots


def _hits(requests: torch.Tensor, slots: list[int], policy: str) -> torch.Tensor:
    """hits int32 [C, G, R]; LRU from stack distances (every size in one pass)."""
    if policy == "lru":
        return lru_sweep(requests, slots)
    return simulate_cache(requests, slots, policy)


def _hits_per_layer_token(trace: RoutingTrace, slots: list[int], policy: str, scope: str,
                          flush: str) -> torch.Tensor:
    """Hits of every (cache size, layer, token): int32 [C, L, N].

    flush "never" replays the whole trace as one stream per cache; "sequence" replays every
    sequence as its own stream from an empty cache. Sequences of equal length go to the kernel
    together, as extra streams of one call.
    """
    L, N, K = trace.ids.shape
    C = len(slots)
    if flush == "never":
        hits = _hits(requests_of(trace, scope), slots, policy)  # [C, G, R]
        return hits if scope == "layer" else hits[:, 0].view(C, N, L).transpose(1, 2)
    out = torch.zeros(C, L, N, dtype=torch.int32)
    bounds = trace.offsets.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > begin:
            starts_by_length.setdefault(end - begin, []).append(begin)
    for length, starts in starts_by_length.items():
        S = len(starts)
        tokens = torch.tensor(starts).view(S, 1) + torch.arange(length)  # [S, n]
        segment = trace.ids[:, tokens]  # [L, S, n, K]
        if scope == "layer":
            hits = _hits(segment.reshape(L * S, length, K), slots, policy).view(C, L, S, length)
        else:
            # Token-major keys of the S sequences back to back: stream s is rows s*n*L onwards.
            keys = _global_keys(segment.reshape(L, S * length, K), trace.num_experts)
            hits = _hits(keys.view(S, length * L, K), slots, policy).view(C, S, length, L)
            hits = hits.permute(0, 3, 1, 2)  # [C, L, S, n]
        out[:, :, tokens] = hits
    return out


def sweep(
    trace: RoutingTrace,
    policies: Sequence[str] = POLICIES,
    slots: Sequence[int] = (8,),
    *,
    scope: str = "layer",
    bytes_per_expert: int | None = None,
    bandwidth_gbps: float | None = None,
    flush: str = "never",
) -> list[SimResult]:
    """Replay a trace through several policies and cache sizes.

    Args:
        trace: the routing trace.
        policies: names from POLICIES.
        slots: cache sizes: slots per layer for scope "layer", total slots for "global"; >= K.
        scope: "layer" or "global".
        bytes_per_expert: S_e; default the trace's `meta.expert_bytes` (None if unknown).
        bandwidth_gbps: link bandwidth in GB/s for the TPOT floor (None: no floor).
        flush: "never" (one cache across all sequences) or "sequence" (every sequence starts
            from an empty cache).

    Returns:
        One SimResult per (policy, size), policies outer, sizes in the given order.

    Raises:
        ValueError: for an unknown policy, scope or flush, a size below K, or a bandwidth <= 0.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
    if bandwidth_gbps is not None and not bandwidth_gbps > 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {bandwidth_gbps}")
    slots = _check_slots(trace, slots, scope)
    if bytes_per_expert is None:
        bytes_per_expert = trace.meta.expert_bytes
    L, N, K = trace.ids.shape
    results = []
    for policy in policies:
        hits = _hits_per_layer_token(trace, slots, policy, scope, flush)  # [C, L, N]
        for c, size in enumerate(slots):
            per = hits[c]
            hits_per_layer = per.sum(dim=1, dtype=torch.int64)  # [L]
            misses_token = (L * K - per.sum(dim=0, dtype=torch.int64)).numpy()  # [N]
            total_hits = int(hits_per_layer.sum())
            result = SimResult(
                policy=policy, scope=scope, slots=size,
                total_slots=size * L if scope == "layer" else size,
                tokens=N, accesses=L * N * K, hits=total_hits, misses=L * N * K - total_hits,
                hit_rate=total_hits / (L * N * K) if N else math.nan,
                hits_per_layer=hits_per_layer.tolist(),
                misses_per_layer=(N * K - hits_per_layer).tolist(),
                misses_per_token=float(misses_token.mean()) if N else math.nan,
                misses_per_token_p50=float(np.percentile(misses_token, 50)) if N else math.nan,
                misses_per_token_p90=float(np.percentile(misses_token, 90)) if N else math.nan,
            )
            if bytes_per_expert is not None:
                result.bytes_per_expert = int(bytes_per_expert)
                result.bytes_fetched = result.misses * int(bytes_per_expert)
                result.bytes_per_token = result.misses_per_token * bytes_per_expert
                if bandwidth_gbps is not None:
                    ms_per_miss = bytes_per_expert / (bandwidth_gbps * 1e9) * 1e3
                    result.bandwidth_gbps = float(bandwidth_gbps)
                    result.tpot_floor_ms = result.misses_per_token * ms_per_miss
                    result.tpot_floor_p50_ms = result.misses_per_token_p50 * ms_per_miss
                    result.tpot_floor_p90_ms = result.misses_per_token_p90 * ms_per_miss
            results.append(result)
    return results


def simulate(
    trace: RoutingTrace,
    policy: str = "lru",
    slots_per_layer: int | None = None,
    *,
    total_slots: int | None = None,
    bytes_per_expert: int | None = None,
    bandwidth_gbps: float | None = None,
    flush: str = "never",
) -> SimResult:
    """Replay a trace through one policy at one cache size.

    Args:
        trace: the routing trace.
        policy: "lru", "lfu" or "opt".
        slots_per_layer: per-layer caches of this many slots (scope "layer").
        total_slots: one cache of this many slots shared by all layers (scope "global").
            Give exactly one of the two.
        bytes_per_expert: S_e; default the trace's `meta.expert_bytes`.
        bandwidth_gbps: link bandwidth in GB/s for the TPOT floor.
        flush: "never" or "sequence" (see `sweep`).

    Returns:
        SimResult, with hits and misses per layer.
    """
    if (slots_per_layer is None) == (total_slots is None):
        raise ValueError("give exactly one of slots_per_layer and total_slots")
    scope = "layer" if slots_per_layer is not None else "global"
    size = slots_per_layer if slots_per_layer is not None else total_slots
    return sweep(trace, [policy], [size], scope=scope, bytes_per_expert=bytes_per_expert,
                 bandwidth_gbps=bandwidth_gbps, flush=flush)[0]


_POLICY_COLORS = {"lru": "tab:blue", "lfu": "tab:orange", "opt": "tab:green"}
_TRACE_STYLES = ["-", "--", ":", "-."]


def plot_hit_rates(
    series: Sequence[tuple[str, Sequence[SimResult]]],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> None:
    """Hit rate against cache size, one line per (trace, policy), written as an image.

    Args:
        series: (label, results) per trace; each trace gets its own line style, each policy its
            own colour.
        path: output image (format from the suffix, e.g. .png).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    scope = None
    for i, (label, results) in enumerate(series):
        style = _TRACE_STYLES[i % len(_TRACE_STYLES)]
        for policy in dict.fromkeys(r.policy for r in results):
            rows = sorted((r for r in results if r.policy == policy), key=lambda r: r.slots)
            scope = rows[0].scope
            name = policy.upper() + (" (Belady)" if policy == "opt" else "")
            ax.plot([r.slots for r in rows], [r.hit_rate for r in rows], style, marker="o",
                    markersize=3.5, color=_POLICY_COLORS.get(policy),
                    label=f"{label}: {name}" if len(series) > 1 else name)
    sizes = sorted({r.slots for _, results in series for r in results})
    if sizes and max(sizes) >= 4 * min(sizes):
        ax.set_xscale("log", base=2)
    if sizes:
        # Plain numbers: the simulated sizes when few, else the powers of two between them.
        ticks = sizes if len(sizes) <= 12 else sorted(
            {sizes[0], sizes[-1]} | {1 << i for i in range(sizes[-1].bit_length())
                                     if sizes[0] <= 1 << i <= sizes[-1]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("cache slots per layer" if scope == "layer" else "cache slots (all layers)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
