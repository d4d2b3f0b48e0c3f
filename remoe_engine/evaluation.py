"""Evaluating a model on held-out text: the one harness behind `remoe run`, `remoe eval`,
fine-tuning's periodic check and the built-in model's card.

Held-out text is cut into windows: independent sequences of S tokens (`windows`). Two passes:

- `teacher_forced`: one forward per batch of windows. Without a reuse bias routing has no
  feedback, so the router sees exactly what it sees at decode. Perplexity is `exp(mean NLL)` over
  positions 2..S of every window; routing comes from the one router tap (`trace.RouterTap`), so
  every family's own selection rule is what is measured.
- `decode`: each window fed one token at a time with the KV cache, the next input the held-out
  token (teacher-forced), as at decode: a reuse bias feeds back through the layers, the pool
  sees decode's access pattern, and each step's wall time is a TPOT sample. The same
  predictions as the teacher-forced pass, so the perplexities agree to float rounding.

Top-k agreement and KL always compare with a reference router on the SAME hidden states
(`trace.frozen_routers`: the original weights, frozen before a router delta or a bias changes the
routing), through `metrics.router_agreement`: what a user trades for fewer fetches.

Legend: W = windows, S = tokens per window, N = tokens, L = MoE layers, E = experts, K = top-k.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine import metrics, sim
from remoe_engine.families import routing_spec
from remoe_engine.hf_compat import cache_kwargs
from remoe_engine.trace import RouterTap, RoutingTrace, frozen_routers

__all__ = ["DecodeResult", "decode", "decode_report", "decode_side_by_side", "default_slots",
           "format_table", "frozen_routers", "heldout_ids", "perplexity", "plot_report",
           "routing_report", "teacher_forced", "teacher_forced_trace", "windows"]

POLICIES = ("lru", "lfu", "opt")
LAGS = [1, 2, 4, 8, 16]


# ---- held-out text ----------------------------------------------------------------------------


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows (a trailing partial window is dropped).

    Args:
        ids: token stream [N], integer dtype.
        seq_len: window length S.
        max_tokens: if given, only the first `max_tokens` tokens are used.

    Returns:
        int64 [W, S], W = floor(min(N, max_tokens) / S).

    Raises:
        ValueError: if the stream is shorter than one window.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {ids.numel()}")
    return ids[: count * seq_len].reshape(count, seq_len).long()


def heldout_ids(model_dir: str | os.PathLike, tokenizer, *, text_file: str | None = None,
                max_tokens: int) -> torch.Tensor | None:
    """[1, N] held-out token ids: `text_file` tokenized, else the model folder's shipped held-out
    slice (`heldout_slice.safetensors`, the built-in model has one); None without either.

    Raises:
        OSError: `text_file` cannot be read.
    """
    if max_tokens <= 1:
        return None
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            ids = tokenizer(f.read(), return_tensors="pt").input_ids[0]
    else:
        slice_path = os.path.join(os.fspath(model_dir), "heldout_slice.safetensors")
        if not os.path.exists(slice_path):
            return None
        from safetensors.torch import load_file

        ids = load_file(slice_path)["input_ids"].reshape(-1)
    return ids[:max_tokens].long().unsqueeze(0)


# ---- teacher-forced ---------------------------------------------------------------------------


def _nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed NLL of positions 2..S of each window, accumulated in float64 (so a mean does not
    depend on how the windows were batched)."""
    return float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                 batch[:, 1:].reshape(-1), reduction="sum").double())


@torch.no_grad()
def perplexity(model: nn.Module, wins: torch.Tensor, batch_size: int = 16) -> dict:
    """Perplexity of a causal LM over independent windows.

    Args:
        model: a transformers causal LM (set to eval mode here).
        wins: int64 [W, S] token windows (see `windows`).
        batch_size: windows per forward (does not change the result beyond float rounding).

    Returns:
        {"perplexity", "nll" (mean, nats), "predicted_tokens", "windows", "seq_len"}.
    """
    model.eval()
    total = 0.0
    for start in range(0, wins.shape[0], batch_size):
        batch = wins[start : start + batch_size]  # [B, S]
        total += _nll_sum(model(input_ids=batch, use_cache=False).logits, batch)
    predicted = wins.shape[0] * (wins.shape[1] - 1)
    return {"perplexity": math.exp(total / predicted), "nll": total / predicted,
            "predicted_tokens": predicted, "windows": int(wins.shape[0]),
            "seq_len": int(wins.shape[1])}


def _window_offsets(wins: torch.Tensor, per_window: int) -> torch.Tensor:
    return torch.arange(0, wins.shape[0] * per_window + 1, per_window, dtype=torch.int64)


@torch.no_grad()
def teacher_forced_trace(model: nn.Module, wins: torch.Tensor, *, batch_size: int = 16,
                         probs: bool = False) -> tuple[dict, RoutingTrace]:
    """Perplexity and the routing trace of held-out windows, from the same forward passes.

    Args:
        model: a transformers MoE causal LM.
        wins: int64 [W, S].
        batch_size: windows per forward.
        probs: keep the router probabilities in the trace (for KL).

    Returns:
        (the dict `perplexity` returns, a RoutingTrace of W sequences of S tokens).
    """
    with RouterTap(model, probs=probs) as tap:
        ppl = perplexity(model, wins, batch_size)
    routing = tap.to_trace(model, _window_offsets(wins, wins.shape[1]),
                           token_ids=wins.reshape(-1), source="held-out", mode="forward")
    return ppl, routing


def teacher_forced(model: nn.Module, wins: torch.Tensor, *, slots: Sequence[int] | None = None,
                   reference: RoutingTrace | None = None,
                   batch_size: int = 16) -> tuple[dict, RoutingTrace]:
    """Perplexity and routing report of a model on held-out windows, teacher-forced.

    Args:
        model: a transformers MoE causal LM.
        wins: int64 [W, S] held-out windows.
        slots: cache sizes per layer (default `default_slots`).
        reference: the original model's trace of the same windows (agreement, KL), or None.
            Each model routes with its own upstream hidden states here; `decode` compares on the
            same hidden states.
        batch_size: windows per forward.

    Returns:
        (report dict with "perplexity", "nll", "tokens" and `routing_report`'s keys, the trace).
    """
    ppl, routing = teacher_forced_trace(model, wins, batch_size=batch_size, probs=True)
    if slots is None:
        slots = default_slots(routing.top_k, routing.num_experts)
    report = {"mode": "teacher-forced", "perplexity": ppl["perplexity"], "nll": ppl["nll"],
              "tokens": int(wins.numel()), "windows": int(wins.shape[0]),
              "seq_len": int(wins.shape[1])}
    report.update(routing_report(routing, slots, reference))
    return report, routing


# ---- token by token, as at decode -------------------------------------------------------------


@dataclass
class DecodeResult:
    """What `decode` measured.

    Args:
        perplexity / nll: over the predicted tokens (positions 2..S of each window).
        predicted: predicted tokens, W * (S - 1).
        routing: the trace of every fed token (W sequences of S - 1 tokens), with probabilities
            when a reference was given.
        steps: wall seconds of each forward (one token; ends with the prediction's host sync).
        counts: the pool's hits, misses and bytes_read over the pass (a model from `load()` or a
            `handle` given), else None.
        agreement: top-k agreement and KL with the reference routers on the same hidden states,
            or None without a reference.
    """

    perplexity: float
    nll: float
    predicted: int
    routing: RoutingTrace
    steps: list[float]
    counts: dict | None = None
    agreement: metrics.AgreementStats | None = None


@torch.no_grad()
def decode(model: nn.Module, wins: torch.Tensor, *,
           reference: list[nn.Module] | None = None,
           handle=None, single_thread: bool = False, progress: bool = False,
           label: str = "decode") -> DecodeResult:
    """Feed each window token by token with the KV cache, teacher-forced, as at decode.

    Tokens 1..S-1 of each window are fed (the last token is only predicted); each step predicts
    the next held-out token. Every configuration sees the same tokens, so hit rates, bytes read
    per token and TPOT are comparable (free generation would diverge as soon as the routing
    changes the text).

    Args:
        model: a transformers MoE causal LM, plain, patched or from `load()`.
        wins: int64 [W, S] held-out windows, S >= 2.
        reference: frozen routers (`frozen_routers`) to compare the routing with on the same
            hidden states, or None.
        handle: the `patch()` Handle whose pool counters to report (default: `model.remoe` of a
            loaded model, if any).
        single_thread: one intra-op thread during the pass: a single token's tensors are tiny,
            and on a busy small machine thread barriers made steps up to 40x slower.
        progress: a tqdm bar over the tokens.
        label: the bar's text.
    """
    return decode_side_by_side([model], wins, references=[reference], handles=[handle],
                               single_thread=single_thread, progress=progress, label=label)[0]


@torch.no_grad()
def decode_side_by_side(models: Sequence[nn.Module], wins: torch.Tensor, *,
                        references: Sequence[list | None] | None = None,
                        handles: Sequence[object | None] | None = None,
                        single_thread: bool = False, progress: bool = False,
                        label: str = "decode") -> list[DecodeResult]:
    """`decode` of several models over the same tokens in lockstep: each token goes through
    every model before the next one does (A, B, C, A, B, C, ...), so a machine that slows down
    slows them all alike and their step times compare (a floor measured minutes apart from the
    figure it bounds could sit above it).

    Args:
        models: the models (e.g. one per router configuration, and an all-resident one).
        wins: int64 [W, S] held-out windows, S >= 2.
        references: per model, frozen routers or None (see `decode`).
        handles: per model, a Handle or None (see `decode`).
        single_thread, progress, label: as for `decode`.

    Returns:
        One DecodeResult per model, in order.
    """
    if wins.dim() != 2 or wins.shape[1] < 2:
        raise ValueError(f"decode needs windows [W, S] with S >= 2, got {list(wins.shape)}")
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    n = len(models)
    references = list(references) if references is not None else [None] * n
    handles = [h if h is not None else getattr(m, "remoe", None)
               for m, h in zip(models, handles or [None] * n, strict=True)]
    for model, handle in zip(models, handles, strict=True):
        model.eval()
        if handle is not None:
            handle.reset_stats()
    nll, steps = [0.0] * n, [[] for _ in range(n)]
    threads = torch.get_num_threads()
    if single_thread:
        torch.set_num_threads(1)
    bar = tqdm(total=wins.shape[0] * (wins.shape[1] - 1), desc=label, unit="tok",
               disable=not progress, leave=False)
    try:
        with ExitStack() as stack:
            taps = [stack.enter_context(RouterTap(m, probs=r is not None, reference=r))
                    for m, r in zip(models, references, strict=True)]
            devices = [m.get_input_embeddings().weight.device for m in models]
            for window in wins:
                outs = [None] * n
                for t in range(window.shape[0] - 1):
                    for i, model in enumerate(models):
                        nll_t, steps_t, outs[i] = _decode_step(model, devices[i], window, t,
                                                               outs[i])
                        nll[i] += nll_t
                        steps[i].append(steps_t)
                    bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    fed = wins[:, :-1]
    offsets = _window_offsets(wins, fed.shape[1])
    results = []
    for i, model in enumerate(models):
        routing = taps[i].to_trace(model, offsets, token_ids=fed.reshape(-1).cpu(),
                                   source="held-out, token by token", mode="generate")
        counts = None
        if handles[i] is not None:
            stats = handles[i].stats()
            counts = {k: stats[k] for k in ("hits", "misses", "bytes_read")}
        agreement = (None if references[i] is None else metrics.router_agreement(
            _reference_trace(taps[i], routing), routing))
        predicted = len(steps[i])
        results.append(DecodeResult(perplexity=math.exp(nll[i] / predicted),
                                    nll=nll[i] / predicted, predicted=predicted, routing=routing,
                                    steps=steps[i], counts=counts, agreement=agreement))
    return results


def _decode_step(model: nn.Module, device: torch.device, window: torch.Tensor, t: int,
                 previous):
    """Feed token t of a window; returns (NLL of token t + 1, wall seconds, the output)."""
    kwargs = cache_kwargs(model, previous) if previous is not None else {}
    token = window[None, t : t + 1].to(device)
    start = time.perf_counter()
    out = model(input_ids=token, use_cache=True, **kwargs)
    logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    nll = -float(logp[int(window[t + 1])].double())  # host sync: ends the step
    return nll, time.perf_counter() - start, out


def _reference_trace(tap: RouterTap, routing: RoutingTrace) -> RoutingTrace:
    """What the reference routers chose on the tapped hidden states (each by its family's own
    rule), with their probabilities, as a trace of the same tokens."""
    ids = torch.stack([torch.cat(calls) for calls in tap.reference_ids])
    probs = torch.stack([torch.softmax(torch.cat(calls).float(), dim=-1).cpu()
                         for calls in tap.reference_logits])
    return RoutingTrace(ids=ids, offsets=routing.offsets, meta=routing.meta,
                        token_ids=routing.token_ids, probs=probs)


def decode_report(model: nn.Module, wins: torch.Tensor,
                  reference: list[nn.Module], *,
                  reuse_bias: float = 0.0, bias_source: str = "previous",
                  slots_per_layer: int | None = None, slots: Sequence[int] | None = None,
                  progress: bool = True, label: str = "") -> dict:
    """`decode` of an in-memory model under `patch()` (slot pool, optional reuse bias), as a
    report comparable with `teacher_forced`'s.

    Args:
        model: a transformers MoE causal LM (patched for the pass, unpatched after).
        wins: int64 [W, S] held-out windows.
        reference: the original routers (`frozen_routers`), for agreement and KL.
        reuse_bias: the inference-time reuse bias (0: exact routing).
        bias_source: "previous" or "resident".
        slots_per_layer: pool size per layer (default 2K); also what "resident" prefers.
        slots: cache sizes for the simulator (default `default_slots`).
        progress: a progress bar.
        label: its text.

    Returns:
        JSON-ready dict: perplexity, nll, tokens, pool_lru_hit_rate (the pool's own counters),
        top-k agreement and KL to the reference, and `routing_report` of the pass's trace.
    """
    import remoe_engine

    top_k = routing_spec(model).top_k
    if slots_per_layer is None:
        slots_per_layer = 2 * top_k
    handle = remoe_engine.patch(model, slots_per_layer=slots_per_layer, reuse_bias=reuse_bias,
                                bias_source=bias_source)
    try:
        result = decode(model, wins, reference=reference, handle=handle, single_thread=True,
                        progress=progress, label=label or "decode")
    finally:
        handle.unpatch()
    routing = result.routing
    if slots is None:
        slots = default_slots(top_k, routing.num_experts)
    counts = result.counts
    report = {"mode": "decode", "reuse_bias": reuse_bias, "bias_source": bias_source,
              "pool_slots_per_layer": slots_per_layer, "perplexity": result.perplexity,
              "nll": result.nll, "tokens": int(wins.numel()), "windows": int(wins.shape[0]),
              "seq_len": int(wins.shape[1]),
              "pool_lru_hit_rate": counts["hits"] / max(1, counts["hits"] + counts["misses"])}
    report.update(routing_report(routing, slots))
    report["topk_agreement"] = result.agreement.topk_agreement
    report["kl"] = result.agreement.kl
    return report


# ---- reports ----------------------------------------------------------------------------------


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


def routing_report(tr: RoutingTrace, slots: Sequence[int],
                   reference: RoutingTrace | None = None) -> dict:
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
