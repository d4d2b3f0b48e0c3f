"""Cache-simulator replay throughput: (token, layer, expert) accesses per second, per policy.

Traces: synthetic routing with realistic locality (`remoe_engine.trace.synthetic`: AR(1) router
logits plus Zipf expert popularity, EOR about 0.4 as on real text), shaped like
DeepSeek-V2-Lite (26 MoE layers, 64 experts, top-6):
  small  ~1e5 accesses (641 tokens)
  large  ~1e7 accesses (64,103 tokens)

Providers:
  python  what a user would otherwise write: an OrderedDict LRU per layer (small trace only;
          about 1e6 accesses/s, so the large trace would take seconds per size).
  remoe   remoe_engine.sim: the C++ replay kernel (one cache size per call, layers in parallel),
          and `lru-all` = LRU stack distances, which give every cache size in one pass.

Each case checks its hits against another implementation once, then times; `extra_info`
records accesses/s, the hit rate and the thread count.

Run:  pytest bench/bench_sim.py --benchmark-json=/tmp/sim.json
      python bench/report.py /tmp/sim.json --baseline python --out bench/results/...
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from remoe_engine import sim
from remoe_engine.trace import synthetic

LAYERS, EXPERTS, TOP_K = 26, 64, 6
SLOTS = 16  # per layer: a quarter of the experts
SWEEP = [6, 8, 12, 16, 24, 32, 48, 64]
TOKENS = {"small": 641, "large": 64_103}


@pytest.fixture(scope="module", params=list(TOKENS))
def trace(request):
    return request.param, synthetic(TOKENS[request.param], layers=LAYERS, experts=EXPERTS,
                                     top_k=TOP_K, seed=0)


def python_lru_hits(ids: torch.Tensor, slots: int) -> int:
    """Per-layer LRU over ids [L, N, K] with the pool's pinning, in plain Python."""
    hits = 0
    for layer in ids.tolist():
        cache: OrderedDict[int, None] = OrderedDict()  # least recent first
        for experts in layer:
            hits += sum(e in cache for e in experts)
            for e in experts:
                if e in cache:
                    cache.move_to_end(e)
                    continue
                if len(cache) == slots:
                    victim = next(k for k in cache if k not in experts)
                    del cache[victim]
                cache[e] = None
    return hits


def _group(benchmark, name, trace, policy):
    # One group per (trace, policy), so bench/report.py sets python and remoe side by side.
    # pytest-benchmark reads the group when timing starts: set it first.
    benchmark.group = f"{name} {policy} ({trace.num_accesses:.0e} accesses)"


def _record(benchmark, name, trace, policy, provider, hit_rate, sizes=1):
    # accesses/s counts every replayed access: a sweep of S sizes replays the trace S times.
    benchmark.extra_info.update(
        provider=provider, policy=policy, trace=name, accesses=trace.num_accesses,
        cache_sizes=sizes, threads=torch.get_num_threads(), hit_rate=hit_rate,
        accesses_per_s=round(trace.num_accesses * sizes / benchmark.stats.stats.median),
    )


@pytest.mark.parametrize("policy", ["lru", "lfu", "opt"])
def test_replay_one_size(benchmark, trace, policy):
    name, tr = trace
    requests = sim.requests_of(tr, "layer")
    hits = sim.simulate_cache(requests, [SLOTS], policy)
    if policy == "lru":  # correctness once: the direct replay agrees with stack distances
        assert torch.equal(hits, sim.lru_sweep(requests, [SLOTS]))
    _group(benchmark, name, tr, policy)
    benchmark.pedantic(sim.simulate_cache, (requests, [SLOTS], policy), rounds=3,
                       warmup_rounds=1)
    _record(benchmark, name, tr, policy, "remoe", round(int(hits.sum()) / tr.num_accesses, 4))


def test_replay_global_scope(benchmark, trace):
    name, tr = trace
    requests = sim.requests_of(tr, "global")
    hits = sim.simulate_cache(requests, [SLOTS * LAYERS], "lru")
    _group(benchmark, name, tr, "lru-global")
    benchmark.pedantic(sim.simulate_cache, (requests, [SLOTS * LAYERS], "lru"), rounds=3,
                       warmup_rounds=1)
    _record(benchmark, name, tr, "lru-global", "remoe",
            round(int(hits.sum()) / tr.num_accesses, 4))


def test_lru_every_size_in_one_pass(benchmark, trace):
    name, tr = trace
    requests = sim.requests_of(tr, "layer")
    hits = sim.lru_sweep(requests, SWEEP)
    assert torch.equal(hits, sim.simulate_cache(requests, SWEEP, "lru"))
    _group(benchmark, name, tr, "lru-all")
    benchmark.pedantic(sim.lru_sweep, (requests, SWEEP), rounds=3, warmup_rounds=1)
    rates = [round(int(h.sum()) / tr.num_accesses, 4) for h in hits]
    _record(benchmark, name, tr, "lru-all", "remoe", rates, sizes=len(SWEEP))


def test_python_lru_baseline(benchmark, trace):
    name, tr = trace
    if name != "small":
        pytest.skip("the pure-Python baseline takes seconds per size on the large trace")
    hits = python_lru_hits(tr.ids, SLOTS)
    assert hits == int(sim.simulate_cache(tr.ids, [SLOTS], "lru").sum())
    _group(benchmark, name, tr, "lru")
    benchmark.pedantic(python_lru_hits, (tr.ids, SLOTS), rounds=3, warmup_rounds=0)
    _record(benchmark, name, tr, "lru", "python", round(hits / tr.num_accesses, 4))
