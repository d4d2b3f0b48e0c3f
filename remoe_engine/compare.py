"""The comparison behind `remoe run`: one MoE model served from disk under a memory budget, with
the original router, the router delta shipped with the model (ReMoE fine-tuned) and the reuse
bias, side by side.

Every configuration is loaded with `remoe_engine.load(store="disk")` from one packed expert file
(one read per miss, O_DIRECT where the filesystem allows), generates a sample greedily from the
prompt (which also warms it up), and then decodes the same held-out tokens one at a time with its
KV cache (`evaluation.decode_side_by_side`): every token goes through every configuration, and
through a copy of the model with every expert resident, before the next token does. So the
configurations and the compute floor are measured in the same interleaved run. Per configuration:

- tokens/s and TPOT (p50 over the decode steps), next to its floor max(T_compute, M / B):
  T_compute the all-resident copy's TPOT in the same run, M the bytes read per decoded token, B
  the storage read bandwidth measured at start;
- hit rate and bytes read per decoded token;
- held-out perplexity, EOR (expert reuse between consecutive tokens) and top-k agreement with
  the original router on the same hidden states.

Without held-out text (no --eval-text and no shipped held-out slice), the tokens decoded are the
prompt and the original router's greedy continuation.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from remoe_engine import evaluation, metrics
from remoe_engine.store import ExpertStore, measure_read_bandwidth

DEFAULT_PROMPT = "def read_config(path):"  # the built-in model card's sample prompt
COMPUTE_DTYPE = torch.float32  # fast on every CPU; what the slots hold
WARM_UP_TOKENS = 4  # per configuration, before the timed pass (allocations, lazy init)


@dataclass
class RunSettings:
    model: str
    memory_budget: int | None = None  # bytes; None with slots_per_layer None: a quarter
    slots_per_layer: int | None = None
    policy: str = "lru"
    reuse_bias: float = 0.05
    bias_source: str = "resident"
    router_delta: str | None = None  # a file; None: no "remoe" rows
    # A router delta carrying a learned reuse bias (`remoe finetune --learn-bias`); None: no
    # "learned" row.
    learned_delta: str | None = None
    # Explicit rows (name, router delta or None, reuse bias, bias source[, compressed scheme])
    # replacing the default
    # set (`configurations`); for comparisons such as bench/experiments/learned_bias.py.
    rows: list | None = None
    device: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 48
    eval_tokens: int = 256
    eval_text: str | None = None  # a text file; default: the model's shipped held-out slice
    progress: bool = True
    prefetch: bool = False  # decode prefetches the next MoE layer's guessed experts
    # Compressed expert schemes (remoe_engine.quant.parse_scheme), one more row each: the
    # original router, no bias, experts packed with `remoe pack --quantize SCHEME`.
    quantize: tuple[str, ...] = ()
    # What the compressed rows' slots hold (load()'s slot_format), or "both": two rows per
    # scheme, "SCHEME/compressed" and "SCHEME/dequantized".
    slot_format: str = "auto"


@dataclass
class RowResult:
    name: str
    router: str  # "original" or "remoe" (the shipped router delta applied)
    reuse_bias: float
    bias_source: str | None
    quantize: str | None = None  # the compressed scheme its experts were packed with
    slot_format: str = "dequantized"  # what its slots held (compressed blobs or dequantized)
    blob_bytes: int = 0  # bytes one expert takes on disk (and per miss)
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
    # The decoded routing replayed through the simulator's LRU: per-layer caches of K and 2K
    # slots ("K", "2K") and one global cache of the budget's slots ("budget", when a budget).
    lru_hit_rates: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def pool_slot_bytes(store: ExpertStore) -> int:
    """Bytes of one expert slot in the compute dtype (what a budget is divided into)."""
    return store.layout.in_dtype(COMPUTE_DTYPE).slot_bytes


def pool_budget(store: ExpertStore, settings: RunSettings, top_k: int) -> int | None:
    """The budget in bytes (default: a quarter of the experts), checked before anything loads.

    Raises:
        ValueError: a budget that cannot hold one token's experts of one layer (K slots).
    """
    slot = pool_slot_bytes(store)
    if settings.memory_budget is None:
        if settings.slots_per_layer is not None:
            return None
        return max(top_k * slot, len(store.layers) * store.num_experts * slot // 4)
    if settings.memory_budget < top_k * slot:
        raise ValueError(
            f"--memory-budget {settings.memory_budget} bytes holds "
            f"{settings.memory_budget // slot} expert slots of {slot} bytes "
            f"({str(COMPUTE_DTYPE).removeprefix('torch.')}); one token needs {top_k} per layer: "
            f"give at least {top_k * slot} bytes")
    return settings.memory_budget


def configurations(settings: RunSettings
                   ) -> list[tuple[str, str | None, float, str, str | None]]:
    """(name, router delta file or None, reuse bias, bias source, compressed scheme or None) of
    each row, in table order.

    A delta that carries a learned reuse bias brings its own strengths and source (the bias
    given here is then not used)."""
    if settings.rows is not None:  # (name, delta, bias, source[, scheme])
        return [tuple(r) if len(r) == 5 else (*r, None) for r in settings.rows]
    source = settings.bias_source
    configs = [("original", None, 0.0, source, None)]
    if settings.router_delta is not None:
        configs.append(("remoe", settings.router_delta, 0.0, source, None))
    if settings.reuse_bias > 0:
        configs.append(("original+bias", None, settings.reuse_bias, source, None))
        if settings.router_delta is not None:
            configs.append(("remoe+bias", settings.router_delta, settings.reuse_bias, source,
                            None))
    if settings.learned_delta is not None:
        configs.append(("learned", settings.learned_delta, 0.0, source, None))
    formats = (["compressed", "dequantized"] if settings.slot_format == "both"
               else [None] if settings.slot_format == "auto" else [settings.slot_format])
    for scheme in settings.quantize:
        for fmt in formats:
            row_scheme = scheme if fmt is None else f"{scheme}/{fmt}"
            configs.append((f"original@{row_scheme}", None, 0.0, source, row_scheme))
    return configs


def split_scheme(row_scheme: str | None) -> tuple[str | None, str]:
    """A row's "SCHEME[/SLOT_FORMAT]" -> (scheme or None, load()'s slot_format)."""
    if row_scheme is None:
        return None, "auto"
    scheme, _, fmt = row_scheme.partition("/")
    return scheme, fmt or "auto"


def run(settings: RunSettings, log=print) -> dict:
    """Load every configuration, generate, decode side by side; returns the JSON-ready report.

    Args:
        settings: what to run.
        log: takes one line of progress text (phases; bars are tqdm's, on stderr).
    """
    from transformers import AutoConfig, AutoTokenizer

    from remoe_engine.families import routing_spec

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    store = ExpertStore.from_checkpoint(settings.model)
    top_k = int(routing_spec(AutoConfig.from_pretrained(settings.model)).top_k)
    budget = pool_budget(store, settings, top_k)
    with tempfile.TemporaryDirectory(prefix="remoe-run-") as tmp:
        log("packing the experts into one file (one read per miss)...")
        packed = {None: str(store.pack(os.path.join(tmp, "experts.remoe"),
                                       progress=settings.progress))}
        for i, scheme in enumerate(dict.fromkeys(settings.quantize)):
            log(f"packing the experts as {scheme}...")
            packed[scheme] = str(store.pack(os.path.join(tmp, f"experts-{i}.remoe"),
                                            progress=settings.progress, quantize=scheme))
        bandwidth, direct = measure_read_bandwidth(packed[None])
        log(f"read bandwidth {bandwidth / 1e9:.2f} GB/s ({'O_DIRECT' if direct else 'buffered'}); "
            "loading the configurations...")
        full, models = _load_all(settings, packed, direct, budget)
        original = evaluation.frozen_routers(full)
        references = [None] + [original] * len(models)
        texts = _generate_samples(models, tokenizer, settings)
        tokens = _tokens_to_decode(settings, tokenizer, models[0])
        results = evaluation.decode_side_by_side(
            [full, *models], tokens, references=references, progress=settings.progress,
            label=f"decoding {tokens.shape[1] - 1} tokens x {len(models) + 1} models")
        floor_steps = results[0].steps
        t_compute = statistics.median(floor_steps)
        total_slots = None if budget is None else budget // pool_slot_bytes(store)
        rows = [_row(name, delta, scheme, settings, result, model, text, t_compute, bandwidth,
                     top_k, total_slots)
                for (name, delta, _, _, scheme), result, model, text in zip(
                    configurations(settings), results[1:], models, texts, strict=True)]
        del full, models

    return dict(
        model=settings.model, device=settings.device, policy=settings.policy,
        prefetch=settings.prefetch, memory_budget=budget,
        slots_per_layer=settings.slots_per_layer,
        expert_bytes=len(store.layers) * store.num_experts * pool_slot_bytes(store),
        slot_bytes=store.layout.slot_bytes, layers=len(store.layers),
        experts=store.num_experts, top_k=top_k, router_delta=settings.router_delta,
        read_bandwidth_gbps=bandwidth / 1e9, o_direct=direct,
        compute_floor_ms=t_compute * 1e3,
        eval_tokens=int(tokens.shape[1]),
        eval_source="held-out" if _has_heldout(settings) else "prompt + original's output",
        max_new_tokens=settings.max_new_tokens, prompt=settings.prompt,
        rows=[asdict(r) for r in rows])


def _load_all(settings: RunSettings, packed: dict, direct: bool, budget: int | None):
    """The all-resident copy (the compute floor) and one model per configuration."""
    from tqdm.auto import tqdm

    import remoe_engine

    full = remoe_engine.load(settings.model, store="host", device=settings.device,
                             dtype=COMPUTE_DTYPE)
    pool_size = (dict(memory_budget=budget) if budget is not None
                 else dict(slots_per_layer=settings.slots_per_layer))
    models = []
    for _, delta, bias, source, row_scheme in tqdm(configurations(settings), desc="loading",
                                                   leave=False, disable=not settings.progress):
        scheme, slot_format = split_scheme(row_scheme)
        model = remoe_engine.load(settings.model, store="disk", packed=packed[scheme],
                                  o_direct=direct, slot_format=slot_format,
                                  device=settings.device, dtype=COMPUTE_DTYPE,
                                  policy=settings.policy, prefetch=settings.prefetch,
                                  reuse_bias=bias, bias_source=source, **pool_size)
        if delta is not None:
            # Its router weights, and its learned reuse bias when it has one (installed in the
            # loaded model's routers, replacing the bias given to load()).
            remoe_engine.apply_router_delta(model, delta)
        models.append(model)
    return full, models


def _generate_samples(models, tokenizer, settings: RunSettings) -> list[str]:
    """Each configuration's greedy continuation of the prompt (its first tokens also warm the
    configuration up before the timed pass)."""
    from tqdm.auto import tqdm

    ids = tokenizer(settings.prompt, return_tensors="pt").input_ids.to(settings.device)
    texts = []
    for model in tqdm(models, desc="generating samples", leave=False,
                      disable=not settings.progress):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=settings.max_new_tokens,
                                 min_new_tokens=settings.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def _has_heldout(settings: RunSettings) -> bool:
    return bool(settings.eval_text) or os.path.exists(
        os.path.join(settings.model, "heldout_slice.safetensors"))


def _tokens_to_decode(settings: RunSettings, tokenizer, original) -> torch.Tensor:
    """[1, N] the tokens every configuration decodes: held-out text, else the prompt and the
    original router's greedy continuation (the same tokens for every row either way)."""
    held = evaluation.heldout_ids(settings.model, tokenizer, text_file=settings.eval_text,
                                  max_tokens=settings.eval_tokens)
    if held is not None:
        if held.shape[1] < 2:
            raise ValueError(f"the held-out text has {held.shape[1]} token(s); at least 2 needed")
        return held
    ids = tokenizer(settings.prompt, return_tensors="pt").input_ids.to(settings.device)
    with torch.no_grad():
        out = original.generate(ids, max_new_tokens=settings.max_new_tokens,
                                min_new_tokens=settings.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or 0)
    return out[:, : settings.eval_tokens].cpu()


def _lru_hit_rates(routing, top_k: int, total_slots: int | None) -> dict:
    """The decoded routing replayed through the simulator's LRU (see RowResult)."""
    from remoe_engine import sim

    rates = {}
    per_layer = {r.slots: r.hit_rate for r in sim.sweep(routing, ["lru"], [top_k, 2 * top_k])}
    rates["K"], rates["2K"] = per_layer[top_k], per_layer[2 * top_k]
    if total_slots is not None and total_slots >= top_k:
        rates["budget"] = sim.sweep(routing, ["lru"], [total_slots], scope="global")[0].hit_rate
    return rates


def _row(name: str, delta: str | None, scheme: str | None, settings: RunSettings,
         result: evaluation.DecodeResult, model, text: str, t_compute: float,
         bandwidth: float, top_k: int, total_slots: int | None) -> RowResult:
    from remoe_engine.router import LEARNED_ATTR

    steps, counts = result.steps, result.counts
    learned = getattr(model, LEARNED_ATTR, None)
    handle = model.remoe
    bias = handle.reuse_bias
    decoded = len(steps)
    tpot = statistics.median(steps)
    lookups = counts["hits"] + counts["misses"]
    bytes_per_token = counts["bytes_read"] / decoded
    return RowResult(
        name=name, router="learned" if learned is not None else "remoe" if delta else "original",
        reuse_bias=bias, bias_source=handle.bias_source if bias else None, text=text,
        quantize=split_scheme(scheme)[0], slot_format=handle.pool.slot_format,
        blob_bytes=handle.pool.store.blob_bytes,
        tokens_per_s=1.0 / tpot, tpot_ms=tpot * 1e3,
        tpot_p90_ms=sorted(steps)[int(0.9 * (decoded - 1))] * 1e3,
        floor_ms=max(t_compute, bytes_per_token / bandwidth) * 1e3,
        hit_rate=counts["hits"] / lookups if lookups else 0.0,
        bytes_read_per_token=bytes_per_token, misses_per_token=counts["misses"] / decoded,
        perplexity=result.perplexity, eor=metrics.expert_reuse(result.routing).eor,
        topk_agreement=result.agreement.topk_agreement,
        lru_hit_rates=_lru_hit_rates(result.routing, top_k, total_slots),
        stats={k: v for k, v in model.remoe.stats().items() if k != "per_layer"})


LEGEND = """\
original     the checkpoint's own router
remoe        the router delta shipped with the model (router-delta.safetensors: ReMoE
             fine-tuning, only router weights changed)
+bias        the cache-aware reuse bias (column "bias") toward {source} experts
learned      a reuse bias whose strengths were trained (remoe finetune --learn-bias; column
             "bias": the largest strength)
@SCHEME      experts packed compressed (remoe pack --quantize SCHEME); the slots hold the
             compressed blobs (/compressed, the CPU default: more experts per budget) or the
             experts dequantized into the compute dtype as each loads (/dequantized)
floor        max(TPOT with every expert resident, KB read per token / read bandwidth),
             measured in the same interleaved run
hit rate     expert lookups served from the pool without a read
EOR          expert reuse: the fraction of a token's experts the previous token also used
top-k agr    the fraction of chosen experts the original router, without a bias, would choose
             on the same hidden states"""


def format_table(report: dict) -> str:
    """The report as a plain-text table, one line per configuration, and its legend."""
    width = max([14] + [len(r["name"]) + 1 for r in report["rows"]])
    head = (f"{'config':<{width}}{'bias':>6}{'tok/s':>8}{'TPOT ms':>9}{'floor ms':>9}"
            f"{'hit rate':>9}{'KB read/tok':>12}{'ppl':>8}{'EOR':>7}{'top-k agr':>10}")
    lines = [head, "-" * len(head)]
    source = "the pool's (resident)"
    for r in report["rows"]:
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "-"
        eor = f"{r['eor']:.3f}" if r["eor"] is not None else "-"
        agr = f"{r['topk_agreement']:.3f}" if r["topk_agreement"] is not None else "-"
        if r["bias_source"] == "previous":
            source = "the previous token's"
        lines.append(f"{r['name']:<{width}}{r['reuse_bias']:>6g}{r['tokens_per_s']:>8.1f}"
                     f"{r['tpot_ms']:>9.2f}{r['floor_ms']:>9.2f}{r['hit_rate']:>9.3f}"
                     f"{r['bytes_read_per_token'] / 1024:>12.1f}{ppl:>8}{eor:>7}{agr:>10}")
    return "\n".join(lines) + "\n\n" + LEGEND.format(source=source)
