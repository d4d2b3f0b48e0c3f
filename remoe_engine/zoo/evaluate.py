"""Evaluation of a built-in model: held-out perplexity and routing statistics.

Definitions (the model card states the same):

- The held-out stream is the held-out files, sorted by name, each tokenized and followed by the
  end-of-text token, concatenated. It is cut into consecutive non-overlapping windows of
  `seq_len` tokens (a trailing partial window is dropped); each window is an independent sequence.
- Perplexity is `exp(mean NLL)` over every predicted token: positions 2..seq_len of each window,
  i.e. `seq_len - 1` predictions per window, each conditioned on its window's earlier tokens only.
- Routing is read per window (batch size 1 semantics: consecutive tokens of one sequence; windows
  may share a forward batch because a token's routing does not depend on its batch mates).
  `E_t` is the router's top-K expert set at token t (top-K of the softmax, as the router does).
  EOR: `IR_t = |E_t ∩ E_{t-1}| / K` for t = 2..seq_len, averaged over windows and tokens per
  layer, then over MoE layers. Distinct experts: the number of different experts a layer uses over
  each block of `block` consecutive tokens (non-overlapping, inside a window), averaged.
  Usage share: the fraction of a layer's top-K selections that go to each expert.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# Shape legend: W = windows, S = seq_len, T = tokens, E = experts, K = top-k, L = MoE layers.


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows.

    Args:
        ids: token stream, shape [N], integer dtype.
        seq_len: window length.
        max_tokens: if given, only the first `max_tokens` tokens are used.

    Returns:
        int64 tensor [W, seq_len], W = floor(min(N, max_tokens) / seq_len).

    Raises:
        ValueError: if the stream is shorter than one window.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {ids.numel()}")
    return ids[: count * seq_len].reshape(count, seq_len).long()


@torch.no_grad()
def perplexity(model: torch.nn.Module, wins: torch.Tensor, batch_size: int = 16) -> dict:
    """Perplexity of a causal LM over independent windows.

    Args:
        model: a transformers causal LM (set to eval mode here).
        wins: int64 [W, S] token windows (see `windows`).
        batch_size: windows per forward pass (does not change the result beyond float rounding).

    Returns:
        {"perplexity", "nll" (mean, nats), "predicted_tokens", "windows", "seq_len"}.
    """
    model.eval()
    total = 0.0
    count = 0
    for start in range(0, wins.shape[0], batch_size):
        batch = wins[start : start + batch_size]  # [B, S]
        logits = model(input_ids=batch, use_cache=False).logits.float()  # [B, S, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        # float64 accumulation keeps the mean independent of the batch split order.
        total += float(nll.double())
        count += batch[:, 1:].numel()
    mean = total / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "predicted_tokens": count,
        "windows": int(wins.shape[0]),
        "seq_len": int(wins.shape[1]),
    }


@dataclass
class RoutingStats:
    """Routing statistics of a model on held-out windows (definitions in the module docstring).

    Args:
        eor: mean expert overlap between consecutive tokens, over layers.
        eor_per_layer: EOR of each MoE layer.
        eor_random: K / E, the EOR of routing that ignores the previous token.
        distinct_block: block length in tokens for the distinct-experts statistic.
        distinct_mean: mean distinct experts per layer per block, over layers.
        distinct_per_layer: the same per layer.
        distinct_random: expected distinct experts per block for uniformly random top-K sets.
        share_min / share_max: smallest / largest expert usage share over all (layer, expert).
        share_max_per_layer: largest usage share in each layer.
        unused_experts: (layer, expert) pairs never selected.
        tokens: routed tokens per layer.
        experts / top_k / layers: the model's E, K and number of MoE layers.
    """

    eor: float
    eor_per_layer: list[float]
    eor_random: float
    distinct_block: int
    distinct_mean: float
    distinct_per_layer: list[float]
    distinct_random: float
    share_min: float
    share_max: float
    share_max_per_layer: list[float]
    unused_experts: list[list[int]]
    tokens: int
    experts: int
    top_k: int
    layers: int

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)


def routing_stats(
    model: torch.nn.Module, wins: torch.Tensor, block: int = 16, batch_size: int = 16
) -> RoutingStats:
    """Expert overlap, distinct experts per block and usage shares on held-out windows.

    Args:
        model: a transformers MoE causal LM (see `evaluate`).
        wins: int64 [W, S] token windows; S must be a multiple of `block`.
        block: tokens per block for the distinct-experts statistic.
        batch_size: windows per forward pass.

    Returns:
        RoutingStats.
    """
    return evaluate(model, wins, block, batch_size)[1]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, wins: torch.Tensor, block: int = 16, batch_size: int = 16
) -> tuple[dict, RoutingStats]:
    """Perplexity and routing statistics in one pass over held-out windows.

    Args:
        model: a transformers MoE causal LM whose forward accepts `output_router_logits=True`
            and returns `router_logits`, one [B*S, E] tensor per MoE layer.
        wins: int64 [W, S] token windows; S must be a multiple of `block`.
        block: tokens per block for the distinct-experts statistic.
        batch_size: windows per forward pass (does not change the result beyond float rounding).

    Returns:
        (the dict `perplexity` returns, RoutingStats).

    Raises:
        ValueError: if S is not a multiple of `block`.
    """
    num_windows, seq_len = wins.shape
    if seq_len % block:
        raise ValueError(f"window length {seq_len} is not a multiple of block {block}")
    model.eval()
    top_k = int(model.config.num_experts_per_tok)
    nll_sum = 0.0
    overlap_sum: torch.Tensor | None = None  # [L] float64
    distinct_sum: torch.Tensor | None = None  # [L] float64
    counts: torch.Tensor | None = None  # [L, E] int64
    for start in range(0, num_windows, batch_size):
        batch = wins[start : start + batch_size]  # [B, S]
        out = model(input_ids=batch, use_cache=False, output_router_logits=True)
        logits_lm = out.logits.float()  # [B, S, V]
        nll_sum += float(torch.nn.functional.cross_entropy(
            logits_lm[:, :-1].reshape(-1, logits_lm.shape[-1]), batch[:, 1:].reshape(-1),
            reduction="sum").double())
        logits = torch.stack([r.float() for r in out.router_logits])  # [L, B*S, E]
        num_layers, _, num_experts = logits.shape
        ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1).indices  # [L, B*S, K]
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
        chosen = chosen.view(num_layers, batch.shape[0], seq_len, num_experts)  # [L, B, S, E]
        overlap = (chosen[:, :, 1:] & chosen[:, :, :-1]).sum(-1)  # [L, B, S-1]
        blocks = chosen.view(num_layers, batch.shape[0], seq_len // block, block, num_experts)
        distinct = blocks.any(dim=3).sum(-1)  # [L, B, S/block]
        used = chosen.sum(dim=(1, 2))  # [L, E]
        if counts is None:
            overlap_sum = torch.zeros(num_layers, dtype=torch.float64)
            distinct_sum = torch.zeros(num_layers, dtype=torch.float64)
            counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        overlap_sum += overlap.double().sum(dim=(1, 2))
        distinct_sum += distinct.double().sum(dim=(1, 2))
        counts += used
    assert overlap_sum is not None and distinct_sum is not None and counts is not None
    num_layers, num_experts = counts.shape
    eor_per_layer = (overlap_sum / (top_k * num_windows * (seq_len - 1))).tolist()
    distinct_per_layer = (distinct_sum / (num_windows * (seq_len // block))).tolist()
    shares = counts.double() / counts.sum(dim=1, keepdim=True)  # [L, E]
    unused = [[int(l), int(e)] for l, e in (counts == 0).nonzero().tolist()]
    # Expected distinct experts in `block` independent uniform top-K draws: E * P(expert drawn).
    distinct_random = num_experts * (1.0 - (1.0 - top_k / num_experts) ** block)
    predicted = num_windows * (seq_len - 1)
    ppl = {
        "perplexity": math.exp(nll_sum / predicted),
        "nll": nll_sum / predicted,
        "predicted_tokens": predicted,
        "windows": int(num_windows),
        "seq_len": int(seq_len),
    }
    return ppl, RoutingStats(
        eor=sum(eor_per_layer) / num_layers,
        eor_per_layer=eor_per_layer,
        eor_random=top_k / num_experts,
        distinct_block=block,
        distinct_mean=sum(distinct_per_layer) / num_layers,
        distinct_per_layer=distinct_per_layer,
        distinct_random=distinct_random,
        share_min=float(shares.min()),
        share_max=float(shares.max()),
        share_max_per_layer=shares.max(dim=1).values.tolist(),
        unused_experts=unused,
        tokens=num_windows * seq_len,
        experts=num_experts,
        top_k=top_k,
        layers=num_layers,
    )
