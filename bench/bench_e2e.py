"""End-to-end decode: TPOT and tokens/s of a Qwen3-MoE model with offloaded experts.

Model: Qwen3-MoE shape, hidden 512, 8 layers, 64 experts, top-6, expert FFN 256, fp32, random
weights (routing is what matters for the cache; no hub here). Its experts are 768 MiB of the
checkpoint (1.5 MiB each).

Providers, decoding the same 32-token prompt greedily for NEW_TOKENS tokens, batch 1:
  transformers       the unpatched model fully in memory (the ceiling).
  accelerate_disk    transformers + accelerate disk offload (`device_map="auto"`,
                     `max_memory` = non-expert weights + the same expert budget,
                     `offload_folder`): what a user without remoe-engine would run.
  remoe_host         remoe_engine.load(store="host"): every miss is a host-memory copy.
  remoe_disk         remoe_engine.load(packed=..., o_direct=True): every miss is a storage read
                     that bypasses the page cache.
at slots_per_layer in {K, 2K, E/4, E}.

Every offloaded TPOT is reported next to its floor (docs/design.md section 9):
  floor = max(T_compute, bytes_fetched_per_token / B), with T_compute the fastest full-cache
  remoe TPOT and B measured in this run: O_DIRECT sequential read of the packed file (disk) or a
  host-memory copy (host).

Run:  pytest bench/bench_e2e.py --benchmark-json=/tmp/e2e.json
      REMOE_BENCH_E2E_OUT=bench/results/e2e-cpu-$(date +%F).json pytest bench/bench_e2e.py
"""

from __future__ import annotations

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
from remoe_engine.store import ExpertStore, measure_read_bandwidth

H, LAYERS, E, K, I = 512, 8, 64, 6, 256
NEW_TOKENS = int(os.environ.get("REMOE_BENCH_E2E_TOKENS", "16"))
PROMPT = 32
SLOTS = [K, 2 * K, E // 4, E]
RESULTS: dict[str, dict] = {}


def build_checkpoint(path) -> torch.nn.Module:
    """The e2e model (seeded random weights, fp32) saved as a checkpoint at `path`; returns it.
    bench/bench_quant_e2e.py builds the same model through this."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=4096, hidden_size=H, num_hidden_layers=LAYERS,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, intermediate_size=1024,
        moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
        max_position_embeddings=512, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = build_checkpoint(root / "ckpt")
    ExpertStore.from_checkpoint(root / "ckpt").pack(root / "experts.remoe", progress=False)
    blocks = find_moe_blocks(model)
    expert_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.experts.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    info = dict(path=root / "ckpt", packed=root / "experts.remoe", expert_bytes=expert_bytes,
                non_expert_bytes=total - expert_bytes, slot_bytes=expert_bytes // (LAYERS * E),
                prompt=torch.randint(0, 4096, (1, PROMPT),
                                     generator=torch.Generator().manual_seed(1)))
    # Sequential O_DIRECT read of the packed file (best of 3): the storage bandwidth B.
    info["read_gbps"] = measure_read_bandwidth(info["packed"])[0] / 1e9
    info["copy_gbps"] = _copy_gbps(info["slot_bytes"])
    RESULTS["bandwidth"] = {"disk_read_gbps": info["read_gbps"],
                            "host_copy_gbps": info["copy_gbps"]}
    return info


def _copy_gbps(nbytes: int) -> float:
    """Host-memory copy of expert-sized blobs into one slot: the host tier's bandwidth B.
    Best of 5 passes over 64 blobs (the first pass also pays page faults)."""
    src = torch.empty(64, nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for row in src:
            dst.copy_(row)
        best = min(best, time.perf_counter() - start)
    return 64 * nbytes / best / 1e9


def _decode(model, prompt):
    """Prefill, then NEW_TOKENS greedy decode steps; returns per-step seconds."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(NEW_TOKENS):
            start = time.perf_counter()
            out = model(token, use_cache=True, **cache_kwargs(model, out))
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
    return steps


def _record(benchmark, name, checkpoint, steps_all, stats=None, bandwidth_gbps=None):
    steps = sorted(s for run in steps_all for s in run)
    tpot = statistics.median(steps)
    row = dict(tpot_ms_p50=tpot * 1e3, tpot_ms_p90=steps[int(0.9 * (len(steps) - 1))] * 1e3,
               tokens_per_s=1.0 / tpot)
    if stats is not None:
        misses_per_token = stats["misses"] / NEW_TOKENS
        row.update(hit_rate=stats["hit_rate"], misses_per_token=misses_per_token,
                   bytes_fetched_per_token=misses_per_token * checkpoint["slot_bytes"],
                   bandwidth_gbps=bandwidth_gbps)
    RESULTS[name] = row
    benchmark.extra_info.update(row)


def _bench(benchmark, run):
    steps_all = []

    def once():
        steps_all.append(run())

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=1)
    return steps_all[1:]  # the warm-up round's steps are not counted


def test_transformers_in_memory(benchmark, checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint["path"], dtype=torch.float32).eval()
    steps = _bench(benchmark, lambda: _decode(model, checkpoint["prompt"]))
    _record(benchmark, "transformers", checkpoint, steps)


# Full cache first: its TPOT is the compute floor of the others.
@pytest.mark.parametrize("slots", sorted(SLOTS, reverse=True))
@pytest.mark.parametrize("store", ["host", "disk"])
def test_remoe(benchmark, checkpoint, store, slots):
    kwargs = dict(store="host") if store == "host" else dict(
        packed=str(checkpoint["packed"]), o_direct=True)
    model = remoe_engine.load(checkpoint["path"], slots_per_layer=slots, dtype=torch.float32,
                              device="cpu", **kwargs)

    def run():
        model.remoe.reset_stats()
        return _decode(model, checkpoint["prompt"])

    steps = _bench(benchmark, run)
    # The pool counters of the last round cover its prefill and its decode; count decode only.
    model.remoe.reset_stats()
    with torch.no_grad():
        out = model(checkpoint["prompt"], use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        model.remoe.reset_stats()
        for _ in range(NEW_TOKENS):
            out = model(token, use_cache=True, **cache_kwargs(model, out))
            token = out.logits[:, -1:].argmax(-1)
    stats = model.remoe.stats()
    bandwidth = checkpoint["copy_gbps"] if store == "host" else checkpoint["read_gbps"]
    _record(benchmark, f"remoe_{store}-slots{slots}", checkpoint, steps, stats, bandwidth)


@pytest.mark.parametrize("slots", SLOTS)
def test_accelerate_disk_offload(benchmark, checkpoint, slots, tmp_path):
    budget = checkpoint["non_expert_bytes"] + slots * LAYERS * checkpoint["slot_bytes"]
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint["path"], dtype=torch.float32, device_map="auto",
        max_memory={"cpu": budget}, offload_folder=str(tmp_path / "offload")).eval()
    steps = _bench(benchmark, lambda: _decode(model, checkpoint["prompt"]))
    _record(benchmark, f"accelerate_disk-slots{slots}", checkpoint, steps)
    RESULTS[f"accelerate_disk-slots{slots}"]["memory_budget_bytes"] = budget


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("REMOE_BENCH_E2E_OUT")
    if not out or len(RESULTS) < 2:
        return
    # Floors (docs/design.md section 9), once every run is in: T_compute is the fastest full-cache
    # remoe TPOT (no misses, so what is left is compute and overhead).
    full = [RESULTS[f"remoe_{s}-slots{E}"]["tpot_ms_p50"] for s in ("host", "disk")
            if f"remoe_{s}-slots{E}" in RESULTS]
    t_compute = min(full) if full else 0.0
    RESULTS["compute_floor_ms"] = t_compute
    for row in RESULTS.values():
        if isinstance(row, dict) and "bytes_fetched_per_token" in row:
            io_ms = row["bytes_fetched_per_token"] / (row["bandwidth_gbps"] * 1e9) * 1e3
            row["io_floor_ms"] = io_ms
            row["floor_ms"] = max(t_compute, io_ms)
            row["tpot_over_floor"] = row["tpot_ms_p50"] / row["floor_ms"]
    for slots in SLOTS:
        acc = RESULTS.get(f"accelerate_disk-slots{slots}", {}).get("tpot_ms_p50")
        for store in ("host", "disk"):
            row = RESULTS.get(f"remoe_{store}-slots{slots}")
            if row and acc:
                row["speedup_vs_accelerate_disk"] = acc / row["tpot_ms_p50"]
            ref = RESULTS.get("transformers", {}).get("tpot_ms_p50")
            if row and ref:
                row["tpot_vs_transformers"] = row["tpot_ms_p50"] / ref
    import transformers

    payload = dict(
        date=datetime.date.today().isoformat(),
        machine=dict(node=platform.node(), cpus=os.cpu_count(), python=platform.python_version()),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      remoe_engine=remoe_engine.__version__),
        model=dict(family="qwen3_moe", hidden=H, layers=LAYERS, experts=E, top_k=K,
                   moe_intermediate=I, dtype="float32", new_tokens=NEW_TOKENS, prompt=PROMPT),
        results=RESULTS)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
