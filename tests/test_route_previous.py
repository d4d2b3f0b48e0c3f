"""remoe::route_topk_previous (the "previous" reuse bias of a prefill in one call) against the
per-position loop the router ran before (issue 19, item 5), kept here as the reference: the op
must give exactly its ids and weights, on CPU and CUDA, for every scoring rule."""

from __future__ import annotations

import pytest
import torch

from remoe_engine.ops import route_topk, route_topk_previous


def loop_reference(logits: torch.Tensor, K: int, previous: torch.Tensor | None,
                   reuse_bias: float, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's former loop (router._route_with_previous before issue 19), verbatim but
    for its inputs: one route_topk call per position, all B sequences at once."""
    B, S, E = logits.shape
    weights = logits.new_empty(B, S, K, dtype=torch.float32)
    ids = torch.empty(B, S, K, dtype=torch.int64, device=logits.device)
    for s in range(S):
        if previous is None:
            w, i = route_topk(logits[:, s], K, **kwargs)
        else:
            prefer = torch.zeros(B, E, dtype=torch.bool, device=logits.device)
            prefer.scatter_(1, previous, True)
            w, i = route_topk(logits[:, s], K, prefer=prefer, reuse_bias=reuse_bias, **kwargs)
        weights[:, s], ids[:, s] = w, i
        previous = i
    return weights, ids


CASES = {
    "softmax": dict(scoring="softmax"),
    "softmax-no-renorm": dict(scoring="softmax", renormalize=False),
    "sigmoid-deepseek-v3": dict(scoring="sigmoid", n_group=4, topk_group=2,
                                group_score="top2_sum", routed_scaling=2.5),
    "softmax-group-max": dict(scoring="softmax", n_group=4, topk_group=2, group_score="max"),
    "softmax-over-topk": dict(scoring="softmax_over_topk"),
}


def _logits(B, S, E, dtype, device, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, E, generator=g)
    if ties:
        x = (x * 2).round() / 2  # many exact ties: the lower id must win in both
    return x.to(dtype).to(device)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("B,S", [(1, 1), (1, 9), (3, 33), (2, 128)])
@pytest.mark.parametrize("with_previous", [False, True], ids=["fresh", "continued"])
def test_equals_the_per_position_loop(device, case, B, S, with_previous):
    E, K = 16, 4
    kwargs = dict(CASES[case])
    if case == "sigmoid-deepseek-v3":
        kwargs["correction_bias"] = torch.linspace(-0.1, 0.1, E).to(device)
    logits = _logits(B, S, E, torch.float32, device, seed=B * 1000 + S)
    previous = (torch.stack([torch.randperm(E)[:K] for _ in range(B)]).to(device)
                if with_previous else None)
    # A bias comparable to the score gaps, so the preference really changes choices.
    bias = 0.5 if case == "softmax-over-topk" else 0.08
    want_w, want_i = loop_reference(logits, K, previous, bias, **kwargs)
    got_w, got_i = route_topk_previous(logits, K, previous=previous, reuse_bias=bias, **kwargs)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_w, want_w)


def test_the_bias_really_changes_choices_here():
    """Guards the sweep above against testing nothing: with this bias, choices do follow the
    previous position (the unbiased routing differs)."""
    logits = _logits(2, 64, 16, torch.float32, "cpu")
    _, biased = route_topk_previous(logits, 4, reuse_bias=0.08)
    _, plain = route_topk(logits.view(-1, 16), 4)
    assert not torch.equal(biased.view(-1, 4), plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_ties_equal_the_loop(device, dtype):
    logits = _logits(2, 40, 32, dtype, device, ties=True)
    want_w, want_i = loop_reference(logits, 6, None, 0.05)
    got_w, got_i = route_topk_previous(logits, 6, reuse_bias=0.05)
    assert torch.equal(got_i, want_i) and torch.equal(got_w, want_w)


def test_nan_rows_equal_the_loop(device):
    logits = _logits(1, 12, 16, torch.float32, device)
    logits[0, 3] = float("nan")
    logits[0, 7, 5] = float("inf")
    want_w, want_i = loop_reference(logits, 4, None, 0.1)
    got_w, got_i = route_topk_previous(logits, 4, reuse_bias=0.1)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_w.isnan(), want_w.isnan())
    assert torch.equal(got_w.nan_to_num(), want_w.nan_to_num())


def test_empty_sequence(device):
    w, i = route_topk_previous(torch.zeros(2, 0, 8, device=device), 2, reuse_bias=0.1)
    assert w.shape == (2, 0, 2) and i.shape == (2, 0, 2)


@pytest.mark.parametrize("make_args,match", [
    (lambda: (torch.zeros(4, 8), None), "must be 3-D"),
    (lambda: (torch.zeros(2, 3, 8), torch.zeros(3, 2, dtype=torch.int64)),
     r"previous must be int64 \[2, 2\]"),
    (lambda: (torch.zeros(2, 3, 8), torch.zeros(2, 2)), "previous must be int64"),
    (lambda: (torch.zeros(1, 3, 8), torch.tensor([[0, 8]])), r"previous id 8 .* outside \[0, 8\)"),
])
def test_input_rules(make_args, match):
    logits, previous = make_args()
    with pytest.raises(RuntimeError, match=match):
        route_topk_previous(logits, 2, previous=previous, reuse_bias=0.1)


def test_opcheck():
    logits = _logits(2, 5, 8, torch.float32, "cpu")
    args = (logits, torch.tensor([[0, 1], [2, 3]]), 2, "softmax", True, 0.1, None, 1, 1, "max", 1.0)
    torch.library.opcheck(torch.ops.remoe.route_topk_previous.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.slow
def test_long_prefill_in_bf16_equals_the_loop_on_cuda():
    """E=512, K=22, T=32k in bf16 (issue 19, item 9): one launch walks the whole prompt and
    gives exactly what 32k positions of route_topk launches give on the same GPU. (Against the
    CPU the recurrence could carry on a flip between two selection scores within the backends'
    different exp; rows compare bit for bit only within one backend.)"""
    logits = _logits(1, 32768, 512, torch.bfloat16, "cuda", seed=7)
    got_w, got_i = route_topk_previous(logits, 22, reuse_bias=0.01)
    want_w, want_i = loop_reference(logits, 22, None, 0.01)
    assert torch.equal(got_i, want_i) and torch.equal(got_w, want_w)


def test_router_keeps_gradients_and_the_sequence_state():
    """The patched router's "previous" path: same ids and weights as the loop, the last
    position's ids kept for the next forward, and weights differentiable when grad is on."""
    from remoe_engine.families import RoutingSpec
    from remoe_engine.router import RouterState, _route_with_previous

    spec = RoutingSpec(top_k=3)
    state = RouterState(spec=spec, reuse_bias=0.08, bias_source="previous", batch_shape=(2, 10))
    logits = _logits(2, 10, 8, torch.float32, "cpu").view(20, 8).requires_grad_(True)
    kwargs = spec.op_kwargs()
    weights, ids = _route_with_previous(state, logits, kwargs)
    want_w, want_i = loop_reference(logits.detach().view(2, 10, 8), 3, None, 0.08, **kwargs)
    assert torch.equal(ids.view(2, 10, 3), want_i)
    assert torch.equal(weights.detach().view(2, 10, 3), want_w)
    assert torch.equal(state.sequence_previous[0], want_i[:, -1])
    weights.sum().backward()
    assert logits.grad is not None and logits.grad.shape == (20, 8)
