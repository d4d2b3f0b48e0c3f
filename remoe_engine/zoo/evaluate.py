"""Routing statistics of a built-in model for its card: the held-out routing at a glance.

The held-out stream is the held-out files, sorted by name, each tokenized and followed by the
end-of-text token, concatenated, and cut into windows (`remoe_engine.evaluation.windows`).
Perplexity and routing come from the project's one evaluation pass
(`remoe_engine.evaluation.teacher_forced_trace`): the router's own choices, as the family routes.
EOR and distinct experts per block are `remoe_engine.metrics`' definitions; the usage share of an
expert is the fraction of its layer's top-K selections that go to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from remoe_engine import metrics
from remoe_engine.evaluation import teacher_forced_trace

# Shape legend: W = windows, S = seq_len, N = tokens, E = experts, K = top-k, L = MoE layers.


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


def evaluate(
    model: torch.nn.Module, wins: torch.Tensor, block: int = 16, batch_size: int = 16
) -> tuple[dict, RoutingStats]:
    """Perplexity and routing statistics in one pass over held-out windows.

    Args:
        model: a transformers MoE causal LM.
        wins: int64 [W, S] token windows; S must be a multiple of `block`.
        block: tokens per block for the distinct-experts statistic.
        batch_size: windows per forward pass (does not change the result beyond float rounding).

    Returns:
        (the dict `remoe_engine.evaluation.perplexity` returns, RoutingStats).

    Raises:
        ValueError: if S is not a multiple of `block`.
    """
    num_windows, seq_len = wins.shape
    if seq_len % block:
        raise ValueError(f"window length {seq_len} is not a multiple of block {block}")
    ppl, routing = teacher_forced_trace(model, wins, batch_size=batch_size)
    reuse = metrics.expert_reuse(routing)
    distinct = metrics.distinct_experts(routing, block)
    L, E = routing.num_layers, routing.num_experts
    counts = torch.stack([torch.bincount(routing.ids[layer].reshape(-1).long(), minlength=E)
                          for layer in range(L)])  # [L, E]
    shares = counts.double() / counts.sum(dim=1, keepdim=True)  # [L, E]
    unused = [[int(layer), int(e)] for layer, e in (counts == 0).nonzero().tolist()]
    return ppl, RoutingStats(
        eor=reuse.eor,
        eor_per_layer=reuse.eor_per_layer,
        eor_random=reuse.eor_random,
        distinct_block=block,
        distinct_mean=distinct.mean,
        distinct_per_layer=distinct.per_layer,
        distinct_random=distinct.random,
        share_min=float(shares.min()),
        share_max=float(shares.max()),
        share_max_per_layer=shares.max(dim=1).values.tolist(),
        unused_experts=unused,
        tokens=num_windows * seq_len,
        experts=E,
        top_k=routing.top_k,
        layers=L,
    )
