"""Pure-PyTorch references for every op in remoe_engine._C.

These are the golden functions the kernels are tested against: written for clarity, not speed,
and with exactly the semantics stated in csrc/ops.cpp (ranking: larger first, NaN below every
number, ties to the lower expert id).

Legend: T = tokens, E = experts, K = top-k, G = groups.
"""

from __future__ import annotations

import torch

SCORINGS = ("softmax", "sigmoid", "softmax_over_topk")
GROUP_SCORES = ("max", "top2_sum")


def rank_order(values: torch.Tensor) -> torch.Tensor:
    """Column indices of each row of `values` [N, M] in ranking order.

    Larger first, NaN after every number (-inf included), ties to the lower index.
    Two stable sorts: the last sort's key is the primary one.
    """
    nan = torch.isnan(values)
    by_value = torch.sort(values.masked_fill(nan, float("-inf")), dim=-1, descending=True,
                          stable=True).indices
    nan_in_value_order = nan.gather(-1, by_value).to(torch.uint8)
    nan_last = torch.sort(nan_in_value_order, dim=-1, stable=True).indices
    return by_value.gather(-1, nan_last)


def scores_fp32(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Unbiased fp32 scores [T, E] from router logits [T, E]."""
    x = logits.float()
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    if scoring == "softmax_over_topk":
        return x
    raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def route_topk(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    prefer: torch.Tensor | None = None,
    reuse_bias: float = 0.0,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    routed_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference router top-k; see `remoe_engine.ops.route_topk` for the contract.

    Returns:
        (weights [T, K] float32, ids [T, K] int64), ids in ranking order of the selection score.
    """
    T, E = logits.shape
    score = scores_fp32(logits, scoring)  # [T, E]
    select = score.clone()
    if correction_bias is not None:
        select = select + correction_bias.float()
    if prefer is not None:
        select = select + reuse_bias * prefer.to(torch.float32).expand(T, E)

    candidates = torch.ones(T, E, dtype=torch.bool, device=logits.device)
    if n_group > 1:
        group_size = E // n_group
        grouped = select.view(T, n_group, group_size).reshape(T * n_group, group_size)
        best = grouped.gather(-1, rank_order(grouped)[:, : min(2, group_size)])  # best first
        group_scores = best[:, 0] if group_score == "max" else best[:, 0] + best[:, 1]
        group_scores = group_scores.view(T, n_group)
        kept_groups = rank_order(group_scores)[:, :topk_group]  # [T, topk_group]
        kept = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        kept.scatter_(1, kept_groups, True)
        candidates = kept.repeat_interleave(group_size, dim=1)

    # Non-candidates go after every candidate: rank candidates first, then keep the order.
    order = rank_order(select)  # [T, E]
    is_candidate = candidates.gather(-1, order)
    candidates_first = torch.sort((~is_candidate).to(torch.uint8), dim=-1, stable=True).indices
    ids = order.gather(-1, candidates_first)[:, :top_k]  # [T, K]

    if scoring == "softmax_over_topk":
        weights = torch.softmax(score.gather(-1, ids), dim=-1)
    else:
        weights = score.gather(-1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * routed_scaling
    return weights.float(), ids.long()


def _activation(x: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / 2**0.5))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    if name == "relu":
        return x.clamp(min=0)
    if name == "relu2":
        return x.clamp(min=0) ** 2
    if name == "swish_alpha":
        return x * torch.sigmoid(alpha * x)
    raise ValueError(f"unknown activation {name!r}")


def expert_gate(h: torch.Tensor, gate) -> torch.Tensor:
    """The gate of `ops.ExpertsGate` on up-projection outputs h [n, N] -> [n, I]."""
    if gate.layout == "none":
        return _activation(h, gate.activation, gate.alpha)
    if gate.layout == "chunk":
        g, u = h.chunk(2, dim=-1)
    else:
        g, u = h[..., ::2], h[..., 1::2]
    if gate.clamp == "input":
        g = g.clamp(max=gate.limit)
    a = _activation(g, gate.activation, gate.alpha)
    if gate.clamp == "output":
        a = a.clamp(max=gate.limit)
    if gate.clamp != "none":
        u = u.clamp(-gate.limit, gate.limit)
    return a * (u + gate.up_offset)


def moe_experts(hidden: torch.Tensor, slots: torch.Tensor, route_weights: torch.Tensor,
                up: torch.Tensor, down: torch.Tensor, *, gate, up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
    """`ops.moe_experts`, one (token, k) pair at a time, in float64. Returns float32 [T, H]."""
    T, K = slots.shape
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(T):
        x = hidden[t].double()
        for k in range(K):
            s = int(slots[t, k])
            if s < 0:
                continue
            w_up, w_down = up[s].double(), down[s].double()
            h = x @ w_up if transposed else w_up @ x
            if up_bias is not None:
                h = h + up_bias[s].double()
            a = expert_gate(h[None], gate)[0]
            y = a @ w_down if transposed else w_down @ a
            if down_bias is not None:
                y = y + down_bias[s].double()
            out[t] += float(route_weights[t, k]) * y
    return out.float()
