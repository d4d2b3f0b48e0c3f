"""Expert-reuse metrics of routing traces (docs/design.md section 8).

Definitions, with `E_t` the set of K experts token t chose in one MoE layer:

- EOR (expert overlap / reuse): `IR_t = |E_t ∩ E_{t-1}| / K` over consecutive tokens of the same
  sequence (batch size 1 semantics: a sequence's first token has no predecessor), averaged over
  token pairs per layer, then over layers with equal weight.
- Reuse at lag d: the same with `E_{t-d}`; lag 1 is the EOR.
- Distinct experts per window: the number of different experts a layer uses over a window of W
  consecutive tokens; windows are non-overlapping, start at each sequence's first token, and a
  trailing partial window is dropped (the zoo's model card uses the same rule).
- Top-k agreement of two routers on the same tokens: `|E_t^ref ∩ E_t^cand| / K`, averaged.
- KL to the reference router: `KL(P_cand || P_ref)` per token (P = softmax of the router's
  logits), averaged: the same direction as the fine-tuning trust term of docs/design.md section 7.

Legend: L = MoE layers, N = tokens, K = top-k, E = experts, W = window length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from remoe_engine.ops import topk_overlap
from remoe_engine.trace import RoutingTrace

__all__ = [
    "AgreementStats",
    "DistinctStats",
    "LagReuse",
    "ReuseStats",
    "distinct_experts",
    "expert_reuse",
    "reuse_at_lags",
    "router_agreement",
]


class _Report:
    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass
class ReuseStats(_Report):
    """EOR of a trace.

    Args:
        eor: mean over layers of the per-layer EOR.
        eor_per_layer: EOR of each MoE layer [L].
        pairs: consecutive same-sequence token pairs per layer.
        eor_random: K / E, the EOR of routing that ignores the previous token.
    """

    eor: float
    eor_per_layer: list[float]
    pairs: int
    eor_random: float


@dataclass
class LagReuse(_Report):
    """Reuse between tokens d apart, for each lag d.

    Args:
        lags: the lags d.
        mean: mean over layers of the reuse at each lag [len(lags)].
        per_layer: reuse per layer and lag [L][len(lags)].
        pairs: token pairs per layer at each lag.
    """

    lags: list[int]
    mean: list[float]
    per_layer: list[list[float]]
    pairs: list[int]


@dataclass
class DistinctStats(_Report):
    """Distinct experts per window of W tokens.

    Args:
        window: W.
        mean: mean over layers of the per-layer mean.
        per_layer: mean distinct experts per window in each layer [L].
        windows: full windows per layer.
        random: expected value for independent uniformly random top-K sets,
            `E * (1 - (1 - K/E)^W)`.
    """

    window: int
    mean: float
    per_layer: list[float]
    windows: int
    random: float


@dataclass
class AgreementStats(_Report):
    """How a candidate router's choices compare with a reference router's on the same tokens.

    Args:
        topk_agreement: mean over layers of `|E_ref ∩ E_cand| / K`.
        topk_agreement_per_layer: [L].
        kl: mean over layers of the mean per-token `KL(P_cand || P_ref)` in nats, None unless both
            traces hold router probabilities.
        kl_per_layer: [L] or None.
        tokens: tokens compared per layer.
    """

    topk_agreement: float
    topk_agreement_per_layer: list[float]
    kl: float | None
    kl_per_layer: list[float] | None
    tokens: int


def _sequence_ids(trace: RoutingTrace) -> torch.Tensor:
    """int64 [N]: the sequence of each token."""
    lengths = trace.offsets.diff()
    return torch.repeat_interleave(torch.arange(trace.num_sequences), lengths)


def reuse_at_lags(trace: RoutingTrace, lags: int | list[int] = 16) -> LagReuse:
    """Reuse `|E_t ∩ E_{t-d}| / K` for each lag d, over token pairs inside one sequence.

    Args:
        trace: the routing trace.
        lags: the lags to measure, or an int D for lags 1..D.

    Returns:
        LagReuse. A lag with no same-sequence pair reports NaN.

    Raises:
        ValueError: if a lag is < 1.
    """
    lag_list = list(range(1, lags + 1)) if isinstance(lags, int) else list(lags)
    if not lag_list or min(lag_list) < 1:
        raise ValueError(f"lags must be >= 1, got {lag_list}")
    seq = _sequence_ids(trace)  # [N]
    K = trace.top_k
    per_layer = [[float("nan")] * len(lag_list) for _ in range(trace.num_layers)]
    pairs = []
    for i, d in enumerate(lag_list):
        same = seq[d:] == seq[:-d] if d < trace.num_tokens else torch.zeros(0, dtype=torch.bool)
        pairs.append(int(same.sum()))
        if not pairs[-1]:
            continue
        for layer in range(trace.num_layers):
            ids = trace.ids[layer]  # [N, K]
            overlap = topk_overlap(ids[d:][same], ids[:-d][same])  # [pairs]
            per_layer[layer][i] = float(overlap.double().mean()) / K
    mean = [sum(row[i] for row in per_layer) / trace.num_layers for i in range(len(lag_list))]
    return LagReuse(lags=lag_list, mean=mean, per_layer=per_layer, pairs=pairs)


def expert_reuse(trace: RoutingTrace) -> ReuseStats:
    """EOR per layer and mean (reuse at lag 1).

    Args:
        trace: the routing trace.

    Returns:
        ReuseStats.

    Raises:
        ValueError: if no sequence has two tokens.
    """
    lag = reuse_at_lags(trace, [1])
    if not lag.pairs[0]:
        raise ValueError("the trace has no two consecutive tokens in one sequence: EOR is "
                         "undefined")
    per_layer = [row[0] for row in lag.per_layer]
    return ReuseStats(eor=lag.mean[0], eor_per_layer=per_layer, pairs=lag.pairs[0],
                      eor_random=trace.top_k / trace.num_experts)


def distinct_experts(trace: RoutingTrace, window: int = 16) -> DistinctStats:
    """Mean number of distinct experts per layer over non-overlapping windows of W tokens.

    Args:
        trace: the routing trace.
        window: W >= 1.

    Returns:
        DistinctStats.

    Raises:
        ValueError: if W < 1 or no sequence has W tokens.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    starts, lengths = trace.offsets[:-1], trace.offsets.diff()
    counts = lengths // window  # full windows per sequence
    if int(counts.sum()) == 0:
        raise ValueError(f"no sequence of the trace has {window} tokens (longest: "
                         f"{int(lengths.max()) if lengths.numel() else 0})")
    # First token of every window: each sequence's start plus multiples of W.
    seq_of_window = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first_of_seq = torch.cumsum(counts, 0) - counts
    rank = torch.arange(int(counts.sum())) - first_of_seq[seq_of_window]
    window_starts = starts[seq_of_window] + rank * window  # [num_windows]
    index = window_starts[:, None] + torch.arange(window)  # [num_windows, W]
    per_layer = []
    for layer in range(trace.num_layers):
        chosen = trace.ids[layer][index].flatten(1).sort(dim=-1).values  # [num_windows, W*K]
        distinct = 1 + (chosen[:, 1:] != chosen[:, :-1]).sum(dim=-1)  # [num_windows]
        per_layer.append(float(distinct.double().mean()))
    E, K = trace.num_experts, trace.top_k
    return DistinctStats(window=window, mean=sum(per_layer) / len(per_layer), per_layer=per_layer,
                         windows=int(index.shape[0]), random=E * (1.0 - (1.0 - K / E) ** window))


def router_agreement(reference: RoutingTrace, candidate: RoutingTrace) -> AgreementStats:
    """Top-k agreement and KL of a candidate router against a reference router, token by token.

    Both traces must route the same tokens (same sequences, same token ids when recorded) with
    the same layers, K and E, e.g. the original and the fine-tuned router of one model.

    Args:
        reference: trace of the reference (original) router.
        candidate: trace of the candidate (fine-tuned or biased) router.

    Returns:
        AgreementStats; `kl` is None unless both traces hold probabilities.

    Raises:
        ValueError: naming the first mismatch between the traces.
    """
    ref, cand = reference, candidate
    for name in ("num_layers", "num_tokens", "top_k", "num_experts"):
        if getattr(ref, name) != getattr(cand, name):
            raise ValueError(f"traces differ in {name}: {getattr(ref, name)} vs "
                             f"{getattr(cand, name)}; compare traces of the same tokens")
    if not torch.equal(ref.offsets, cand.offsets):
        raise ValueError("traces split their tokens into different sequences")
    if ref.token_ids is not None and cand.token_ids is not None:
        if not torch.equal(ref.token_ids, cand.token_ids):
            first = int((ref.token_ids != cand.token_ids).nonzero()[0])
            raise ValueError(f"traces route different tokens (first difference at token {first})")
    agreement = [float(topk_overlap(ref.ids[layer], cand.ids[layer]).double().mean()) / ref.top_k
                 for layer in range(ref.num_layers)]
    kl_per_layer = None
    if ref.probs is not None and cand.probs is not None:
        # Clamp so an expert with probability 0 in float32 gives a large, finite term.
        log_ref = ref.probs.double().clamp_min(1e-30).log()  # [L, N, E]
        p_cand = cand.probs.double()
        log_cand = p_cand.clamp_min(1e-30).log()
        kl = (p_cand * (log_cand - log_ref)).sum(dim=-1)  # [L, N]
        kl_per_layer = kl.mean(dim=1).tolist()
    return AgreementStats(
        topk_agreement=sum(agreement) / len(agreement),
        topk_agreement_per_layer=agreement,
        kl=None if kl_per_layer is None else sum(kl_per_layer) / len(kl_per_layer),
        kl_per_layer=kl_per_layer,
        tokens=ref.num_tokens,
    )
