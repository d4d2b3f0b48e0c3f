"""The ReMoE loss terms against hand-computed values (docs/design.md section 7)."""

from __future__ import annotations

import math

import pytest
import torch

from remoe_engine.finetune import loss as L
from remoe_engine.finetune.config import ReMoEConfig


def logp_of(rows: list[list[list[float]]]) -> torch.Tensor:
    """log of explicit probabilities [B][S][E] (float64 for exact comparisons)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def symkl_hand(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)) + sum(
        b * math.log(b / a) for a, b in zip(p, q, strict=True))


def kl_hand(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def entropy_hand(p: list[float]) -> float:
    return -sum(a * math.log(a) for a in p if a > 0)


P0, P1, P2, P3 = [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.25, 0.25, 0.5]


def test_reuse_mass_hand_value():
    # K = 2: token 1 puts P1[0] + P1[2] on token 0's experts {0, 2}; token 2 puts P2[1] + P2[2]
    # on token 1's experts {1, 2}.
    logp = logp_of([[P0, P1, P2]])
    ids = torch.tensor([[[0, 2], [1, 2], [0, 1]]])
    m1 = (P1[0] + P1[2]) / 2
    m2 = (P2[1] + P2[2]) / 2
    expected = -math.log((m1 + m2) / 2 + 1e-8)
    assert float(L.reuse_loss(logp, ids)) == pytest.approx(expected, rel=1e-12)


def test_reuse_never_crosses_sequences():
    # Two rows: the first token of row 1 must not be scored against the last token of row 0.
    logp = logp_of([[P0, P1], [P2, P3]])
    ids = torch.tensor([[[0], [1]], [[2], [0]]])
    expected = -math.log((P1[0] + P3[2]) / 2 + 1e-8)
    assert float(L.reuse_loss(logp, ids)) == pytest.approx(expected, rel=1e-12)


def test_reuse_gradient_reaches_logits_not_ids():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    ids = torch.randint(0, 6, (2, 5, 2))
    loss = L.reuse_loss(torch.log_softmax(logits, -1), ids)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # Raising the logits of the previous token's experts raises the mass, lowering the loss.
    with torch.no_grad():
        bumped = logits.clone()
        for b in range(2):
            for t in range(1, 5):
                bumped[b, t, ids[b, t - 1]] += 1.0
    assert float(L.reuse_loss(torch.log_softmax(bumped, -1), ids)) < float(loss.detach())


def test_smooth_hand_value():
    logp = logp_of([[P0, P1, P2]])
    expected = (symkl_hand(P1, P0) + symkl_hand(P2, P1)) / 2
    assert float(L.smooth_loss(logp)) == pytest.approx(expected, rel=1e-12)
    assert float(L.smooth_loss(logp_of([[P0, P0, P0]]))) == pytest.approx(0.0, abs=1e-15)


def test_lag_hand_value_and_long_lags_left_out():
    logp = logp_of([[P0, P1, P2]])
    lag1 = (symkl_hand(P1, P0) + symkl_hand(P2, P1)) / 2
    lag2 = symkl_hand(P2, P0)
    # Lag 4 >= S = 3 has no pairs: it is left out of the mean, not counted as 0.
    assert float(L.lag_loss(logp, (1, 2, 4))) == pytest.approx((lag1 + lag2) / 2, rel=1e-12)


def test_window_entropy_hand_value():
    a, b = [0.9, 0.1], [0.1, 0.9]
    logp = logp_of([[a, b, a, a, b]])  # W = 2: blocks (a, b) and (a, a); the trailing b dropped
    expected = (entropy_hand([0.5, 0.5]) + entropy_hand(a)) / 2
    assert float(L.window_entropy_loss(logp, 2)) == pytest.approx(expected, rel=1e-12)


def test_trust_hand_value():
    logp, logq = logp_of([[P0, P1]]), logp_of([[P2, P3]])
    expected = (kl_hand(P0, P2) + kl_hand(P1, P3)) / 2
    assert float(L.trust_loss(logp, logq)) == pytest.approx(expected, rel=1e-12)


def test_combine_with_locality_warmup():
    cfg = ReMoEConfig(lambda_kl=0.5, lambda_reuse=2.0, lambda_smooth=0.1, lambda_lag=0.05,
                      lambda_ws=0.3, steps=10, locality_warmup=0.5)
    layers = [{"reuse": torch.tensor(1.0), "smooth": torch.tensor(2.0), "lag": torch.tensor(3.0),
               "ws": torch.tensor(4.0), "trust": torch.tensor(0.2)},
              {"reuse": torch.tensor(3.0), "smooth": torch.tensor(0.0), "lag": torch.tensor(1.0),
               "ws": torch.tensor(2.0), "trust": torch.tensor(0.4)}]
    ce = torch.tensor(5.0)
    # Layer means: reuse 2, smooth 1, lag 2, ws 3, trust 0.3; T_warm = 5 steps.
    locality = 2.0 * 2 + 0.1 * 1 + 0.05 * 2 + 0.3 * 3
    for step, ramp in [(1, 0.2), (2, 0.4), (5, 1.0), (9, 1.0)]:
        loss, logged = L.combine(ce, layers, cfg, step)
        assert float(loss) == pytest.approx(5.0 + 0.5 * 0.3 + ramp * locality, rel=1e-6)
        assert logged["ramp"] == pytest.approx(ramp)
    assert ReMoEConfig(locality_warmup=0.0).locality_weight(1) == 1.0


def test_layer_terms_use_the_softmax_of_the_logits():
    # A sigmoid router's logits give the same terms: P is always softmax over the E logits.
    logits = torch.randn(1, 6, 5, dtype=torch.float64)
    ids = logits.topk(2, -1).indices
    cfg = ReMoEConfig(lags=(1, 2), window=3)
    terms = L.layer_terms(logits, ids, logits + 0.3, cfg)  # a constant shift: same P
    logp = torch.log_softmax(logits.float(), -1)
    assert float(terms["reuse"]) == pytest.approx(float(L.reuse_loss(logp, ids)), rel=1e-6)
    assert float(terms["trust"]) == pytest.approx(0.0, abs=1e-6)
    assert float(L.layer_terms(logits, ids, None, cfg)["trust"]) == 0.0


@pytest.mark.parametrize("field,value,match", [
    ("lambda_reuse", -1.0, "lambda_reuse"), ("lr", 0.0, "lr"), ("steps", 0, "steps"),
    ("locality_warmup", 1.5, "locality_warmup"), ("lags", (0, 2), "lags"),
    ("seq_len", 1, "seq_len"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        ReMoEConfig(**{field: value}).validate()


def test_config_round_trips():
    cfg = ReMoEConfig(lags=(1, 3), lr=2e-4)
    assert ReMoEConfig.from_dict(cfg.to_dict()) == cfg
