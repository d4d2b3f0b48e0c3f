"""Evaluation of routers for expert reuse: teacher-forced and token by token as at decode.

Two measurements, both on held-out windows (independent sequences of `seq_len` tokens):

- `teacher_forced`: one forward per batch of windows (the router sees exactly what it sees at
  decode without a bias, because routing without a bias has no feedback). Perplexity (the zoo's
  definition, `remoe_engine.zoo.evaluate.perplexity`), EOR per layer and mean, reuse at lags,
  distinct experts per 16 tokens, LRU/LFU/OPT hit rates at several cache sizes per layer
  (`remoe_engine.sim`), and top-k agreement and KL to a reference router's trace
  (`remoe_engine.metrics.router_agreement`: the two models routed the same tokens, each with its
  own upstream hidden states).
- `decode_loop`: the model patched with `remoe_engine.patch` (slot pool, optional reuse bias),
  each window decoded token by token with the KV cache, teacher-forced (the next input is the
  held-out token, not a sample), so a bias feeds back through the layers as at decode. Perplexity
  is the mean NLL of the same predictions as `teacher_forced`; top-k agreement and KL compare the
  routing with the ORIGINAL router applied to the same hidden states (a frozen copy), which is
  what a user trades; the pool's own LRU hit rate is reported next to the simulator's.

Legend: W = windows, S = seq_len, N = tokens, L = MoE layers, E = experts, K = top-k.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine import metrics, sim
from remoe_engine import trace as trace_mod
from remoe_engine.families import find_moe_blocks, routing_spec

POLICIES = ("lru", "lfu", "opt")
LAGS = [1, 2, 4, 8, 16]


def default_slots(top_k: int, num_experts: int) -> list[int]:
    """Cache sizes per layer evaluated by default: K, 2K, 4K, ... below E, and E/2."""
    slots = []
    s = top_k
    while s < num_experts:
        slots.append(s)
        s *= 2
    return sorted(set(slots + [max(top_k, num_experts // 2)]))


def _hit_table(results: Sequence[sim.SimResult]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for r in results:
        table.setdefault(r.policy, {})[str(r.slots)] = r.hit_rate
    return table


def routing_report(tr: trace_mod.RoutingTrace, slots: Sequence[int],
                   reference: trace_mod.RoutingTrace | None = None) -> dict:
    """Reuse metrics, cache hit rates and agreement of one trace.

    Args:
        tr: routing trace (probabilities needed for KL).
        slots: cache sizes per layer (each >= K).
        reference: the original router's trace of the same tokens, or None.

    Returns:
        JSON-ready dict: eor, eor_per_layer, eor_random, reuse_at_lags, distinct16,
        hit_rates {policy: {slots: rate}}, topk_agreement, kl (None without a reference).
    """
    reuse = metrics.expert_reuse(tr)
    lags = metrics.reuse_at_lags(tr, [d for d in LAGS])
    distinct = metrics.distinct_experts(tr, 16)
    report = {
        "eor": reuse.eor, "eor_per_layer": reuse.eor_per_layer, "eor_random": reuse.eor_random,
        "reuse_at_lags": dict(zip(map(str, lags.lags), lags.mean, strict=True)),
        "distinct16": distinct.mean,
        "hit_rates": _hit_table(sim.sweep(tr, POLICIES, slots)),
        "topk_agreement": None, "kl": None,
    }
    if reference is not None:
        agree = metrics.router_agreement(reference, tr)
        report["topk_agreement"] = agree.topk_agreement
        report["kl"] = agree.kl
    return report


@torch.no_grad()
def record_windows(model: nn.Module, wins: torch.Tensor, batch_size: int = 16,
                   probs: bool = True) -> trace_mod.RoutingTrace:
    """Routing trace of a teacher-forced forward over windows (one sequence per window).

    Args:
        model: a transformers MoE causal LM.
        wins: int64 [W, S].
        batch_size: windows per forward.
        probs: keep the router probabilities (for KL).

    Returns:
        RoutingTrace with W sequences of S tokens.
    """
    model.eval()
    parts = [trace_mod.record(model, wins[i : i + batch_size], probs=probs, source="held-out")
             for i in range(0, wins.shape[0], batch_size)]
    return trace_mod.concatenate(parts)


def teacher_forced(model: nn.Module, wins: torch.Tensor, *, slots: Sequence[int] | None = None,
                   reference: trace_mod.RoutingTrace | None = None,
                   batch_size: int = 16) -> tuple[dict, trace_mod.RoutingTrace]:
    """Perplexity and routing report of a model on held-out windows, teacher-forced.

    Args:
        model: a transformers MoE causal LM.
        wins: int64 [W, S] held-out windows.
        slots: cache sizes per layer (default `default_slots`).
        reference: the original model's trace on the same windows (agreement, KL), or None.
        batch_size: windows per forward.

    Returns:
        (report dict with "perplexity", "nll", "tokens" and `routing_report`'s keys, the trace).
    """
    from remoe_engine.zoo.evaluate import perplexity

    ppl = perplexity(model, wins, batch_size=batch_size)
    tr = record_windows(model, wins, batch_size)
    if slots is None:
        slots = default_slots(tr.top_k, tr.num_experts)
    report = {"mode": "teacher-forced", "perplexity": ppl["perplexity"], "nll": ppl["nll"],
              "tokens": int(wins.numel()), "windows": int(wins.shape[0]),
              "seq_len": int(wins.shape[1])}
    report.update(routing_report(tr, slots, reference))
    return report, tr


class _DecodeTap:
    """Router hooks for the decode loop: chosen ids, P, and the original router's ids and P."""

    def __init__(self, model: nn.Module, original: list[tuple[torch.Tensor, torch.Tensor | None]]):
        self.blocks = find_moe_blocks(model)
        self.spec = routing_spec(model)
        self.original = original
        self.ids: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.orig_ids: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.kl_sum = [0.0 for _ in self.blocks]
        self.count = 0
        self.handles = [b.router.register_forward_hook(self._hook(i))
                        for i, b in enumerate(self.blocks)]

    def _hook(self, layer: int):
        def hook(module, args, output):
            from remoe_engine.ops import route_topk

            logits, ids = output[0].float(), output[2]  # [T, E], [T, K]
            hidden = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, H]
            weight, bias = self.original[layer]
            orig_logits = F.linear(hidden, weight, bias)  # [T, E]
            _, orig_ids = route_topk(orig_logits, self.spec.top_k,
                                     **self.spec.op_kwargs(module))
            self.ids[layer].append(ids.detach().cpu().to(torch.int32))
            self.orig_ids[layer].append(orig_ids.cpu().to(torch.int32))
            logp = torch.log_softmax(logits, -1)
            logq = torch.log_softmax(orig_logits, -1)
            self.kl_sum[layer] += float((logp.exp() * (logp - logq)).sum())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def decode_loop(model: nn.Module, wins: torch.Tensor, original: list[tuple[torch.Tensor,
                torch.Tensor | None]], *, reuse_bias: float = 0.0, bias_source: str = "previous",
                slots_per_layer: int | None = None, slots: Sequence[int] | None = None,
                progress: bool = True, label: str = "") -> dict:
    """Decode each window token by token with the KV cache (teacher-forced) under `patch()`.

    Args:
        model: a transformers MoE causal LM (patched for the loop, unpatched after).
        wins: int64 [W, S] held-out windows; every token is fed, the NLL of tokens 2..S counted.
        original: per MoE layer the original router's fp32 (weight [E, H], bias [E] or None),
            for top-k agreement and KL on the same hidden states (see `original_routers`).
        reuse_bias: the inference-time reuse bias (0: exact routing).
        bias_source: "previous" or "resident".
        slots_per_layer: pool size per layer (default 2K); also what "resident" prefers.
        slots: cache sizes for the simulator (default `default_slots`).
        progress: tqdm bar over windows.
        label: progress bar text.

    Returns:
        JSON-ready dict: perplexity, nll, tokens, pool_lru_hit_rate (the pool's own counters),
        top-k agreement and KL to the original router, and `routing_report` of the loop's trace.
    """
    from tqdm.auto import tqdm

    import remoe_engine

    model.eval()
    blocks = find_moe_blocks(model)
    top_k = routing_spec(model).top_k
    num_experts = int(blocks[0].experts.num_experts)
    if slots_per_layer is None:
        slots_per_layer = 2 * top_k
    handle = remoe_engine.patch(model, slots_per_layer=slots_per_layer, reuse_bias=reuse_bias,
                                bias_source=bias_source)
    tap = _DecodeTap(model, original)
    nll, predicted = 0.0, 0
    threads = torch.get_num_threads()
    # One token at a time the tensors are tiny: intra-op threads only add barrier waits (on a
    # busy 2-core machine a step took 40x longer with 2 threads than with 1).
    torch.set_num_threads(1)
    try:
        for w in tqdm(range(wins.shape[0]), desc=label or "decode", disable=not progress,
                      leave=False):
            seq = wins[w : w + 1]  # [1, S]
            past = None
            for t in range(seq.shape[1]):
                out = model(input_ids=seq[:, t : t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                if t + 1 < seq.shape[1]:
                    logp = torch.log_softmax(out.logits[0, -1].float(), -1)
                    nll -= float(logp[seq[0, t + 1]].double())
                    predicted += 1
        stats = handle.stats()
    finally:
        torch.set_num_threads(threads)
        tap.remove()
        handle.unpatch()
    L = len(blocks)
    ids = torch.stack([torch.cat(c) for c in tap.ids])  # [L, N, K]
    orig = torch.stack([torch.cat(c) for c in tap.orig_ids])  # [L, N, K]
    S = wins.shape[1]
    offsets = torch.arange(0, wins.numel() + 1, S, dtype=torch.int64)
    meta = trace_mod.TraceMeta(top_k=top_k, num_experts=num_experts,
                               layers=[b.layer_idx for b in blocks], mode="generate",
                               source="held-out, decode loop")
    tr = trace_mod.RoutingTrace(ids=ids, offsets=offsets, meta=meta,
                                token_ids=wins.reshape(-1))
    if slots is None:
        slots = default_slots(top_k, num_experts)
    report = {"mode": "decode", "reuse_bias": reuse_bias, "bias_source": bias_source,
              "pool_slots_per_layer": slots_per_layer,
              "perplexity": math.exp(nll / predicted), "nll": nll / predicted,
              "tokens": int(wins.numel()), "windows": int(wins.shape[0]), "seq_len": int(S),
              "pool_lru_hit_rate": stats["hits"] / max(1, stats["hits"] + stats["misses"])}
    report.update(routing_report(tr, slots))
    overlap = (ids.unsqueeze(-1) == orig.unsqueeze(-2)).any(-1).sum(-1)  # [L, N]
    report["topk_agreement"] = float(overlap.double().mean()) / top_k
    report["kl"] = sum(tap.kl_sum) / (L * ids.shape[1])
    return report


def original_routers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """fp32 copies of a model's router weights (and biases), in MoE-layer order."""
    out = []
    for b in find_moe_blocks(model):
        bias = getattr(b.router, "bias", None)
        out.append((b.router.weight.detach().float().clone(),
                    None if bias is None else bias.detach().float().clone()))
    return out


# ---- tables and plots -------------------------------------------------------------------------


def format_table(rows: Sequence[tuple[str, dict]], base: dict, top_k: int) -> str:
    """A plain-text table: ppl (and change), EOR (and change), LRU/LFU/OPT at 2K, agreement, KL.

    Args:
        rows: (label, report) pairs.
        base: the original router's report (the changes are relative to it).
        top_k: K.

    Returns:
        The table, one line per row.
    """
    k2 = str(2 * top_k)
    head = (f"{'router':<34} {'ppl':>8} {'dppl':>7} {'EOR':>6} {'dEOR':>7} "
            f"{'LRU@2K':>7} {'dLRU':>7} {'LFU@2K':>7} {'OPT@2K':>7} {'agree':>6} {'KL':>7}")
    lines = [head, "-" * len(head)]
    b_lru = base["hit_rates"]["lru"].get(k2)
    for label, r in rows:
        lru = r["hit_rates"]["lru"].get(k2)
        agree = "-" if r.get("topk_agreement") is None else f"{r['topk_agreement']:.3f}"
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        d_lru = "-" if lru is None or not b_lru else f"{100 * (lru / b_lru - 1):+.1f}%"
        lines.append(
            f"{label:<34} {r['perplexity']:>8.3f} "
            f"{100 * (r['perplexity'] / base['perplexity'] - 1):>+6.2f}% {r['eor']:>6.3f} "
            f"{100 * (r['eor'] / base['eor'] - 1):>+6.1f}% "
            f"{'-' if lru is None else f'{lru:.3f}':>7} {d_lru:>7} "
            f"{r['hit_rates'].get('lfu', {}).get(k2, float('nan')):>7.3f} "
            f"{r['hit_rates'].get('opt', {}).get(k2, float('nan')):>7.3f} {agree:>6} {kl:>7}")
    return "\n".join(lines)


def plot_report(rows: Sequence[tuple[str, dict]], base: dict, top_k: int,
                path: str | os.PathLike, title: str = "") -> None:
    """EOR and LRU hit rate at 2K slots against perplexity change and top-k agreement.

    Args:
        rows: (label, report) pairs; the first is the original router.
        base: the original router's report.
        top_k: K.
        path: image file.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k2 = str(2 * top_k)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    # Rows named "<router> + bias <b> <source>" form one curve per (router, source), starting at
    # the router's own unbiased row; anything else is a single marker.
    pattern = re.compile(r"^(?P<router>.+?) \+ bias (?P<b>[0-9.eE+-]+) (?P<src>\w+)$")
    points = {label: r for label, r in rows}
    curves: dict[tuple[str, str], list[tuple[float, dict]]] = {}
    singles = []
    for label, r in rows:
        m = pattern.match(label)
        if m:
            curves.setdefault((m["router"], m["src"]), []).append((float(m["b"]), r))
        else:
            singles.append((label, r))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]

    def xy(r: dict) -> tuple[float, float, float, float]:
        agree = r.get("topk_agreement")
        return (100 * (r["perplexity"] / base["perplexity"] - 1), r["eor"],
                1.0 if agree is None else agree, r["hit_rates"]["lru"][k2])

    for i, ((router, src), pts) in enumerate(sorted(curves.items())):
        pts = sorted(pts, key=lambda t: t[0])
        if router in points:
            pts = [(0.0, points[router])] + pts
        vals = [xy(r) for _, r in pts]
        style = dict(color=colors[i % len(colors)], marker="o", ms=4,
                     ls="-" if src == "previous" else "--", label=f"{router} + bias ({src})")
        for ax, (a, b) in zip(axes.flat, [(0, 1), (0, 3), (2, 1), (2, 3)], strict=True):
            ax.plot([v[a] for v in vals], [v[b] for v in vals], **style)
            for (bias, _), v in zip(pts, vals, strict=True):
                if bias:
                    ax.annotate(f"{bias:g}", (v[a], v[b]), fontsize=6, xytext=(3, 2),
                                textcoords="offset points", color=style["color"])
    for j, (label, r) in enumerate(singles):
        v = xy(r)
        for ax, (a, b) in zip(axes.flat, [(0, 1), (0, 3), (2, 1), (2, 3)], strict=True):
            ax.scatter([v[a]], [v[b]], marker="*^sD"[j % 4], s=90, color="black", zorder=4,
                       label=label if ax is axes[0, 0] else None)
    for ax in axes[0]:
        ax.set_xscale("symlog", linthresh=1.0)  # the strongest biases cost 10x more than the rest
    for ax, (x, y) in zip(axes.flat, [("perplexity change (%)", "EOR"),
                                      ("perplexity change (%)", f"LRU hit rate @ {k2} slots"),
                                      ("top-k agreement with original", "EOR"),
                                      ("top-k agreement with original",
                                       f"LRU hit rate @ {k2} slots")], strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
