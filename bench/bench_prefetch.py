"""Next-layer prefetch on and off: bytes read per token, hit rate and TPOT at decode.

Prefetch is opt-in because it can read more than it saves (another engine measured 7-18 bytes
fetched per byte saved): each decode step of layer l guesses layer l+1's experts with that layer's
router applied to layer l's MoE input and starts loading the guesses (`remoe_engine.experts`). This
measures both sides on the built-in model, whose routers are trained (a random model's routing
would be unpredictable): its experts streamed from a packed file with O_DIRECT (page cache
bypassed), 256 held-out tokens decoded one at a time with the KV cache (teacher-forced, so every
configuration sees the same tokens).

Configurations: pool scope (per layer at 2 x top-k slots, or `remoe run`'s global 3 MiB of the
12 MiB of experts), the router (original, or original + reuse bias 0.02 "resident", the setting
`remoe run` uses), prefetch off / on. Reported per configuration: median and p90 TPOT, bytes read
per token (prefetch reads included), hit rate, prefetches per token, and the share of prefetched
experts that were used before being evicted (prefetch_hits / prefetches).

Run:  OMP_NUM_THREADS=1 pytest bench/bench_prefetch.py --benchmark-json=/tmp/prefetch.json
      REMOE_BENCH_PREFETCH_OUT=bench/results/prefetch-cpu-$(date +%F).json \
          OMP_NUM_THREADS=1 pytest bench/bench_prefetch.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics

import pytest
import torch
from safetensors.torch import load_file

import remoe_engine
import remoe_engine.zoo as zoo
from remoe_engine.evaluation import decode
from remoe_engine.store import ExpertStore, measure_read_bandwidth

TOKENS = int(os.environ.get("REMOE_BENCH_PREFETCH_TOKENS", "257"))  # 256 decode steps
POOLS = {"layer-8": dict(slots_per_layer=8), "global-3MiB": dict(memory_budget=3 << 20)}
ROUTERS = {"original": 0.0, "original+bias0.02": 0.02}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = zoo.path("tiny")
    packed = tmp_path_factory.mktemp("prefetch") / "experts.remoe"
    store = ExpertStore.from_checkpoint(path)
    store.pack(packed, progress=False)
    ids = load_file(os.path.join(path, "heldout_slice.safetensors"))["input_ids"].reshape(-1)
    bandwidth, direct = measure_read_bandwidth(packed)
    RESULTS["setup"] = dict(read_gbps=bandwidth / 1e9, o_direct=direct, tokens=TOKENS - 1,
                            slot_bytes=store.layout.slot_bytes)
    return dict(path=path, packed=str(packed), direct=direct,
                ids=ids[:TOKENS].long().unsqueeze(0))


@pytest.mark.parametrize("prefetch", [False, True], ids=["off", "on"])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("pool", list(POOLS))
def test_decode(benchmark, setup, pool, router, prefetch):
    model = remoe_engine.load(setup["path"], store="disk", packed=setup["packed"],
                              o_direct=setup["direct"], device="cpu", dtype=torch.float32,
                              reuse_bias=ROUTERS[router], prefetch=prefetch, **POOLS[pool])
    runs = []

    def once():
        # decode resets the counters first; the last round's counters are kept.
        runs.append((decode(model, setup["ids"]), model.remoe.stats()))

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)
    evaluation, stats = runs[-1]
    steps = sorted(evaluation.steps)
    decoded = len(steps)
    lookups = stats["hits"] + stats["misses"]
    row = dict(pool=pool, router=router, prefetch=prefetch,
               tpot_ms_p50=statistics.median(steps) * 1e3,
               tpot_ms_p90=steps[int(0.9 * (decoded - 1))] * 1e3,
               bytes_read_per_token=stats["bytes_read"] / decoded,
               hit_rate=stats["hits"] / lookups,
               misses_per_token=stats["misses"] / decoded,
               prefetches_per_token=stats["prefetches"] / decoded,
               prefetch_used=(stats["prefetch_hits"] / stats["prefetches"]
                              if stats["prefetches"] else None),
               perplexity=evaluation.perplexity)
    RESULTS[f"{pool}/{router}/prefetch-{'on' if prefetch else 'off'}"] = row
    benchmark.extra_info.update(row)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("REMOE_BENCH_PREFETCH_OUT")
    if not out or len(RESULTS) < 2:
        return
    for pool in POOLS:
        for router in ROUTERS:
            off = RESULTS.get(f"{pool}/{router}/prefetch-off")
            on = RESULTS.get(f"{pool}/{router}/prefetch-on")
            if off and on:
                on["bytes_read_vs_off"] = on["bytes_read_per_token"] / off["bytes_read_per_token"]
                on["tpot_vs_off"] = on["tpot_ms_p50"] / off["tpot_ms_p50"]
    import transformers

    payload = dict(
        date=datetime.date.today().isoformat(),
        machine=dict(node=platform.node(), cpus=os.cpu_count(), python=platform.python_version(),
                     threads=torch.get_num_threads()),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      remoe_engine=remoe_engine.__version__),
        model="built-in tiny (zoo)", results=RESULTS)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
