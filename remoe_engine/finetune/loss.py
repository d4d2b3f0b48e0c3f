"""The ReMoE loss (docs/design.md section 7): reuse locality for router-only fine-tuning.

Per MoE layer, teacher-forced, with `P_t = softmax(router logits)` (also for sigmoid-scored
routers such as DeepSeek-V3: the method defines the locality terms on the softmax over the E
logits, whatever the family's own scoring) and `E_{t-1}` the experts token t-1 was routed to
(no gradient)::

    m_t      = (1/K) * sum_{k in E_{t-1}} P_t[k]                  reuse mass
    L_reuse  = -log(mean_t m_t + 1e-8)
    L_smooth = mean_t SymKL(P_t, P_{t-1})
    L_lag    = mean over lags d of mean_t SymKL(P_t, P_{t-d})
    L_ws     = mean over blocks of W tokens of entropy(mean of P over the block)
    L_trust  = mean_t KL(P_t || P_ref_t),  P_ref from a frozen fp32 copy of the original router
    L        = L_CE + l_kl * L_trust
               + min(1, step / T_warm) * (l_r L_reuse + l_s L_smooth + l_l L_lag + l_w L_ws)

`SymKL(p, q) = KL(p || q) + KL(q || p)` (the sum, not the mean, of the two directions). Layer terms
are averaged over MoE layers. Every mean over t runs over tokens of the same sequence only: the
inputs are [B, S, E] and t-1 never crosses from one sequence (row) into the next.

Legend: B = sequences, S = tokens per sequence, E = experts, K = top-k, W = window.
"""

from __future__ import annotations

import torch

from remoe_engine.finetune.config import ReMoEConfig

__all__ = ["EPS", "combine", "layer_terms"]

EPS = 1e-8  # inside the reuse log, as in the method


# ---- the per-layer terms; inputs are log-probabilities [B, S, E] ------------------------------


def sym_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p||q) + KL(q||p) along the last dim.

    Args:
        logp, logq: log-probabilities [..., E].

    Returns:
        [...] float tensor.
    """
    return ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim; logp, logq [..., E] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reuse_loss(logp: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
    """L_reuse = -log(mean_t m_t + 1e-8), m_t the mass P_t puts on the experts of token t-1.

    Args:
        logp: log-probabilities [B, S, E] (S >= 2).
        prev_ids: int64 [B, S, K], the experts each token was routed to (the router's own
            choice; no gradient flows through it). Token t's mass is taken on ids[:, t-1].

    Returns:
        scalar tensor.
    """
    top_k = prev_ids.shape[-1]
    p_next = logp[:, 1:].exp()  # [B, S-1, E]
    mass = p_next.gather(-1, prev_ids[:, :-1].detach()).sum(-1) / top_k  # [B, S-1]
    return -torch.log(mass.mean() + EPS)


def smooth_loss(logp: torch.Tensor) -> torch.Tensor:
    """L_smooth = mean_t SymKL(P_t, P_{t-1}); logp [B, S, E] -> scalar."""
    return sym_kl(logp[:, 1:], logp[:, :-1]).mean()


def lag_loss(logp: torch.Tensor, lags: tuple[int, ...]) -> torch.Tensor:
    """L_lag = mean over lags d < S of mean_t SymKL(P_t, P_{t-d}); logp [B, S, E] -> scalar.

    Lags as long as the sequence or longer have no pairs and are left out of the mean.
    """
    seq = logp.shape[1]
    terms = [sym_kl(logp[:, d:], logp[:, :-d]).mean() for d in lags if d < seq]
    if not terms:
        return logp.new_zeros(())
    return torch.stack(terms).mean()


def window_entropy_loss(logp: torch.Tensor, window: int) -> torch.Tensor:
    """L_ws = mean over blocks of `window` tokens of the entropy of the block-mean P.

    Blocks are non-overlapping and start at each sequence's first token; a trailing partial
    block is dropped (a sequence shorter than one block uses itself as the block).

    Args:
        logp: log-probabilities [B, S, E].
        window: W.

    Returns:
        scalar tensor (nats).
    """
    B, S, E = logp.shape
    w = min(window, S)
    blocks = logp[:, : (S // w) * w].exp().view(B, S // w, w, E).mean(dim=2)  # [B, S/W, E]
    return -(blocks * blocks.clamp_min(1e-30).log()).sum(-1).mean()


def trust_loss(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """L_trust = mean_t KL(P_t || P_ref_t); both [B, S, E] log-probabilities -> scalar."""
    return kl(logp, logp_ref.detach()).mean()


TERMS = ("reuse", "smooth", "lag", "ws", "trust")


def layer_terms(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None,
                cfg: ReMoEConfig) -> dict[str, torch.Tensor]:
    """Every ReMoE term of one MoE layer.

    Args:
        logits: router logits [B, S, E] (any float dtype; computed in fp32 here).
        ids: int64 [B, S, K], the experts the router chose.
        ref_logits: the frozen original router's logits [B, S, E], or None (trust term 0).
        cfg: the config (lags, window).

    Returns:
        {"reuse", "smooth", "lag", "ws", "trust"}: scalar tensors.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, S, E]
    terms = {
        "reuse": reuse_loss(logp, ids),
        "smooth": smooth_loss(logp),
        "lag": lag_loss(logp, cfg.lags),
        "ws": window_entropy_loss(logp, cfg.window),
    }
    if ref_logits is None:
        terms["trust"] = logp.new_zeros(())
    else:
        terms["trust"] = trust_loss(logp, torch.log_softmax(ref_logits.float(), dim=-1))
    return terms


def combine(ce: torch.Tensor, layers: list[dict[str, torch.Tensor]], cfg: ReMoEConfig,
            step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss from the cross-entropy and each layer's terms.

    Args:
        ce: next-token cross-entropy (scalar).
        layers: `layer_terms` of each MoE layer.
        cfg: the lambdas and the warm-up.
        step: 1-based optimizer step (for the locality warm-up).

    Returns:
        (loss scalar with grad, {"loss", "ce", "reuse", ..., "ramp"} as floats for logging).
    """
    mean = {name: torch.stack([t[name] for t in layers]).mean() for name in TERMS}
    ramp = cfg.locality_weight(step)
    locality = (cfg.lambda_reuse * mean["reuse"] + cfg.lambda_smooth * mean["smooth"]
                + cfg.lambda_lag * mean["lag"] + cfg.lambda_ws * mean["ws"])
    loss = ce + cfg.lambda_kl * mean["trust"] + ramp * locality
    logged = {"loss": float(loss.detach()), "ce": float(ce.detach()), "ramp": ramp}
    logged.update({name: float(v.detach()) for name, v in mean.items()})
    return loss, logged
