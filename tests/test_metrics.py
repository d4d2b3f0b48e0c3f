"""Expert-reuse metrics on hand-made traces with known answers, and against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from remoe_engine import metrics
from remoe_engine.trace import RoutingTrace, TraceMeta, synthetic


def _trace(ids, num_experts: int, lengths=None, probs=None, token_ids=None) -> RoutingTrace:
    ids_t = torch.tensor(ids, dtype=torch.int32)  # [L, N, K]
    L, N, K = ids_t.shape
    offsets = torch.tensor([0, *itertools.accumulate(lengths or [N])])
    return RoutingTrace(ids=ids_t, offsets=offsets, probs=probs, token_ids=token_ids,
                        meta=TraceMeta(top_k=K, num_experts=num_experts, layers=list(range(L))))


# Layer 0: overlaps of consecutive tokens are 1, 1, 0. Layer 1: 2, 0, 1.
IDS = [[[0, 1], [1, 2], [2, 3], [0, 1]],
       [[0, 1], [1, 0], [2, 3], [3, 0]]]


def test_eor_known_answer():
    stats = metrics.expert_reuse(_trace(IDS, num_experts=4))
    assert stats.eor_per_layer == [pytest.approx(2 / 6), pytest.approx(3 / 6)]
    assert stats.eor == pytest.approx((2 / 6 + 3 / 6) / 2)
    assert stats.pairs == 3 and stats.eor_random == 0.5


def test_eor_skips_pairs_across_sequences():
    # Sequences [t0, t1] and [t2, t3]: the pair (t1, t2) does not count.
    stats = metrics.expert_reuse(_trace(IDS, num_experts=4, lengths=[2, 2]))
    assert stats.eor_per_layer == [pytest.approx(1 / 4), pytest.approx(3 / 4)]
    assert stats.pairs == 2
    with pytest.raises(ValueError, match="no two consecutive tokens"):
        metrics.expert_reuse(_trace(IDS, num_experts=4, lengths=[1, 1, 1, 1]))


def test_reuse_at_lags_known_answer():
    lags = metrics.reuse_at_lags(_trace(IDS, num_experts=4), [1, 2, 3, 4])
    # Layer 0: lag 2 pairs (t0,t2)=0, (t1,t3)=1; lag 3 pair (t0,t3)=2. No pair at lag 4.
    assert lags.per_layer[0][:3] == [pytest.approx(1 / 3), pytest.approx(1 / 4), 1.0]
    # Layer 1: lag 2 (t0,t2)=0, (t1,t3)=1; lag 3 (t0,t3)=1.
    assert lags.per_layer[1][:3] == [pytest.approx(1 / 2), pytest.approx(1 / 4), 0.5]
    assert lags.pairs == [3, 2, 1, 0] and math.isnan(lags.mean[3])
    assert lags.mean[1] == pytest.approx(1 / 4)
    assert metrics.reuse_at_lags(_trace(IDS, 4), 16).lags == list(range(1, 17))
    with pytest.raises(ValueError, match="lags must be >= 1"):
        metrics.reuse_at_lags(_trace(IDS, 4), [0])


def test_distinct_experts_known_answer():
    # W=2. Layer 0: {0,1,2} then {0,1,2,3}; layer 1: {0,1} then {0,2,3}.
    stats = metrics.distinct_experts(_trace(IDS, num_experts=4), window=2)
    assert stats.per_layer == [3.5, 2.5] and stats.mean == 3.0 and stats.windows == 2
    assert stats.random == pytest.approx(4 * (1 - 0.5**2))
    # Sequences of 3 and 1 tokens: one full window, a trailing partial one is dropped.
    short = metrics.distinct_experts(_trace(IDS, num_experts=4, lengths=[3, 1]), window=2)
    assert short.per_layer == [3.0, 2.0] and short.windows == 1
    with pytest.raises(ValueError, match="no sequence of the trace has 5 tokens"):
        metrics.distinct_experts(_trace(IDS, num_experts=4), window=5)


def test_router_agreement_known_answer():
    p_ref = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    p_cand = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    ref = _trace([[[0, 1], [1, 2]]], 4, probs=p_ref, token_ids=torch.tensor([5, 6]))
    cand = _trace([[[0, 2], [2, 1]]], 4, probs=p_cand, token_ids=torch.tensor([5, 6]))
    stats = metrics.router_agreement(ref, cand)
    assert stats.topk_agreement == pytest.approx((1 / 2 + 2 / 2) / 2)
    kl_first = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(cand || ref)
    assert stats.kl == pytest.approx(kl_first / 2, rel=1e-6)
    assert metrics.router_agreement(ref, ref).kl == 0.0

    no_probs = _trace([[[0, 2], [2, 1]]], 4)
    assert metrics.router_agreement(ref, no_probs).kl is None
    other_tokens = _trace([[[0, 2], [2, 1]]], 4, token_ids=torch.tensor([5, 7]))
    with pytest.raises(ValueError, match="different tokens .first difference at token 1"):
        metrics.router_agreement(ref, other_tokens)
    with pytest.raises(ValueError, match="traces differ in num_tokens: 2 vs 4"):
        metrics.router_agreement(ref, _trace(IDS[:1], 4))


def _brute_reuse(ids: list[list[list[int]]], lengths: list[int], lag: int) -> list[float]:
    out = []
    for layer in ids:
        total, pairs, start = 0, 0, 0
        for n in lengths:
            for t in range(start + lag, start + n):
                total += len(set(layer[t]) & set(layer[t - lag]))
                pairs += 1
            start += n
        out.append(total / (pairs * len(layer[0])) if pairs else math.nan)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 8), st.lists(st.integers(1, 12), min_size=1,
                                                      max_size=4), st.integers(0, 10**6))
def test_reuse_matches_brute_force(layers, num_experts, lengths, seed):
    k = 1 + seed % min(3, num_experts)
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    ids = torch.stack([torch.stack([torch.randperm(num_experts, generator=gen)[:k]
                                    for _ in range(n)]) for _ in range(layers)]).tolist()
    t = _trace(ids, num_experts, lengths=lengths)
    lags = metrics.reuse_at_lags(t, 4)
    for i, lag in enumerate(lags.lags):
        want = _brute_reuse(ids, lengths, lag)
        got = [row[i] for row in lags.per_layer]
        assert got == pytest.approx(want, nan_ok=True)
    if max(lengths) > 1:
        assert metrics.expert_reuse(t).eor_per_layer == pytest.approx(_brute_reuse(ids, lengths,
                                                                                   1))


def test_eor_extremes():
    same = _trace([[[3, 1]] * 5], num_experts=8)
    assert metrics.expert_reuse(same).eor == 1.0
    assert metrics.distinct_experts(same, window=5).mean == 2.0
    disjoint = _trace([[[0, 1], [2, 3], [0, 1], [2, 3]]], num_experts=4)
    assert metrics.expert_reuse(disjoint).eor == 0.0
    assert metrics.reuse_at_lags(disjoint, [2]).mean == [1.0]


def test_distinct_experts_grow_with_the_window():
    t = synthetic(2048, layers=2, experts=32, top_k=4, seed=0)
    means = [metrics.distinct_experts(t, w).mean for w in (1, 4, 16, 64)]
    assert means[0] == 4.0
    assert means == sorted(means) and means[-1] <= 32
