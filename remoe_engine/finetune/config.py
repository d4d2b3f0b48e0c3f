"""The ReMoE fine-tuning config (docs/design.md section 7): plain data, no torch, so the command
line can show its defaults in `remoe finetune --help` without importing the training stack."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["BIAS_SOURCES", "ReMoEConfig", "ReuseBiasConfig"]


@dataclass
class ReMoEConfig:
    """Everything that determines a ReMoE fine-tuning run (the loss and the optimisation).

    The defaults are the recipe chosen by the lambda sweep on the built-in model
    (`bench/results/finetune-sweep.json`, `docs/img/remoe_pareto.png`, and the model card's
    section "ReMoE router fine-tuning"): the largest EOR gain whose held-out perplexity stayed
    within 1% of the original. A strong trust term (lambda_kl 10) kept runs stable across seeds;
    the orientation recipe of docs/design.md section 7 (lambda_kl 1, lambda_reuse 1) raised EOR
    far more but cost over 5% perplexity on the built-in model.

    Args:
        lambda_kl: weight of L_trust (KL to the frozen original router).
        lambda_reuse / lambda_smooth / lambda_lag / lambda_ws: weights of the locality terms.
        lags: token distances d of L_lag.
        window: W, tokens per block of L_ws.
        locality_warmup: T_warm as a fraction of `steps` (the locality weight ramps linearly from
            0 to 1 over the first `locality_warmup * steps` steps); 0 means no ramp.
        steps: optimizer steps.
        lr: AdamW peak learning rate (router parameters only).
        lr_warmup: linear learning-rate warm-up, as a fraction of `steps`; constant afterwards.
        weight_decay: AdamW weight decay (0: the router should only move where the loss asks).
        grad_clip: global gradient-norm clip.
        batch: sequences per step per process.
        seq_len: tokens per training sequence.
        seed: seeds batch sampling (per step and process, so a resumed run draws the same data).
        eval_every: steps between held-out evaluations (0: none).
        save_every: steps between checkpoints (0: only at the end).
    """

    lambda_kl: float = 10.0
    lambda_reuse: float = 1.5
    lambda_smooth: float = 0.1
    lambda_lag: float = 0.05
    lambda_ws: float = 0.05
    lags: tuple[int, ...] = (1, 2, 4, 8, 16)
    window: int = 16
    locality_warmup: float = 0.2
    steps: int = 150
    lr: float = 1e-3
    lr_warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch: int = 8
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 0
    save_every: int = 50
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Check the values.

        Raises:
            ValueError: naming the first bad value.
        """
        for name in ("lambda_kl", "lambda_reuse", "lambda_smooth", "lambda_lag", "lambda_ws",
                     "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("steps", "batch", "seq_len", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("locality_warmup", "lr_warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.lags or any(int(d) < 1 for d in self.lags):
            raise ValueError(f"lags must be positive integers, got {list(self.lags)}")
        if self.eval_every < 0 or self.save_every < 0:
            raise ValueError("eval_every and save_every must be >= 0")

    def to_dict(self) -> dict:
        """JSON-ready dict of every field."""
        d = dataclasses.asdict(self)
        d["lags"] = list(self.lags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ReMoEConfig:
        """Inverse of `to_dict` (unknown keys raise TypeError)."""
        d = dict(d)
        if "lags" in d:
            d["lags"] = tuple(int(x) for x in d["lags"])
        return cls(**d)

    def locality_weight(self, step: int) -> float:
        """min(1, step / T_warm) for the 1-based optimizer step `step`."""
        t_warm = self.locality_warmup * self.steps
        return 1.0 if t_warm <= 0 else min(1.0, step / t_warm)


BIAS_SOURCES = ("previous", "resident")


@dataclass
class ReuseBiasConfig:
    """A learned reuse bias run (`remoe_engine.finetune.bias`): the router weights stay as they
    are; only the strengths of the reuse bias train.

    The defaults are the recipe of the built-in model's shipped `reuse-bias-delta.safetensors`
    (with source "resident", slots 8; `bench/results/learned-bias-cpu-2026-11-30.json`): the
    SPSA estimate of the cross-entropy's gradient, not the straight-through one, is what moved
    the strengths away from uniform there.

    Args:
        source: what the bias prefers, as at inference: "previous" (the experts the previous
            token of the sequence chose at the layer) or "resident" (the experts resident in an
            LRU pool of `slots` slots per layer, replayed per training sequence as `sim` replays
            a trace).
        slots: pool slots per layer for "resident" (the target budget's share per layer).
        per_expert: one strength per (layer, expert) instead of one per layer.
        init: initial strength (selection-score units: probabilities for softmax routers).
        lambda_kl: weight of the trust KL(Q || P), Q the biased selection distribution.
        lambda_reuse: weight of the reuse term -log(mean reuse mass of Q on the preferred set).
        tau: temperature of the soft top-k whose gradient stands in for the hard choice
            (straight-through), in selection-score units.
        ce_gradient: how the cross-entropy's gradient reaches the strengths: "straight-through"
            (the soft top-k above) or "spsa": a simultaneous-perturbation estimate from two more
            forwards without gradients at strengths s +- c * delta (delta random signs), which
            sees what the experts a choice displaces were worth (the straight-through gradient
            only sees the chosen experts); the reuse and trust terms keep their exact gradient.
        spsa_c: the perturbation size c of "spsa".
        steps, lr, lr_warmup, grad_clip, batch, seq_len, seed: the optimisation, as for ReMoE.
    """

    source: str = "previous"
    slots: int = 8
    per_expert: bool = False
    init: float = 0.03
    lambda_kl: float = 1.0
    lambda_reuse: float = 0.5
    tau: float = 0.01
    ce_gradient: str = "spsa"
    spsa_c: float = 0.01
    steps: int = 30
    lr: float = 1e-3
    lr_warmup: float = 0.1
    grad_clip: float = 1.0
    batch: int = 8
    seq_len: int = 128
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the first bad value."""
        if self.source not in BIAS_SOURCES:
            raise ValueError(f"source must be one of {BIAS_SOURCES}, got {self.source!r}")
        if self.ce_gradient not in ("straight-through", "spsa"):
            raise ValueError(f"ce_gradient must be 'straight-through' or 'spsa', got "
                             f"{self.ce_gradient!r}")
        if not self.spsa_c > 0:
            raise ValueError(f"spsa_c must be > 0, got {self.spsa_c}")
        for name in ("init", "lambda_kl", "lambda_reuse", "grad_clip"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tau", "lr"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "batch", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.lr_warmup <= 1.0:
            raise ValueError(f"lr_warmup must be in [0, 1], got {self.lr_warmup}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to 10% (as ReMoE's schedule), for the 1-based step."""
        import math

        warm = max(1, round(self.lr_warmup * self.steps)) if self.lr_warmup > 0 else 0
        if step <= warm:
            return self.lr * step / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
