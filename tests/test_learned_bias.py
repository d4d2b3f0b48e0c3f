"""The learned reuse bias: the preferred sets are the simulator's, the selection trained is the
selection decoded, gradients reach the strengths, and deltas ship and check the strengths."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import build

import remoe_engine
from remoe_engine import sim
from remoe_engine.evaluation import decode
from remoe_engine.families import find_moe_blocks
from remoe_engine.finetune import delta as fdelta
from remoe_engine.finetune.bias import (
    BiasedRouting,
    LearnedBias,
    bias_loss,
    bias_terms,
    resident_sets,
)
from remoe_engine.finetune.config import ReuseBiasConfig


def _tiny(seed: int = 0):
    return build("qwen3_moe", seed=seed)


def _moe_shape(model) -> tuple[int, int, int]:
    from remoe_engine.families import find_moe_blocks, routing_spec

    blocks = find_moe_blocks(model)
    return len(blocks), int(blocks[0].experts.num_experts), int(routing_spec(model).top_k)


# ---- the resident set is the simulator's ------------------------------------------------------


@pytest.mark.parametrize("slots", [4, 6, 9])
def test_resident_sets_give_the_simulators_hits(slots):
    """Hits counted against `resident_sets` of each prefix equal sim.simulate_cache's LRU
    replay of the same requests, request by request (each sequence from an empty cache)."""
    g = torch.Generator().manual_seed(slots)
    B, R, K, E = 3, 40, 4, 16
    requests = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R)])
                            for _ in range(B)])  # [B, R, K]
    expected = sim.simulate_cache(requests, [slots], "lru")[0]  # [B, R]
    for t in range(R):
        resident = resident_sets(requests[:, :t], slots, E)  # [B, E]
        assert int(resident.sum(1).max()) <= slots
        got = resident.gather(1, requests[:, t]).sum(1)
        assert got.tolist() == expected[:, t].tolist(), t


# ---- the selection trained is the selection decoded -------------------------------------------


def _training_ids(model, window: torch.Tensor, strengths: torch.Tensor, source: str,
                  slots: int) -> torch.Tensor:
    """[L, S, K] ids the biased routing chooses in one teacher-forced training forward."""
    with torch.no_grad(), BiasedRouting(model, strengths, source, slots, tau=0.01) as routing:
        routing.shape = (1, window.numel())
        model(input_ids=window[None], use_cache=False)
    return torch.stack([ids[0] for _, _, ids in routing.layers])


@pytest.mark.parametrize("source", ["previous", "resident"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_training_selection_equals_decode_selection(source, per_expert):
    """Token by token with the KV cache under patch() and the learned strengths, the routers
    choose exactly the experts the teacher-forced training forward chose."""
    model = _tiny()
    L, E, K = _moe_shape(model)
    g = torch.Generator().manual_seed(1)
    width = E if per_expert else 1
    # Strong enough that the bias changes many choices (checked below).
    strengths = 0.02 + 0.1 * torch.rand(L, width, generator=g)
    slots = K + 2
    window = torch.randint(0, model.config.vocab_size, (40,), generator=g)
    trained = _training_ids(model, window, strengths, source, slots)
    unbiased = _training_ids(model, window, torch.zeros(L, width), source, slots)
    assert (trained.sort(-1).values != unbiased.sort(-1).values).any(-1).float().mean() > 0.1

    served = copy.deepcopy(model)
    fdelta.install_learned_bias(served, LearnedBias(source, strengths, slots))
    handle = remoe_engine.patch(served, slots_per_layer=slots)
    try:
        # Feed the window and one more token: decode routes tokens 0..S-1.
        result = decode(served, torch.cat([window, window[:1]])[None], handle=handle)
    finally:
        handle.unpatch()
    decoded = result.routing.ids.long()  # [L, S, K]
    assert torch.equal(decoded.sort(-1).values, trained.sort(-1).values)


# ---- gradients --------------------------------------------------------------------------------


def test_reuse_and_trust_terms_have_the_hand_gradient():
    """bias_terms' autograd gradient equals a central finite difference, and the terms move as
    they should: more strength, more reuse mass (lower L_reuse) and more KL."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    prefer = torch.rand(2, 6, 8, generator=g) < 0.3
    prefer[:, 0] = False
    s = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    terms = bias_terms(logits, prefer, s)
    grads = torch.autograd.grad(terms["reuse"] + 2.0 * terms["trust"], s)[0]
    h = 1e-6

    def value(x):
        t = bias_terms(logits, prefer, torch.tensor([x], dtype=torch.float64))
        return float(t["reuse"] + 2.0 * t["trust"])

    numeric = (value(0.05 + h) - value(0.05 - h)) / (2 * h)
    assert float(grads) == pytest.approx(numeric, rel=1e-5)
    lo, hi = (bias_terms(logits, prefer, torch.tensor([x], dtype=torch.float64))
              for x in (0.01, 0.1))
    assert hi["reuse"] < lo["reuse"] and hi["trust"] > lo["trust"]
    zero = bias_terms(logits, prefer, torch.tensor([0.0], dtype=torch.float64))
    assert float(zero["trust"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("per_expert", [False, True])
def test_cross_entropy_reaches_the_strengths_through_the_straight_through_top_k(per_expert):
    """With the reuse and trust weights at 0 the loss is the cross-entropy alone; its gradient
    still reaches the strengths (through the soft top-k), and the forward's choice is the hard
    one (the loss equals the cross-entropy of the biased model without the gradient path)."""
    model = _tiny()
    L, E, _ = _moe_shape(model)
    cfg = ReuseBiasConfig(lambda_kl=0.0, lambda_reuse=0.0, tau=0.01)
    s = torch.nn.Parameter(torch.full((L, E if per_expert else 1), 0.03))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator()
                        .manual_seed(3))
    for p in model.parameters():
        p.requires_grad_(False)
    with BiasedRouting(model, s, "previous", 8, tau=cfg.tau) as routing:
        loss, logged = bias_loss(model, routing, ids, s, cfg)
    loss.backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())
    assert float(s.grad.abs().sum()) > 0
    with torch.no_grad(), BiasedRouting(model, s.detach(), "previous", 8, tau=None) as routing:
        hard, _ = bias_loss(model, routing, ids, s.detach(), cfg)
    assert float(loss.detach()) == pytest.approx(float(hard), rel=1e-6)


# ---- shipping ---------------------------------------------------------------------------------


def test_delta_round_trip_and_mismatched_strengths_are_refused(tmp_path):
    model = _tiny()
    L, E, _ = _moe_shape(model)
    learned = LearnedBias("resident", torch.rand(L, E) * 0.05, slots=8)
    path = fdelta.save_router_delta(model, tmp_path / "d.safetensors", reuse_bias=learned)
    back = fdelta.read_learned_bias(path)
    assert back.source == "resident" and back.slots == 8
    assert torch.equal(back.strengths, learned.strengths)

    other = _tiny(1)
    fdelta.apply_router_delta(other, path)  # a plain model keeps it for patch()
    assert torch.equal(getattr(other, fdelta.LEARNED_ATTR).strengths, learned.strengths)
    handle = remoe_engine.patch(other, slots_per_layer=8)
    try:
        states = [b.router._remoe for b in find_moe_blocks(other)]
        assert all(st.bias_source == "resident" for st in states)
        assert torch.equal(states[1].reuse_strengths, learned.strengths[1])
        assert handle.stats()["bias_source"] == "resident"
    finally:
        handle.unpatch()

    wrong = LearnedBias("previous", torch.rand(L + 1, 1) * 0.05)
    bad = fdelta.save_router_delta(model, tmp_path / "bad.safetensors", reuse_bias=wrong)
    with pytest.raises(ValueError, match="reuse-bias strengths are for"):
        fdelta.apply_router_delta(_tiny(), bad)
    wide = LearnedBias("previous", torch.rand(L, E + 3) * 0.05)
    bad = fdelta.save_router_delta(model, tmp_path / "wide.safetensors", reuse_bias=wide)
    fresh = _tiny()
    before = {k: v.clone() for k, v in fdelta.router_parameters(fresh).items()}
    with pytest.raises(ValueError, match="experts"):
        fdelta.apply_router_delta(fresh, bad)
    # Refused before anything changed.
    assert all(torch.equal(before[k], v) for k, v in fdelta.router_parameters(fresh).items())


def test_old_delta_without_strengths_loads_as_before(tmp_path):
    model = _tiny()
    path = fdelta.save_router_delta(model, tmp_path / "old.safetensors")
    assert fdelta.read_learned_bias(path) is None
    other = _tiny(1)
    fdelta.apply_router_delta(other, path)
    assert getattr(other, fdelta.LEARNED_ATTR, None) is None
    for k, v in fdelta.router_parameters(other).items():
        assert torch.equal(v, fdelta.router_parameters(model)[k])


def test_strengths_must_be_finite_and_non_negative():
    with pytest.raises(ValueError, match=">= 0"):
        LearnedBias("previous", torch.tensor([[0.1], [-0.01]]))
    with pytest.raises(ValueError, match="source"):
        LearnedBias("sideways", torch.tensor([[0.1]]))


def test_model_card_section_is_generated_from_the_committed_results():
    """The card's learned-bias section comes from bench/results, never typed: regenerate it."""
    import glob
    import importlib.util
    import json
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    results = sorted(glob.glob(str(root / "bench" / "results" / "learned-bias-*.json")))
    if not results:
        pytest.skip("no learned-bias results committed yet")
    spec = importlib.util.spec_from_file_location(
        "learned_bias", root / "bench" / "experiments" / "learned_bias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = json.loads(pathlib.Path(results[-1]).read_text())
    section = module.card_section(doc, str(pathlib.Path(results[-1]).relative_to(root)))
    card = (root / "remoe_engine" / "zoo" / "tiny" / "MODEL_CARD.md").read_text()
    assert section in card


def test_spsa_estimate_is_the_difference_of_two_perturbed_forwards():
    """spsa_ce_gradient = (CE(s + c d) - CE(s - c d)) / (2c) * d with the hard biased selection,
    and the routing's strengths and temperature are restored after."""
    import torch.nn.functional as F

    from remoe_engine.finetune.bias import spsa_ce_gradient

    model = _tiny()
    L, _, _ = _moe_shape(model)
    s = torch.nn.Parameter(torch.tensor([[0.02], [0.0], [0.05], [0.01]])[:L])
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator()
                        .manual_seed(5))
    with BiasedRouting(model, s, "resident", 4, tau=0.01) as routing:
        est = spsa_ce_gradient(model, routing, ids, s, 0.01, torch.Generator().manual_seed(9))
        assert routing.strengths is s and routing.tau == 0.01
    signs = torch.randint(0, 2, s.shape, generator=torch.Generator().manual_seed(9)).float() * 2 - 1

    def ce(strengths):
        with torch.no_grad(), BiasedRouting(model, strengths, "resident", 4) as r:
            r.shape = tuple(ids.shape)
            logits = model(input_ids=ids, use_cache=False).logits
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                     ids[:, 1:].reshape(-1)))

    expected = (ce((s.detach() + 0.01 * signs).clamp_min(0))
                - ce((s.detach() - 0.01 * signs).clamp_min(0))) / 0.02 * signs
    assert float(expected.abs().sum()) > 0  # the perturbation changes the choice and the CE
    assert torch.allclose(est, expected, rtol=1e-5, atol=1e-7)
