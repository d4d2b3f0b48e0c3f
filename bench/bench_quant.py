"""Dequantize on load, CPU: what turning one compressed expert blob into a compute-dtype slot
costs the reader thread, next to what reading the blob costs.

Providers (rounds interleaved: bf16, int8, int4:g64, fp8, mxfp4, bf16, ...):
  SCHEME -> DTYPE   `ops.dequantize` (the reader thread's `dequantize_host`) of one expert blob
                    packed with `remoe pack --quantize SCHEME` into a DTYPE slot; bf16 is the
                    plain dtype conversion through the same function.
Per provider: median ms per expert (wall, and this thread's CPU time, which a shared machine's
other load does not inflate), GB/s of slot bytes written, and the ratio of the time to read the
compressed blob at the storage bandwidth measured on $TMPDIR (O_DIRECT) to the time to
dequantize it: above 1, dequantization keeps up with the read it follows on one reader thread.

The expert has Qwen3-30B-A3B's shape (H=2048, I=768: gate_up [1536, 2048], down [2048, 768]).

Run:
  pytest bench/bench_quant.py --benchmark-disable-gc
  REMOE_BENCH_QUANT_OUT=bench/results/quant-cpu-$(date +%F).json pytest bench/bench_quant.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from remoe_engine import ops
from remoe_engine.quant import parse_scheme, quantize_expert
from remoe_engine.store import SlotLayout, measure_read_bandwidth

SCHEMES = ("bf16", "int8", "int4:g64", "fp8", "mxfp4")
DTYPES = (torch.float32, torch.bfloat16)
ROUNDS = int(os.environ.get("REMOE_BENCH_QUANT_ROUNDS", "7"))
H, I = 2048, 768


def _storage_bandwidth() -> float:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as f:
        f.write(os.urandom(64 << 20))
        f.flush()
        os.fsync(f.fileno())
        return measure_read_bandwidth(f.name)[0]


def test_dequantize_on_load(benchmark):
    g = torch.Generator().manual_seed(0)
    tensors = {"gate_up_proj": torch.randn(2 * I, H, generator=g) * 0.02,
               "down_proj": torch.randn(H, I, generator=g) * 0.02}
    cases = []
    for scheme in SCHEMES:
        layout, blob = quantize_expert(tensors, parse_scheme(scheme), False)
        for dtype in DTYPES:
            slot = SlotLayout.build(dtype, [(k, tuple(v.shape)) for k, v in tensors.items()])
            plan = layout.plan(slot)
            # Correct first: the op equals the plain-PyTorch reference.
            got = slot.views(ops.dequantize(blob, plan, dtype, slot.slot_bytes))
            want = layout.dequantize(blob, slot)
            assert all(torch.equal(got[k], want[k]) for k in want), (scheme, dtype)
            cases.append((scheme, dtype, layout, blob, plan, slot))
    bandwidth = _storage_bandwidth()
    times = {(s, d): [] for s, d, *_ in cases}
    cpu = {(s, d): [] for s, d, *_ in cases}  # this thread's CPU time: what other load hides

    def all_rounds():
        for _ in range(ROUNDS):
            for scheme, dtype, _, blob, plan, slot in cases:
                start, start_cpu = time.perf_counter(), time.thread_time()
                ops.dequantize(blob, plan, dtype, slot.slot_bytes)
                times[(scheme, dtype)].append(time.perf_counter() - start)
                cpu[(scheme, dtype)].append(time.thread_time() - start_cpu)

    load_before = os.getloadavg()[0]
    benchmark.pedantic(all_rounds, rounds=1, iterations=1)
    # A shared machine's other work shows up in every figure: keep its load with them.
    load = (load_before, os.getloadavg()[0])
    rows = []
    for scheme, dtype, layout, _, _, slot in cases:
        t = statistics.median(times[(scheme, dtype)])
        t_cpu = statistics.median(cpu[(scheme, dtype)])
        read = layout.blob_bytes / bandwidth
        rows.append(dict(scheme=scheme, slot_dtype=str(dtype).removeprefix("torch."),
                         blob_bytes=layout.blob_bytes, slot_bytes=slot.slot_bytes,
                         ms_per_expert=t * 1e3, cpu_ms_per_expert=t_cpu * 1e3,
                         slot_gbps=slot.slot_bytes / t / 1e9, read_ms=read * 1e3,
                         read_over_dequant=read / t, read_over_dequant_cpu=read / t_cpu))
    benchmark.extra_info.update(storage_gbps=bandwidth / 1e9, load_average=load, rows=rows)
    out = os.environ.get("REMOE_BENCH_QUANT_OUT")
    if out:
        import transformers

        doc = dict(date=datetime.date.today().isoformat(),
                   command="REMOE_BENCH_QUANT_OUT=" + out + " pytest bench/bench_quant.py",
                   machine=dict(node=platform.node(), cpus=os.cpu_count(),
                                threads=torch.get_num_threads()),
                   versions=dict(torch=torch.__version__, transformers=transformers.__version__),
                   expert=dict(H=H, I=I), rounds=ROUNDS, storage_gbps=bandwidth / 1e9,
                   load_average=load, rows=rows)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
