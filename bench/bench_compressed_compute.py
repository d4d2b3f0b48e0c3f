"""Computing from compressed slots, CPU: one MoE layer's experts computed by
`ops.moe_experts_compressed` straight from compressed blobs, next to `ops.moe_experts` on the
same experts dequantized into float32 and bfloat16 slots.

What the choice between the two slot formats trades (load(slot_format=...)):
  dequantized  a miss reads the blob and the reader dequantizes it (bench_quant.py's cost); every
               use then reads compute-dtype weights.
  compressed   a miss reads the blob only and the slot holds the blob, so a budget holds
               (slot bytes / blob bytes) times as many experts; every use decodes the codes.
This benchmark measures the second half: the cost of every use.

Providers (rounds interleaved: each provider once per round):
  dense:float32, dense:bfloat16           ops.moe_experts over dequantized slots
  compressed:SCHEME                       ops.moe_experts_compressed over the blobs
Cases: decode (1 token, K=8 distinct experts: the few-token kernel, codes decoded in registers)
and prefill (128 tokens over S=16 experts, K=8: the routed slots dequantized into a scratch,
then BLAS). Experts of Qwen3-30B-A3B's shape (H=2048, I=768); 1 thread unless
REMOE_BENCH_THREADS says otherwise. Per provider: median ms per layer call and the GB/s of
slot bytes the call reads (for compressed slots, the blobs).

Correct first: every provider's output is checked against the float64 reference on the
dequantized weights before it is timed.

Run:
  pytest bench/bench_compressed_compute.py --benchmark-disable-gc
  REMOE_BENCH_COMPUTE_OUT=bench/results/compressed-compute-cpu-$(date +%F).json \
      pytest bench/bench_compressed_compute.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import torch

from remoe_engine import ops, reference
from remoe_engine.quant import parse_scheme, quantize_expert
from remoe_engine.store import SlotLayout

SCHEMES = ("int8", "fp8", "int4:g128", "int4:g32", "mxfp4")
ROUNDS = int(os.environ.get("REMOE_BENCH_COMPUTE_ROUNDS", "9"))
THREADS = int(os.environ.get("REMOE_BENCH_THREADS", "1"))
H, I, K, S = 2048, 768, 8, 16
CASES = {"decode": 1, "prefill": 128}


def _experts():
    g = torch.Generator().manual_seed(0)
    return [{"gate_up_proj": torch.randn(2 * I, H, generator=g) * 0.02,
             "down_proj": torch.randn(H, I, generator=g) * 0.02} for _ in range(S)]


def _providers(experts):
    """name -> (call(hidden, slots, weights) -> fp32 [T, H], bytes one slot holds, dense fp32
    weights for the reference)."""
    slot = SlotLayout.build(torch.float32, [("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))])
    providers = {}
    for scheme in SCHEMES:
        layout, blobs = None, []
        for tensors in experts:
            layout, blob = quantize_expert(tensors, parse_scheme(scheme), False, layout)
            blobs.append(blob)
        dense = [layout.dequantize(b, slot) for b in blobs]
        up = torch.stack([d["gate_up_proj"] for d in dense])
        down = torch.stack([d["down_proj"] for d in dense])
        buffer, plan = torch.stack(blobs), layout.compute_plan("gate_up_proj")
        providers[f"compressed:{scheme}"] = (
            lambda x, s, w, b=buffer, p=plan: ops.moe_experts_compressed(x, s, w, b, p, 2 * I),
            layout.blob_bytes, (up, down))
    up = torch.stack([e["gate_up_proj"] for e in experts])
    down = torch.stack([e["down_proj"] for e in experts])
    for dtype in (torch.float32, torch.bfloat16):
        u, d = up.to(dtype), down.to(dtype)
        providers[f"dense:{str(dtype).removeprefix('torch.')}"] = (
            lambda x, s, w, u=u, d=d: ops.moe_experts(x.to(u.dtype), s, w, u, d),
            slot.in_dtype(dtype).slot_bytes, (u.float(), d.float()))
    return providers


def _routing(tokens: int):
    g = torch.Generator().manual_seed(1)
    slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(tokens)])
    return (torch.randn(tokens, H, generator=g), slots, torch.rand(tokens, K, generator=g))


def test_compute_from_compressed_slots(benchmark):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        experts = _experts()
        providers = _providers(experts)
        inputs = {case: _routing(tokens) for case, tokens in CASES.items()}
        for name, (call, _, (up, down)) in providers.items():
            x, slots, weights = inputs["decode"]
            got = call(x, slots, weights)
            want = reference.moe_experts(x, slots, weights, up, down,
                                         gate=ops.ExpertsGate("chunk", "silu"))
            # bf16 slots round the weights, and bf16 hidden the input: compare loosely there.
            tolerance = 2e-2 if "bfloat16" in name else 1e-4
            assert float((got - want).abs().max()) <= tolerance * float(want.abs().max()), name
        times = {(case, name): [] for case in CASES for name in providers}

        def all_rounds():
            for _ in range(ROUNDS):
                for case in CASES:
                    x, slots, weights = inputs[case]
                    for name, (call, _, _) in providers.items():
                        start = time.perf_counter()
                        call(x, slots, weights)
                        times[(case, name)].append(time.perf_counter() - start)

        load_before = os.getloadavg()[0]
        benchmark.pedantic(all_rounds, rounds=1, iterations=1)
        load = (load_before, os.getloadavg()[0])
    finally:
        torch.set_num_threads(threads)
    rows = []
    for case, tokens in CASES.items():
        distinct = len(torch.unique(inputs[case][1]))
        base = statistics.median(times[(case, "dense:bfloat16")])
        for name, (_, slot_bytes, _) in providers.items():
            t = statistics.median(times[(case, name)])
            rows.append(dict(case=case, tokens=tokens, experts=distinct, provider=name,
                             slot_bytes=slot_bytes, ms=t * 1e3,
                             gbps=distinct * slot_bytes / t / 1e9, vs_bf16=t / base))
    benchmark.extra_info.update(load_average=load, rows=rows)
    out = os.environ.get("REMOE_BENCH_COMPUTE_OUT")
    if out:
        import transformers

        doc = dict(date=datetime.date.today().isoformat(),
                   command=f"REMOE_BENCH_COMPUTE_OUT={out} pytest "
                           "bench/bench_compressed_compute.py",
                   machine=dict(node=platform.node(), cpus=os.cpu_count(), threads=THREADS),
                   versions=dict(torch=torch.__version__, transformers=transformers.__version__),
                   expert=dict(H=H, I=I, K=K, slots=S), rounds=ROUNDS, load_average=load,
                   rows=rows)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
