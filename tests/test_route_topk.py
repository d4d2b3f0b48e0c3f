"""remoe::route_topk against the pure-PyTorch reference, the real transformers routers, opcheck,
torch.compile, and every input rule."""

from __future__ import annotations

import hf_tiny
import pytest
import torch

from remoe_engine import ops
from remoe_engine import reference as ref
from remoe_engine.families import find_moe_blocks, routing_spec

# Weights are fp32 and only the exp implementation differs between kernels and reference.
WEIGHT_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def _assert_same_routing(got, want, atol=1e-6):
    (w, i), (rw, ri) = got, want
    assert i.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(i.cpu(), ri.cpu())
    torch.testing.assert_close(w.cpu(), rw.cpu(), atol=atol, rtol=0, equal_nan=True)


# ---------------------------------------------------------------- reference equivalence sweeps


@pytest.mark.parametrize("T", [0, 1, 7, 4097])
@pytest.mark.parametrize("E,K", [(8, 1), (60, 4), (64, 6), (128, 8), (257, 2)])
def test_softmax_sweep_matches_reference(device, T, E, K):
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + K)
    logits = (torch.randn(T, E, generator=gen) * 2).to(device)
    for renormalize in (True, False):
        got = ops.route_topk(logits, K, renormalize=renormalize)
        want = ref.route_topk(logits, K, renormalize=renormalize)
        _assert_same_routing(got, want)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax_over_topk"])
@pytest.mark.parametrize("T,E,K", [(1, 8, 1), (7, 60, 6), (513, 128, 8), (33, 257, 8)])
def test_other_scorings_match_reference(device, scoring, T, E, K):
    gen = torch.Generator().manual_seed(E + K + T)
    logits = (torch.randn(T, E, generator=gen) * 3).to(device)
    for kwargs in (dict(), dict(renormalize=False, routed_scaling=2.5)):
        got = ops.route_topk(logits, K, scoring=scoring, **kwargs)
        want = ref.route_topk(logits, K, scoring=scoring, **kwargs)
        _assert_same_routing(got, want)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,n_group,topk_group,K", [(64, 8, 3, 6), (256, 8, 4, 8), (60, 4, 2, 4)])
def test_group_limited_matches_reference(device, group_score, scoring, E, n_group, topk_group, K):
    gen = torch.Generator().manual_seed(E * n_group + K)
    T = 97
    logits = torch.randn(T, E, generator=gen).to(device)
    bias = (torch.randn(E, generator=gen) * 0.1).to(device)
    prefer = (torch.rand(T, E, generator=gen) < 0.1).to(device)
    kwargs = dict(scoring=scoring, n_group=n_group, topk_group=topk_group,
                  group_score=group_score, correction_bias=bias, prefer=prefer, reuse_bias=0.03,
                  routed_scaling=2.5)
    _assert_same_routing(ops.route_topk(logits, K, **kwargs), ref.route_topk(logits, K, **kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_scored_in_fp32(device, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(65, 64, generator=gen).to(device=device, dtype=dtype)
    got = ops.route_topk(logits, 6)
    # The reference upcasts first, so the only difference allowed is the exp's rounding.
    _assert_same_routing(got, ref.route_topk(logits, 6), atol=WEIGHT_ATOL[dtype])
    _assert_same_routing(got, ops.route_topk(logits.float(), 6))


# ---------------------------------------------------------------- the reuse bias


def test_bias_moves_selection_toward_preferred_and_leaves_weights_unbiased(device):
    gen = torch.Generator().manual_seed(11)
    T, E, K = 512, 64, 6
    logits = (torch.randn(T, E, generator=gen) * 3).to(device)  # peaked, as trained routers are
    prefer = torch.zeros(E, dtype=torch.bool, device=device)
    prefer[::4] = True  # 16 preferred experts
    w0, i0 = ops.route_topk(logits, K)
    w1, i1 = ops.route_topk(logits, K, prefer=prefer, reuse_bias=0.02)
    chosen_preferred_before = prefer[i0].float().mean().item()
    chosen_preferred_after = prefer[i1].float().mean().item()
    assert chosen_preferred_after > chosen_preferred_before + 0.1
    # Weights are the unbiased softmax probabilities of the chosen experts, renormalized.
    probs = torch.softmax(logits.float(), dim=-1)
    picked = probs.gather(-1, i1)
    torch.testing.assert_close(w1, picked / picked.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    # And rows where the bias did not change the choice are bit-identical to the unbiased call.
    same = (i0 == i1).all(-1)
    assert same.any()
    assert torch.equal(w0[same], w1[same])


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax_over_topk"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_weights_are_the_unbiased_scores_of_the_chosen_experts(device, scoring, renormalize):
    """Correction bias and reuse bias move the choice; the weights (renormalized, scaled) come from
    the unbiased scores of whatever was chosen, for every scoring."""
    gen = torch.Generator().manual_seed(13)
    T, E, K = 257, 64, 6
    logits = (torch.randn(T, E, generator=gen) * 2).to(device)
    bias = (torch.randn(E, generator=gen) * 0.5).to(device)
    prefer = (torch.rand(T, E, generator=gen) < 0.2).to(device)
    weights, ids = ops.route_topk(logits, K, scoring=scoring, renormalize=renormalize,
                                  prefer=prefer, reuse_bias=0.3, correction_bias=bias,
                                  routed_scaling=2.5)
    _, unbiased_ids = ops.route_topk(logits, K, scoring=scoring)
    assert (ids != unbiased_ids).any(-1).float().mean() > 0.5  # the biases did move choices
    chosen = ref.scores_fp32(logits, scoring).gather(-1, ids)  # [T, K]
    if scoring == "softmax_over_topk":  # renormalize is ignored: a softmax sums to 1
        want = torch.softmax(chosen, dim=-1)
    elif renormalize:
        want = chosen / chosen.sum(-1, keepdim=True)
    else:
        want = chosen
    torch.testing.assert_close(weights, want * 2.5, atol=1e-6, rtol=0)


def test_huge_bias_chooses_exactly_the_preferred_experts(device):
    logits = torch.randn(9, 32, generator=torch.Generator().manual_seed(0)).to(device)
    prefer = torch.zeros(9, 32, dtype=torch.bool, device=device)
    for t in range(9):
        prefer[t, [t, t + 3, t + 7, t + 20]] = True  # per-token preferences [T, E]
    _, ids = ops.route_topk(logits, 4, prefer=prefer, reuse_bias=10.0)
    assert torch.equal(prefer.gather(-1, ids), torch.ones_like(ids, dtype=torch.bool))


def test_zero_bias_with_prefer_equals_no_prefer(device):
    logits = torch.randn(31, 64, generator=torch.Generator().manual_seed(1)).to(device)
    prefer = torch.rand(31, 64, generator=torch.Generator().manual_seed(2)).to(device) < 0.5
    _assert_same_routing(ops.route_topk(logits, 6, prefer=prefer, reuse_bias=0.0),
                         ops.route_topk(logits, 6))


# ---------------------------------------------------------------- ties, NaN, inf


def test_ties_go_to_the_lower_expert_id(device):
    logits = torch.zeros(3, 16, device=device)  # every expert tied
    _, ids = ops.route_topk(logits, 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    logits[1, [5, 9, 12]] = 1.0  # three tied winners, then ties among the rest
    _, ids = ops.route_topk(logits, 4)
    assert ids[1].tolist() == [5, 9, 12, 0]


def test_nan_and_inf_rows_are_deterministic_and_match_reference(device):
    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    logits[0, 3] = float("nan")  # softmax: whole row NaN -> ids 0..K-1, NaN weights
    logits[1, 5] = float("inf")  # softmax: whole row NaN as torch.softmax
    logits[2, :] = float("-inf")  # all masked
    logits[3, [0, 1, 2]] = float("-inf")  # masked experts are never preferred to finite ones
    logits = logits.to(device)
    for scoring in ("softmax", "sigmoid", "softmax_over_topk"):
        got = ops.route_topk(logits, 4, scoring=scoring)
        _assert_same_routing(got, ref.route_topk(logits, 4, scoring=scoring))
    w, ids = ops.route_topk(logits, 4)
    assert ids[0].tolist() == [0, 1, 2, 3] and torch.isnan(w[0]).all()
    assert not set(ids[3].tolist()) & {0, 1, 2}
    w, ids = ops.route_topk(logits, 4, scoring="sigmoid")
    assert 3 not in ids[0].tolist()  # NaN ranks below every number
    assert ids[1, 0].item() == 5  # sigmoid(+inf) = 1 is a fine score


@pytest.mark.parametrize("K", [1, 3, 8, 10])
def test_heavy_ties_nans_infs_and_signed_zeros_match_reference(device, K):
    """Values from a tiny set (so most comparisons tie), with NaN, +-inf and -0.0 mixed in."""
    g = torch.Generator().manual_seed(K)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf"), float("nan")])
    logits = pool[torch.randint(0, len(pool), (64, 24), generator=g)].to(device)
    prefer = (torch.rand(64, 24, generator=g) < 0.3).to(device)
    for scoring in ("sigmoid", "softmax_over_topk"):
        for kwargs in ({}, {"prefer": prefer, "reuse_bias": 0.5}):
            got = ops.route_topk(logits, K, scoring=scoring, renormalize=False, **kwargs)
            want = ref.route_topk(logits, K, scoring=scoring, renormalize=False, **kwargs)
            assert torch.equal(got[1].cpu(), want[1].cpu()), (scoring, kwargs)
    zeros = torch.tensor([[-0.0, 0.0, -1.0], [0.0, -0.0, -1.0]], device=device)
    _, ids = ops.route_topk(zeros, 1, scoring="softmax_over_topk")
    assert ids[:, 0].tolist() == [0, 0]  # -0.0 and +0.0 tie: the lower id wins


def test_check_finite_names_the_token_and_expert():
    logits = torch.zeros(4, 8)
    logits[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[2, 5\] = nan"):
        ops.route_topk(logits, 2, check_finite=True)
    logits[2, 5] = float("-inf")  # -inf is a legitimate mask
    ops.route_topk(logits, 2, check_finite=True)


# ---------------------------------------------------------------- the real transformers routers


@pytest.mark.parametrize("variant", hf_tiny.ALL_VARIANTS, ids=hf_tiny.variant_id)
def test_reproduces_transformers_router(variant):
    model_type, extra = variant
    model = hf_tiny.build(model_type, **extra)
    spec = routing_spec(model)
    blocks = find_moe_blocks(model)
    assert blocks, f"no MoE block found in {model_type}"
    gen = torch.Generator().manual_seed(0)
    for block in blocks:
        hidden = torch.randn(74, model.config.hidden_size, generator=gen)  # [T, H]
        with torch.no_grad():
            logits, hf_weights, hf_ids = block.router(hidden)
        weights, ids = ops.route_topk(logits, spec.top_k, **spec.op_kwargs(block.router))
        # Some families take top-k with sorted=False: compare as sets, ordered by id.
        hf_ids, order = hf_ids.sort(dim=-1)
        hf_weights = hf_weights.gather(-1, order)
        ids, order = ids.sort(dim=-1)
        weights = weights.gather(-1, order)
        assert torch.equal(ids, hf_ids), f"{model_type}: ids differ"
        torch.testing.assert_close(weights, hf_weights.float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- opcheck, compile, autograd


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                  routed_scaling=2.5), dict(scoring="softmax_over_topk")],
    ids=["softmax", "sigmoid-grouped", "softmax_over_topk"],
)
def test_opcheck(device, kwargs):
    logits = torch.randn(5, 16, device=device, requires_grad=True)
    prefer = torch.zeros(16, dtype=torch.bool, device=device)
    prefer[3] = True
    bias = torch.randn(16, device=device) * 0.1
    full = {**dict(scoring="softmax", renormalize=True, n_group=1, topk_group=1,
                   group_score="max", routed_scaling=1.0), **kwargs}
    args = (logits, 4, full["scoring"], full["renormalize"], prefer, 0.02, bias, full["n_group"],
            full["topk_group"], full["group_score"], full["routed_scaling"])
    torch.library.opcheck(torch.ops.remoe.route_topk.default, args)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax_over_topk"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_flows_through_the_weights_only(device, scoring, renormalize):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 16, generator=gen).to(device).requires_grad_(True)
    prefer = (torch.rand(16, generator=gen) < 0.3).to(device)
    weights, ids = ops.route_topk(logits, 4, scoring=scoring, renormalize=renormalize,
                                  prefer=prefer, reuse_bias=0.05, routed_scaling=1.5)
    assert not ids.requires_grad
    # Autograd through the reference's differentiable math at the same ids.
    ref_logits = logits.detach().clone().requires_grad_(True)
    score = ref.scores_fp32(ref_logits, scoring)
    if scoring == "softmax_over_topk":
        ref_weights = torch.softmax(score.gather(-1, ids), dim=-1)
    else:
        ref_weights = score.gather(-1, ids)
        if renormalize:
            ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    ref_weights = ref_weights * 1.5
    upstream = torch.randn(weights.shape, generator=gen).to(device)
    (weights * upstream).sum().backward()
    (ref_weights * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-5)


def test_torch_compile_fullgraph():
    def route(logits, prefer):
        weights, ids = ops.route_topk(logits, 4, prefer=prefer, reuse_bias=0.05)
        return weights * 2, ids + 1

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    logits = torch.randn(8, 32)
    prefer = torch.rand(32) < 0.3
    w, i = compiled(logits, prefer)
    w_eager, i_eager = route(logits, prefer)
    assert torch.equal(i, i_eager) and torch.equal(w, w_eager)


# ---------------------------------------------------------------- one test per input rule


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda: (torch.randn(2, 3, 8), 2, {}), "logits must be 2-D"),
        (lambda: (torch.randn(2, 8, dtype=torch.float64), 2, {}), "float32, bfloat16 or float16"),
        (lambda: (torch.randn(2, 8), 0, {}), r"top_k must be in \[1, 8\].*got 0"),
        (lambda: (torch.randn(2, 8), 9, {}), r"top_k must be in \[1, 8\].*got 9"),
        (lambda: (torch.randn(2, 8), 2, dict(scoring="relu")), "scoring must be"),
        (lambda: (torch.randn(2, 8), 2, dict(prefer=torch.ones(8))), "prefer must be a bool"),
        (lambda: (torch.randn(2, 8), 2, dict(prefer=torch.ones(7, dtype=torch.bool))),
         r"prefer must have shape \[8\] or \[2, 8\]"),
        (lambda: (torch.randn(2, 8), 2, dict(reuse_bias=float("nan"))),
         "reuse_bias must be finite"),
        (lambda: (torch.randn(2, 8), 2, dict(correction_bias=torch.zeros(4))),
         r"correction_bias must have shape \[8\]"),
        (lambda: (torch.randn(2, 8), 2, dict(correction_bias=torch.zeros(8, dtype=torch.float16))),
         "correction_bias must be float32"),
        (lambda: (torch.randn(2, 8), 2, dict(n_group=3)), "n_group must divide"),
        (lambda: (torch.randn(2, 8), 2, dict(n_group=4, topk_group=5)), "topk_group must be in"),
        (lambda: (torch.randn(2, 8), 5, dict(n_group=4, topk_group=2)),
         "top_k=5 exceeds the experts in the kept groups"),
        (lambda: (torch.randn(2, 8), 2, dict(n_group=8, topk_group=2, group_score="top2_sum")),
         "needs at least 2 experts per group"),
        (lambda: (torch.randn(2, 8), 2, dict(group_score="mean")), "group_score must be"),
        (lambda: (torch.randn(2, 8), 2, dict(scoring="softmax_over_topk", n_group=2)),
         "not defined for scoring='softmax_over_topk'"),
        (lambda: (torch.randn(2, 8), 2, dict(routed_scaling=float("inf"))),
         "routed_scaling must be finite"),
    ],
)
def test_input_rules(make_args, match):
    logits, top_k, kwargs = make_args()
    with pytest.raises(RuntimeError, match=match):
        ops.route_topk(logits, top_k, **kwargs)


@pytest.mark.cuda
def test_inputs_on_another_device_are_rejected():
    logits = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="prefer is on cpu but logits are on cuda"):
        ops.route_topk(logits, 2, prefer=torch.ones(8, dtype=torch.bool))


@pytest.mark.cuda
def test_cuda_matches_cpu_bit_for_bit_on_ids():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4097, 256, generator=gen)
    prefer = torch.rand(4097, 256, generator=gen) < 0.05
    for kwargs in (dict(), dict(scoring="sigmoid", n_group=8, topk_group=4,
                                group_score="top2_sum", correction_bias=torch.randn(256) * 0.1)):
        cpu = ops.route_topk(logits, 8, prefer=prefer, reuse_bias=0.02, **kwargs)
        cuda_kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        gpu = ops.route_topk(logits.cuda(), 8, prefer=prefer.cuda(), reuse_bias=0.02,
                             **cuda_kwargs)
        _assert_same_routing(gpu, cpu)
