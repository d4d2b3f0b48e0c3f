"""The experts' compute at a full cache: transformers' own `grouped_mm` experts, the per-expert
loop and the fused op (`ops.moe_experts`), side by side.

Models (random weights, Qwen3-MoE shape; every expert resident, so this measures compute only):
  e2e   hidden 512, 8 layers, 64 experts, top-6, expert FFN 256 (bench_e2e.py's model).
  1b    hidden 1024, 12 layers, 64 experts, top-8, expert FFN 512: 1.3B parameters.
Cases: fp32 and bf16, 1 and 2 threads; decode (TPOT over NEW_TOKENS greedy steps after a
32-token prompt) and a 512-token prefill (one forward).

Providers, interleaved: each decode step runs once per provider in turn (A, B, C, A, B, C, ...,
each with its own KV cache), then each provider's prefill; ROUNDS rounds:
  transformers   the unpatched model, `set_experts_implementation("grouped_mm")`.
  loop           remoe_engine.patch(experts_kernel="loop"): one Python call chain per expert.
  fused          the same patched model switched to experts_kernel="fused" (one C++ call per
                 layer); fused and loop share the model, so only the experts' kernel differs.
Each case also reports where a fused decode step's time goes (experts, routers, attention, the
rest), from timing hooks on those modules in a separate pass (the hooks' cost is not in TPOT).

Run:  pytest bench/bench_experts.py --benchmark-json=/tmp/experts.json
      REMOE_BENCH_EXPERTS_OUT=bench/results/experts-cpu-$(date +%F).json \\
          pytest bench/bench_experts.py
      REMOE_BENCH_EXPERTS_MODELS=e2e  (only the small model)
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import remoe_engine
from remoe_engine.families import find_moe_blocks
from remoe_engine.hf_compat import cache_kwargs

MODELS = {
    "e2e": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, intermediate_size=1024,
                moe_intermediate_size=256, num_experts=64, num_experts_per_tok=6),
    "1b": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
               num_key_value_heads=4, head_dim=64, intermediate_size=2816,
               moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8),
}
SELECTED = os.environ.get("REMOE_BENCH_EXPERTS_MODELS", "e2e,1b").split(",")
NEW_TOKENS = int(os.environ.get("REMOE_BENCH_EXPERTS_TOKENS", "12"))
ROUNDS = int(os.environ.get("REMOE_BENCH_EXPERTS_ROUNDS", "3"))
PROMPT, PREFILL = 32, 512
PROVIDERS = ("transformers", "loop", "fused")
RESULTS: list[dict] = []


def _build(name: str, dtype: torch.dtype):
    config = AutoConfig.for_model("qwen3_moe", vocab_size=8192, max_position_embeddings=1024,
                                  norm_topk_prob=True, tie_word_embeddings=False,
                                  **MODELS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ours = copy.deepcopy(model)
    model.set_experts_implementation("grouped_mm")
    handle = remoe_engine.patch(ours, experts_kernel="loop")
    return model, ours, handle


# One model in memory at a time (the 1b model is 5 GiB in fp32, twice: unpatched and patched).
@pytest.fixture(scope="module", ids=lambda case: f"{case[0]}-{case[1]}",
                params=[(m, d) for m in MODELS if m in SELECTED for d in ("fp32", "bf16")])
def models(request):
    name, dtype = request.param
    built = list(_build(name, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]))
    yield name, built
    built.clear()


def _use(provider: str, handle) -> None:
    if provider != "transformers":
        handle.set_experts_kernel(provider)


def _decode_interleaved(models: dict, handle, prompt, steps: dict) -> None:
    """Prefill `prompt` once per provider, then NEW_TOKENS greedy steps, one step of each provider
    in turn (A, B, C, A, B, C, ...), each with its own KV cache; appends seconds per step."""
    state = {}
    with torch.no_grad():
        for provider, model in models.items():
            _use(provider, handle)
            out = model(prompt, use_cache=True)
            state[provider] = (out, out.logits[:, -1:].argmax(-1))
        for _ in range(NEW_TOKENS):
            for provider, model in models.items():
                _use(provider, handle)
                out, token = state[provider]
                start = time.perf_counter()
                out = model(token, use_cache=True, **cache_kwargs(model, out))
                token = out.logits[:, -1:].argmax(-1)
                steps[provider].append(time.perf_counter() - start)
                state[provider] = (out, token)


def _prefill_s(model, ids) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, use_cache=False)
        return time.perf_counter() - start


@pytest.mark.parametrize("threads", [1, 2])
def test_experts_kernels(benchmark, models, threads):
    name, (reference, ours, handle) = models
    dtype = ours.dtype
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 8192, (1, PROMPT), generator=generator)
    long_prompt = torch.randint(0, 8192, (1, PREFILL), generator=generator)
    steps = {p: [] for p in PROVIDERS}
    prefill = {p: [] for p in PROVIDERS}

    models = {p: reference if p == "transformers" else ours for p in PROVIDERS}

    def interleaved():
        for _ in range(ROUNDS):
            _decode_interleaved(models, handle, prompt, steps)
            for provider, model in models.items():
                _use(provider, handle)
                prefill[provider].append(_prefill_s(model, long_prompt))

    load_before = os.getloadavg()[0]
    try:
        # A warm-up pass (first-call allocations, lazy inits), then the measured rounds.
        _decode_interleaved(models, handle, prompt, {p: [] for p in PROVIDERS})
        benchmark.pedantic(interleaved, rounds=1, iterations=1, warmup_rounds=0)
        _use("fused", handle)
        breakdown = _breakdown(ours, prompt)
    finally:
        torch.set_num_threads(previous_threads)
    tpot = {p: 1e3 * statistics.median(v) for p, v in steps.items()}
    prefill_ms = {p: 1e3 * statistics.median(v) for p, v in prefill.items()}
    row = dict(model=name, dtype=str(dtype).removeprefix("torch."), threads=threads,
               tpot_ms=tpot, prefill_ms=prefill_ms,
               fused_tpot_vs_transformers=tpot["fused"] / tpot["transformers"],
               fused_tpot_vs_loop=tpot["fused"] / tpot["loop"],
               fused_prefill_vs_transformers=prefill_ms["fused"] / prefill_ms["transformers"],
               fused_prefill_vs_loop=prefill_ms["fused"] / prefill_ms["loop"],
               fused_step_breakdown_ms=breakdown,
               # Other processes on the machine: a 2-thread case on a 2-core machine with a
               # load average well above 2 measures contention, not the kernels.
               load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    RESULTS.append(row)
    benchmark.extra_info.update(row)
    # The fused op must agree with transformers on this model (a benchmark of a wrong kernel
    # measures nothing).
    with torch.no_grad():
        want = reference(prompt).logits.float()
        got = ours(prompt).logits.float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tolerance


def _breakdown(model, prompt) -> dict[str, float]:
    """Milliseconds per decode step spent in the experts, the routers and attention (timing hooks
    on those modules, decode steps only), and the rest of the step."""
    blocks = find_moe_blocks(model)
    groups = {"experts": [b.experts for b in blocks], "routing": [b.router for b in blocks],
              "attention": [m for n, m in model.named_modules() if n.endswith("self_attn")]}
    spent = dict.fromkeys(groups, 0.0)
    hooks = []
    for group, modules in groups.items():
        for module in modules:
            starts: list[float] = []
            hooks.append(module.register_forward_pre_hook(
                lambda *_, s=starts: s.append(time.perf_counter())))
            hooks.append(module.register_forward_hook(
                lambda *_, s=starts, g=group: spent.__setitem__(
                    g, spent[g] + time.perf_counter() - s.pop())))
    total = 0.0
    try:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for group in spent:  # the prompt's forward is not a decode step
                spent[group] = 0.0
            for _ in range(NEW_TOKENS):
                start = time.perf_counter()
                out = model(token, use_cache=True, **cache_kwargs(model, out))
                token = out.logits[:, -1:].argmax(-1)
                total += time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    per_step = {group: 1e3 * t / NEW_TOKENS for group, t in spent.items()}
    per_step["rest"] = 1e3 * total / NEW_TOKENS - sum(per_step.values())
    per_step["step"] = 1e3 * total / NEW_TOKENS
    return per_step


def teardown_module(module) -> None:
    out = os.environ.get("REMOE_BENCH_EXPERTS_OUT")
    if not out or not RESULTS:
        return
    with open(out, "w") as f:
        json.dump({
            "date": datetime.date.today().isoformat(),
            "command": f"REMOE_BENCH_EXPERTS_OUT={out} pytest bench/bench_experts.py",
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version()},
            "versions": {"torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "new_tokens": NEW_TOKENS, "rounds": ROUNDS, "prefill_tokens": PREFILL,
            "results": RESULTS,
        }, f, indent=1)
