"""A learned reuse bias: the strengths of the cache-aware routing bias, trained against the
model's own loss instead of set by hand.

At inference `route_topk` adds a bias to the selection score of preferred experts (the experts
the previous token chose, or the experts resident in the slot pool; `remoe_engine.router`). Here
that strength is a parameter: one per MoE layer (or one per layer and expert), trained with the
router weights frozen, with exactly the selection inference applies (`router.route_preferring`,
the same op call), on teacher-forced training windows:

- the preferred set of token t is what inference would prefer: "previous" the experts token t-1
  chose (with the bias) at the layer; "resident" the experts resident in an LRU pool of `slots`
  slots per layer after tokens 0..t-1, each sequence from an empty pool, computed by the cache
  simulator's own kernel (`resident_sets`, checked against `sim.simulate_cache`). Both are
  recurrences over the positions of a sequence (a choice changes what the next token prefers),
  walked position by position as the patched router walks a prefill;
- the loss, per MoE layer, with P = softmax(router logits) and Q the biased selection
  distribution Q = (P + s * prefer) / sum(...) (for softmax routers Q ranks the experts exactly as
  the biased selection score does)::

      L = CE + lambda_kl * mean_t KL(Q_t || P_t) + lambda_reuse * -log(mean_t m_t)
      m_t = sum over preferred e of Q_t[e]          (the method's reuse mass, on Q)

- the cross-entropy reaches the strengths through a straight-through soft top-k: the experts
  and weights of the forward are the hard choice; each chosen expert's weight is multiplied by
  g / stop_gradient(g), g = sigmoid((selection score - threshold) / tau), the threshold halfway
  between the K-th and (K+1)-th biased selection scores. So the cross-entropy says whether
  raising the preferred experts near the boundary (and lowering the others there) helps.

The result ships in a router delta (`delta.save_router_delta(..., reuse_bias=...)`), applied by
`apply_router_delta` on a model from `remoe_engine.load()` or `patch()` (or before `patch()`).

Legend: B = sequences, S = tokens per sequence, L = MoE layers, E = experts, K = top-k.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine.finetune.config import BIAS_SOURCES, ReuseBiasConfig

__all__ = ["BiasedRouting", "LearnedBias", "bias_terms", "resident_sets", "train_reuse_bias"]

EPS = 1e-8


@dataclass
class LearnedBias:
    """Learned reuse-bias strengths, as a router delta ships them.

    Args:
        source: "previous" or "resident" (what the bias prefers).
        strengths: float32 [L, 1] (one per MoE layer) or [L, E] (one per layer and expert),
            >= 0, in selection-score units.
        slots: the pool slots per layer "resident" was trained at (information; inference
            prefers whatever the pool it runs with holds).
    """

    source: str
    strengths: torch.Tensor
    slots: int | None = None

    def __post_init__(self):
        if self.source not in BIAS_SOURCES:
            raise ValueError(f"reuse-bias source must be one of {BIAS_SOURCES}, got "
                             f"{self.source!r}")
        s = self.strengths
        if s.dim() != 2 or s.shape[0] < 1 or s.shape[1] < 1:
            raise ValueError(f"reuse-bias strengths must be [layers, 1] or [layers, experts], "
                             f"got {list(s.shape)}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError("reuse-bias strengths must be finite and >= 0")

    @property
    def per_expert(self) -> bool:
        return self.strengths.shape[1] > 1

    def check_model(self, layers: int, experts: int) -> None:
        """Raises ValueError when the strengths do not fit a model of `layers` MoE layers and
        `experts` experts per layer."""
        L, width = self.strengths.shape
        if L != layers or width not in (1, experts):
            shape = f"{L} MoE layers" + (f" x {width} experts" if width > 1 else "")
            raise ValueError(f"router delta's reuse-bias strengths are for {shape}; the model "
                             f"has {layers} MoE layers x {experts} experts")

    def layer(self, index: int) -> tuple[float, torch.Tensor | None]:
        """(scalar bias, per-expert strengths or None) of one MoE layer, as `RouterState`
        takes them (the scalar is the largest strength: 0 turns the bias off)."""
        row = self.strengths[index].float()
        if self.per_expert:
            return float(row.max()), row.contiguous()
        return float(row[0]), None


# ---- the preferred sets -----------------------------------------------------------------------


def resident_sets(history: torch.Tensor, slots: int, num_experts: int) -> torch.Tensor:
    """The experts an LRU cache of `slots` slots holds after replaying each sequence's requests
    from an empty cache, as the cache simulator replays them.

    The simulator's access model stamps a request's keys in column order and, with C >= K, keeps
    exactly the C most recently stamped distinct keys. So the resident set is read off the
    simulator's own stack-distance kernel run on the reversed stream: a key's first use in the
    reversed stream (distance 0) is its last use, and the number of first uses before it is how
    many distinct keys were used more recently.

    Args:
        history: int [B, t, K] expert ids of t requests per sequence (t may be 0).
        slots: C >= K.
        num_experts: E.

    Returns:
        bool [B, E].
    """
    from remoe_engine import sim

    B, t, K = history.shape
    out = torch.zeros(B, num_experts, dtype=torch.bool)
    if t == 0:
        return out
    flat = history.reshape(B, t * K).flip(1)  # newest stamp first
    reversed_requests = flat.reshape(B, t, K).to(torch.int32).contiguous()
    first = sim.lru_stack_distances(reversed_requests).reshape(B, t * K) == 0  # last uses
    newer = torch.cumsum(first.to(torch.int64), dim=1) - first.to(torch.int64)
    keep = first & (newer < slots)
    rows = torch.arange(B).unsqueeze(1).expand_as(flat)
    out[rows[keep], flat[keep].long()] = True
    return out


# ---- the biased routing of a forward ----------------------------------------------------------


def _selection_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    return logits  # softmax_over_topk: top-k on the logits


class BiasedRouting:
    """Forward hooks that route every MoE layer of a model with the learned bias, as inference
    does, and keep what the loss needs.

    Use as a context manager around forwards; set `shape` to (B, S) of the input first (the
    routers see flattened tokens). After a forward, `layers` holds per MoE layer
    (logits [B, S, E], prefer bool [B, S, E], ids [B, S, K]).

    Args:
        model: a transformers MoE causal LM (plain, not patched).
        strengths: [L, 1] or [L, E] tensor (a parameter while training).
        source: "previous" or "resident".
        slots: pool slots per layer for "resident".
        tau: soft top-k temperature for the straight-through weights (None: no gradient path,
            the weights are the op's).
    """

    def __init__(self, model: nn.Module, strengths: torch.Tensor, source: str, slots: int,
                 tau: float | None = None):
        from remoe_engine.families import find_moe_blocks, learn_routing

        self.blocks = find_moe_blocks(model)
        spec = learn_routing(model).spec
        if spec is None:
            raise ValueError(f"{type(model).__name__}: route_topk cannot reproduce this "
                             "router, so it cannot take a reuse bias")
        LearnedBias(source, strengths.detach().clamp_min(0), slots).check_model(
            len(self.blocks), int(self.blocks[0].experts.num_experts))
        if source == "resident" and slots < spec.top_k:
            raise ValueError(f"slots {slots} < top_k {spec.top_k}")
        self.spec, self.strengths, self.source, self.slots, self.tau = (
            spec, strengths, source, slots, tau)
        self.shape: tuple[int, int] | None = None
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> BiasedRouting:
        for i, block in enumerate(self.blocks):
            self._handles.append(block.router.register_forward_hook(
                lambda module, args, output, i=i, block=block: self._route(
                    i, block, module, args, output)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _route(self, index: int, block, router: nn.Module, args: tuple, output):
        from remoe_engine.families import router_outputs
        from remoe_engine.router import route_preferring

        logits, _, _ = router_outputs(output)  # [T, E]
        T, E = logits.shape
        B, S = self.shape if self.shape is not None and self.shape[0] * self.shape[1] == T \
            else (1, T)
        K = self.spec.top_k
        op_kwargs = self.spec.op_kwargs(router, block.router_extra_args())
        row = self.strengths[index]  # [1] or [E]
        scalar = float(row.detach().max()) if row.numel() == 1 else 0.0
        vector = None if row.numel() == 1 else row.detach().float().contiguous()
        lg = logits.detach().reshape(B, S, E)
        ids = torch.empty(B, S, K, dtype=torch.int64, device=lg.device)
        weights = torch.empty(B, S, K, dtype=torch.float32, device=lg.device)
        prefer = torch.zeros(B, S, E, dtype=torch.bool, device=lg.device)
        for s in range(S):
            if s > 0:
                if self.source == "previous":
                    prefer[:, s].scatter_(1, ids[:, s - 1], True)
                else:
                    prefer[:, s] = resident_sets(ids[:, :s].cpu(), self.slots, E).to(lg.device)
            w, i = route_preferring(lg[:, s], K, prefer[:, s], scalar, vector, **dict(op_kwargs))
            weights[:, s], ids[:, s] = w.float(), i
        if self.tau is not None:
            weights = self._straight_through(lg, prefer, ids, weights, row, op_kwargs)
        self.layers.append((logits.reshape(B, S, E), prefer, ids))
        return _replace_choice(output, weights.reshape(T, K), ids.reshape(T, K))

    def _straight_through(self, lg: torch.Tensor, prefer: torch.Tensor, ids: torch.Tensor,
                          weights: torch.Tensor, row: torch.Tensor, op_kwargs: dict):
        """The hard weights, carrying the gradient of a soft top-k of the biased scores."""
        sel = _selection_scores(lg.float(), self.spec.scoring)
        if op_kwargs.get("correction_bias") is not None:
            sel = sel + op_kwargs["correction_bias"]
        sel = sel + row.float() * prefer.float()  # [B, S, E], the gradient path to the strengths
        K = ids.shape[-1]
        top = sel.topk(min(K + 1, sel.shape[-1]), dim=-1).values
        threshold = (top[..., K - 1] + top[..., min(K, top.shape[-1] - 1)]) / 2
        gate = torch.sigmoid((sel - threshold.unsqueeze(-1)) / self.tau).gather(-1, ids)
        return weights * (gate / gate.detach())


def _replace_choice(output, weights: torch.Tensor, ids: torch.Tensor):
    """The router's output with its weights and ids replaced (same places, shapes, dtypes)."""
    items = list(output)
    i_at = next(j for j, t in enumerate(items) if isinstance(t, torch.Tensor)
                and not t.is_floating_point())
    w_at = next(j for j, t in enumerate(items) if isinstance(t, torch.Tensor)
                and t.is_floating_point() and t.shape == items[i_at].shape)
    items[w_at] = weights.to(items[w_at].dtype).reshape(items[w_at].shape)
    items[i_at] = ids.to(items[i_at].dtype).reshape(items[i_at].shape)
    return type(output)(items) if isinstance(output, tuple) else items


def bias_terms(logits: torch.Tensor, prefer: torch.Tensor, strengths: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """The reuse and trust terms of one MoE layer, on the biased selection distribution.

    Args:
        logits: router logits [B, S, E] (the router's own, unbiased).
        prefer: bool [B, S, E], each token's preferred experts.
        strengths: this layer's strengths, [1] or [E] (the parameter: gradients flow).

    Returns:
        {"reuse": -log(mean_t m_t + 1e-8), "trust": mean_t KL(Q_t || P_t), "mass": mean m_t}
        over the tokens that have a preferred set.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 in tests)
    logp = torch.log_softmax(logits.detach().to(dtype), dim=-1)
    pref = prefer.to(dtype)
    num = logp.exp() + strengths.to(dtype) * pref
    q = num / num.sum(-1, keepdim=True)
    has = prefer.any(-1)  # [B, S]
    if not bool(has.any()):
        zero = (strengths.sum() * 0).float()
        return {"reuse": zero, "trust": zero, "mass": zero.detach()}
    mass = (q * pref).sum(-1)[has]
    kl = (q * (q.clamp_min(1e-30).log() - logp)).sum(-1)[has]
    return {"reuse": -torch.log(mass.mean() + EPS), "trust": kl.mean(),
            "mass": mass.mean().detach()}


# ---- training ---------------------------------------------------------------------------------


def _load(model_path: str | os.PathLike, router_delta: str | os.PathLike | None):
    from transformers import AutoModelForCausalLM

    p = pathlib.Path(model_path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{str(p)!r} is not a Hugging Face checkpoint folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(os.fspath(p), dtype=torch.float32)
    model.eval()
    model.config.output_router_logits = False
    if router_delta is not None:
        from remoe_engine.finetune.delta import apply_router_delta

        apply_router_delta(model, router_delta, weights_only=True)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def train_reuse_bias(model_path: str | os.PathLike, out: str | os.PathLike,
                     train_stream: torch.Tensor, cfg: ReuseBiasConfig, *,
                     router_delta: str | os.PathLike | None = None, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Train the reuse-bias strengths of a checkpoint's routers (router weights frozen).

    Args:
        model_path: the Hugging Face checkpoint folder (left untouched).
        out: output folder: `router-delta.safetensors` (the router weights as they were, plus
            the strengths) and `remoe-finetune.json` (config, history).
        train_stream: int64 [N] training tokens.
        cfg: the run.
        router_delta: a router delta to apply first (e.g. ReMoE router weights); its weights
            are what the output delta holds.
        progress: a tqdm bar.
        log: one line of text.

    Returns:
        The summary also written to `remoe-finetune.json`.
    """
    from tqdm.auto import tqdm

    from remoe_engine.finetune import delta as delta_mod
    from remoe_engine.finetune.data import sample_windows
    from remoe_engine.trace import router_hash

    cfg.validate()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = _load(model_path, router_delta)
    base_hash = router_hash(model)
    from remoe_engine.families import find_moe_blocks

    blocks = find_moe_blocks(model)
    layers, experts = len(blocks), int(blocks[0].experts.num_experts)
    strengths = nn.Parameter(torch.full((layers, experts if cfg.per_expert else 1), cfg.init))
    optimizer = torch.optim.AdamW([strengths], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="remoe finetune (reuse bias)", disable=not progress,
               dynamic_ncols=True)
    spsa = cfg.ce_gradient == "spsa"
    with BiasedRouting(model, strengths, cfg.source, cfg.slots,
                       tau=None if spsa else cfg.tau) as routing:
        for step in range(1, cfg.steps + 1):
            gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4099)
            batch = sample_windows(train_stream, cfg.batch, cfg.seq_len, gen)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss, logged = bias_loss(model, routing, batch, strengths, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spsa:
                ce_grad = spsa_ce_gradient(model, routing, batch, strengths, cfg.spsa_c, gen)
                strengths.grad = ce_grad if strengths.grad is None else strengths.grad + ce_grad
            logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_([strengths],
                                                                       cfg.grad_clip))
            optimizer.step()
            with torch.no_grad():
                strengths.clamp_(min=0.0)  # a negative strength would push away from reuse
            logged.update(step=step, lr=cfg.lr_at(step),
                          strengths=[round(float(v), 6) for v in strengths.detach().mean(1)])
            history.append(logged)
            bar.update(1)
            bar.set_postfix(ce=f"{logged['ce']:.3f}", mass=f"{logged['mass']:.3f}",
                            s=",".join(f"{v:.3f}" for v in logged["strengths"]))
    bar.close()
    learned = LearnedBias(cfg.source, strengths.detach().clone(),
                          cfg.slots if cfg.source == "resident" else None)
    delta_file = delta_mod.save_router_delta(
        model, out / delta_mod.DELTA_NAME, base_router_hash=base_hash,
        extra={"reuse_bias_config": cfg.to_dict()}, reuse_bias=learned)
    summary = {"config": cfg.to_dict(), "base": os.fspath(model_path),
               "router_delta": None if router_delta is None else os.fspath(router_delta),
               "train_wall_s": round(time.perf_counter() - t0, 1),
               "strengths": learned.strengths.tolist(), "history": history,
               "delta": os.fspath(delta_file)}
    tmp = out / "remoe-finetune.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "remoe-finetune.json")
    log("learned strengths per layer: "
        + ", ".join(f"{v:.4f}" for v in learned.strengths.mean(1).tolist()))
    return summary


@torch.no_grad()
def spsa_ce_gradient(model: nn.Module, routing: BiasedRouting, input_ids: torch.Tensor,
                     strengths: torch.Tensor, c: float, generator: torch.Generator
                     ) -> torch.Tensor:
    """A simultaneous-perturbation estimate of d CE / d strengths on this batch:
    (CE(s + c d) - CE(s - c d)) / (2 c) * d, d random signs (both sides clamped at 0, as the
    strengths are). Two forwards without gradients, with the hard biased selection."""
    signs = torch.randint(0, 2, strengths.shape, generator=generator).float() * 2 - 1
    kept, tau = routing.strengths, routing.tau
    ce = []
    try:
        routing.tau = None
        for sign in (1.0, -1.0):
            routing.strengths = (strengths.detach() + sign * c * signs).clamp_min(0.0)
            routing.shape, routing.layers = tuple(input_ids.shape), []
            logits = model(input_ids=input_ids, use_cache=False).logits
            ce.append(float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                            input_ids[:, 1:].reshape(-1))))
    finally:
        routing.strengths, routing.tau = kept, tau
        routing.layers = []
    return (ce[0] - ce[1]) / (2 * c) * signs


def bias_loss(model: nn.Module, routing: BiasedRouting, input_ids: torch.Tensor,
              strengths: torch.Tensor, cfg: ReuseBiasConfig
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """One teacher-forced forward with the biased routing and its loss (see the module doc)."""
    routing.shape = tuple(input_ids.shape)
    routing.layers = []
    logits = model(input_ids=input_ids, use_cache=False, output_router_logits=False).logits
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                         input_ids[:, 1:].reshape(-1))
    terms = [bias_terms(lg, pref, strengths[i]) for i, (lg, pref, _) in
             enumerate(routing.layers)]
    reuse = torch.stack([t["reuse"] for t in terms]).mean()
    trust = torch.stack([t["trust"] for t in terms]).mean()
    loss = ce + cfg.lambda_kl * trust + cfg.lambda_reuse * reuse
    logged = {"loss": float(loss.detach()), "ce": float(ce.detach()),
              "reuse": float(reuse.detach()), "trust": float(trust.detach()),
              "mass": float(torch.stack([t["mass"] for t in terms]).mean())}
    return loss, logged
