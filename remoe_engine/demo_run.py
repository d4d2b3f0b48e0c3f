"""The main job behind `remoe run`: an MoE model served from disk under a memory budget, with the
original router, the ReMoE router, and the ReMoE router plus cache-aware routing, side by side.

For each configuration the model is loaded with `remoe_engine.load(store="disk")` from a packed
expert file (one read per miss, O_DIRECT when the filesystem allows), generates greedily from the
prompt, and is then evaluated token by token on held-out text with its KV cache (so a reuse bias
feeds back through the layers exactly as at decode). Reported per configuration:

- tokens/s and TPOT (p50 over decode steps), next to its floor max(T_compute, M / B), where
  T_compute is the TPOT with every expert resident, M the bytes read per decoded token and B the
  storage read bandwidth measured at start;
- hit rate and bytes read per decoded token;
- held-out perplexity, EOR (expert reuse between consecutive tokens) and top-k agreement with the
  original router.
All of these come from the held-out pass (the same tokens for every configuration, decoded one
at a time); without held-out text, from the decode steps of the generation.
"""

from __future__ import annotations

import math
import mmap
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from remoe_engine.hf_compat import cache_kwargs

DEFAULT_PROMPT = "def read_config(path):"  # the built-in model card's sample prompt


@dataclass
class RunSettings:
    model: str
    memory_budget: int | None = None  # bytes; None with slots_per_layer None: a quarter of experts
    slots_per_layer: int | None = None
    policy: str = "lru"
    reuse_bias: float = 0.05
    bias_source: str = "resident"
    router_delta: str | None = None  # None: the model's own router-delta.safetensors if any
    device: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 48
    eval_tokens: int = 256
    eval_text: str | None = None  # a text file; default: the model's shipped held-out slice
    progress: bool = True
    prefetch: bool = False  # decode prefetches the next MoE layer's guessed experts


@dataclass
class RowResult:
    name: str
    router: str
    reuse_bias: float
    bias_source: str | None
    tokens_per_s: float = 0.0
    tpot_ms: float = 0.0
    tpot_p90_ms: float = 0.0
    floor_ms: float = 0.0
    hit_rate: float = 0.0
    bytes_read_per_token: float = 0.0
    misses_per_token: float = 0.0
    perplexity: float | None = None
    eor: float | None = None
    topk_agreement: float | None = None
    text: str = ""
    stats: dict = field(default_factory=dict)


def read_bandwidth(path: str) -> tuple[float, bool]:
    """Sequential read bandwidth of `path` in bytes/s (O_DIRECT when possible), best of 3."""
    size = os.path.getsize(path)
    chunk = 4 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    direct = hasattr(os, "O_DIRECT")
    best = 0.0
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            direct = False
            fd = os.open(path, os.O_RDONLY)
        try:
            start, offset = time.perf_counter(), 0
            while offset < size:
                try:
                    n = os.preadv(fd, [buf], offset)
                except OSError:  # e.g. tmpfs refuses O_DIRECT reads
                    if not direct:
                        raise
                    direct = False
                    break
                if n <= 0:
                    break
                offset += n
            elapsed = time.perf_counter() - start
            if offset >= size and elapsed > 0:
                best = max(best, size / elapsed)
        finally:
            os.close(fd)
    return best, direct


def heldout_tokens(settings: RunSettings, tokenizer) -> torch.Tensor | None:
    """[1, N] held-out token ids: --eval-text, else the model's shipped held-out slice."""
    if settings.eval_tokens <= 1:
        return None
    if settings.eval_text:
        with open(settings.eval_text, encoding="utf-8") as f:
            ids = tokenizer(f.read(), return_tensors="pt").input_ids[0]
    else:
        slice_path = os.path.join(settings.model, "heldout_slice.safetensors")
        if not os.path.exists(slice_path):
            return None
        from safetensors.torch import load_file

        ids = load_file(slice_path)["input_ids"].reshape(-1)
    return ids[: settings.eval_tokens].long().unsqueeze(0)


@torch.no_grad()
def decode_eval(model, ids: torch.Tensor) -> dict:
    """Token-by-token teacher forcing with the KV cache, as at decode.

    Every configuration sees the same tokens, so its hit rate, bytes read per token and TPOT are
    comparable (free generation would diverge as soon as the routing changes the text).

    Args:
        model: a model from `remoe_engine.load` (has `.remoe`).
        ids: [1, N] int64 held-out tokens.
    Returns:
        perplexity, the routing as a RoutingTrace (one sequence of N - 1 tokens), per-step
        seconds, and the pool counters (hits, misses, bytes_read) of the decode steps.
    """
    from remoe_engine import trace as trace_mod
    from remoe_engine.families import routing_spec

    model.remoe.reset_stats()
    nll, out, steps = 0.0, None, []
    with trace_mod.RouterRecorder(model) as recorder:
        for t in range(ids.shape[1] - 1):
            kwargs = cache_kwargs(model, out) if out is not None else {}
            start = time.perf_counter()
            out = model(ids[:, t : t + 1], use_cache=True, **kwargs)
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            nll -= float(logp[ids[0, t + 1]])  # host sync: also ends the step's timing
            steps.append(time.perf_counter() - start)
    stats = model.remoe.stats()
    routed = torch.stack([torch.cat(calls) for calls in recorder.calls])  # [L, N - 1, K]
    meta = trace_mod.TraceMeta(top_k=routing_spec(model).top_k,
                               num_experts=int(recorder.blocks[0].experts.num_experts),
                               layers=[b.layer_idx for b in recorder.blocks], mode="generate",
                               source="held-out, decoded token by token")
    routing = trace_mod.RoutingTrace(ids=routed, offsets=torch.tensor([0, routed.shape[1]]),
                                     meta=meta, token_ids=ids[0, :-1].cpu())
    return dict(perplexity=math.exp(nll / (ids.shape[1] - 1)), routing=routing, steps=steps,
                counts={k: stats[k] for k in ("hits", "misses", "bytes_read")})


class _StepClock:
    """A stopping criterion that never stops: it timestamps every generated token and snapshots
    the pool counters after the first (which ends the prefill)."""

    def __init__(self, handle, total: int, progress: bool, label: str):
        self.handle, self.times, self.after_prefill = handle, [], None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="tok", leave=False)

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        if self.after_prefill is None:
            self.after_prefill = self.handle.stats()
        if self.bar is not None:
            self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def generate_timed(model, tokenizer, settings: RunSettings, label: str):
    from transformers import StoppingCriteriaList

    ids = tokenizer(settings.prompt, return_tensors="pt").input_ids.to(settings.device)
    model.remoe.reset_stats()
    clock = _StepClock(model.remoe, settings.max_new_tokens, settings.progress, label)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=settings.max_new_tokens,
                                 min_new_tokens=settings.max_new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([clock]),
                                 pad_token_id=tokenizer.pad_token_id or 0)
    finally:
        clock.close()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    end = model.remoe.stats()
    decoded = max(1, len(steps))
    delta = {k: end[k] - clock.after_prefill[k] for k in ("hits", "misses", "bytes_read")}
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return steps, delta, decoded, text


def default_budget(store) -> int:
    """A quarter of the experts' bytes, at least one token's experts per layer."""
    total = len(store.layers) * store.num_experts * store.layout.slot_bytes
    return total // 4


def run(settings: RunSettings, log=print) -> dict:
    """Run the three configurations; returns the JSON-ready report."""
    from transformers import AutoConfig, AutoTokenizer

    import remoe_engine
    from remoe_engine import metrics
    from remoe_engine.families import routing_spec
    from remoe_engine.store import ExpertStore

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    store = ExpertStore.from_checkpoint(settings.model)
    delta = settings.router_delta
    if delta is None:
        candidate = os.path.join(settings.model, "router-delta.safetensors")
        delta = candidate if os.path.exists(candidate) else None
    elif delta == "none":
        delta = None
    budget = settings.memory_budget
    if budget is None and settings.slots_per_layer is None:
        budget = default_budget(store)
    held = heldout_tokens(settings, tokenizer)

    with tempfile.TemporaryDirectory(prefix="remoe-run-") as tmp:
        # One contiguous, aligned blob per expert: a miss is one read.
        packed = str(store.pack(os.path.join(tmp, "experts.remoe"), progress=False))
        bandwidth, direct = read_bandwidth(packed)
        common = dict(store="disk", packed=packed, o_direct=direct, device=settings.device,
                      dtype=torch.float32, policy=settings.policy, prefetch=settings.prefetch)
        pool_size = (dict(memory_budget=budget) if budget is not None
                     else dict(slots_per_layer=settings.slots_per_layer))

        # The compute floor: every expert resident (host tier), original router. The first
        # generate pays one-time costs (allocations, lazy init), so it is a warm-up.
        full = remoe_engine.load(settings.model, store="host", device=settings.device,
                                 dtype=torch.float32)
        quiet = RunSettings(**{**asdict(settings), "progress": False})
        generate_timed(full, tokenizer, quiet, "warm-up")
        if held is not None:
            floor_steps = decode_eval(full, held.to(settings.device))["steps"]
        else:
            floor_steps = generate_timed(full, tokenizer, quiet, "compute floor")[0]
        t_compute = statistics.median(floor_steps) if floor_steps else 0.0
        del full

        # The built-in model's evidence (its card): the bias on the original router is the
        # recommended setting; the ReMoE rows show what router fine-tuning adds.
        configs = [("original", None, 0.0)]
        if delta is not None:
            configs.append(("remoe", delta, 0.0))
        if settings.reuse_bias > 0:
            configs.append(("original+bias", None, settings.reuse_bias))
            if delta is not None:
                configs.append(("remoe+bias", delta, settings.reuse_bias))
        rows, reference_routing = [], None
        for name, router_delta, bias in configs:
            model = remoe_engine.load(settings.model, reuse_bias=bias,
                                      bias_source=settings.bias_source, **common, **pool_size)
            if router_delta is not None:
                remoe_engine.apply_router_delta(model, router_delta)
            steps, counts, decoded, text = generate_timed(model, tokenizer, settings, name)
            row = RowResult(name=name, router="remoe" if router_delta else "original",
                            reuse_bias=bias, bias_source=settings.bias_source if bias else None,
                            text=text)
            if held is not None:
                # Same tokens for every configuration: comparable speed and cache figures.
                evaluation = decode_eval(model, held.to(settings.device))
                steps, counts = evaluation["steps"], evaluation["counts"]
                decoded = len(steps)
                row.perplexity = evaluation["perplexity"]
                row.eor = metrics.expert_reuse(evaluation["routing"]).eor
                if reference_routing is None:
                    reference_routing = evaluation["routing"]
                row.topk_agreement = metrics.router_agreement(
                    reference_routing, evaluation["routing"]).topk_agreement
            tpot = statistics.median(steps) if steps else float("nan")
            lookups = counts["hits"] + counts["misses"]
            row.tpot_ms = tpot * 1e3
            row.tpot_p90_ms = (sorted(steps)[int(0.9 * (len(steps) - 1))] * 1e3 if steps
                               else float("nan"))
            row.tokens_per_s = 1.0 / tpot if steps else 0.0
            row.hit_rate = counts["hits"] / lookups if lookups else 0.0
            row.bytes_read_per_token = counts["bytes_read"] / max(1, decoded)
            row.misses_per_token = counts["misses"] / max(1, decoded)
            row.floor_ms = max(t_compute, row.bytes_read_per_token / bandwidth) * 1e3
            row.stats = {k: v for k, v in model.remoe.stats().items() if k != "per_layer"}
            rows.append(row)
            del model

    spec = routing_spec(AutoConfig.from_pretrained(settings.model))
    return dict(
        model=settings.model, device=settings.device, policy=settings.policy,
        prefetch=settings.prefetch,
        memory_budget=budget, slots_per_layer=settings.slots_per_layer,
        expert_bytes=len(store.layers) * store.num_experts * store.layout.slot_bytes,
        slot_bytes=store.layout.slot_bytes, layers=len(store.layers),
        experts=store.num_experts, top_k=spec.top_k, router_delta=delta,
        read_bandwidth_gbps=bandwidth / 1e9, o_direct=direct, compute_floor_ms=t_compute * 1e3,
        eval_tokens=int(held.shape[1]) if held is not None else 0,
        max_new_tokens=settings.max_new_tokens, prompt=settings.prompt,
        rows=[asdict(r) for r in rows])


def format_table(report: dict) -> str:
    head = (f"{'config':<14}{'tok/s':>8}{'TPOT ms':>9}{'floor ms':>9}{'hit rate':>9}"
            f"{'KB read/tok':>12}{'ppl':>8}{'EOR':>7}{'top-k agr':>10}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "-"
        eor = f"{r['eor']:.3f}" if r["eor"] is not None else "-"
        agr = f"{r['topk_agreement']:.3f}" if r["topk_agreement"] is not None else "-"
        lines.append(f"{r['name']:<14}{r['tokens_per_s']:>8.1f}{r['tpot_ms']:>9.2f}"
                     f"{r['floor_ms']:>9.2f}{r['hit_rate']:>9.3f}"
                     f"{r['bytes_read_per_token'] / 1024:>12.1f}{ppl:>8}{eor:>7}{agr:>10}")
    return "\n".join(lines)

