"""The "previous" reuse bias at prefill: one route_topk_previous call against the per-position loop
the router ran before (issue 19, item 5).

Providers:
  loop   what the router did: per position, a prefer mask from the previous position's ids
         (zeros + scatter) and one route_topk call: about 5 launches per position on a GPU.
  remoe  remoe_engine.ops.route_topk_previous: the whole recurrence in one call (CUDA: one warp
         walks a sequence).

Shapes: one sequence of S in {512, 4096} positions, E in {64, 128} experts, K = 8, bias 0.05
(and E = 512, K = 22 in bf16 on a GPU). Both give the same ids and weights, checked once before
timing.

Run:  pytest bench/bench_route_previous.py --benchmark-json=/tmp/prev.json
      python bench/report.py /tmp/prev.json --baseline loop \
          --out bench/results/prefill-previous-cpu-D.json
"""

from __future__ import annotations

import pytest
import torch

from remoe_engine import ops


def loop(logits, top_k, reuse_bias):
    """The router's former per-position loop (router._route_with_previous before issue 19)."""
    B, S, E = logits.shape
    weights = logits.new_empty(B, S, top_k, dtype=torch.float32)
    ids = torch.empty(B, S, top_k, dtype=torch.int64, device=logits.device)
    previous = None
    for s in range(S):
        if previous is None:
            w, i = ops.route_topk(logits[:, s], top_k)
        else:
            prefer = torch.zeros(B, E, dtype=torch.bool, device=logits.device)
            prefer.scatter_(1, previous, True)
            w, i = ops.route_topk(logits[:, s], top_k, prefer=prefer, reuse_bias=reuse_bias)
        weights[:, s], ids[:, s] = w, i
        previous = i
    return weights, ids


def remoe(logits, top_k, reuse_bias):
    return ops.route_topk_previous(logits, top_k, reuse_bias=reuse_bias)


PROVIDERS = {"loop": loop, "remoe": remoe}


def _run(benchmark, device, provider, S, E, K, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, S, E, generator=gen).to(dtype).to(device)
    fn = PROVIDERS[provider]
    want = loop(logits, K, 0.05)
    got = fn(logits, K, 0.05)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])

    def timed():
        out = fn(logits, K, 0.05)
        if device == "cuda":
            torch.cuda.synchronize()  # the kernel, not just its launch
        return out

    benchmark.group = f"{device} S={S} E={E} K={K} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(provider=provider, device=device, S=S, E=E, K=K,
                                dtype=str(dtype).removeprefix("torch."),
                                positions_per_s=None)
    benchmark.pedantic(timed, rounds=7, warmup_rounds=1)
    benchmark.extra_info["positions_per_s"] = S / benchmark.stats.stats.median


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("S", [512, 4096])
def test_prefill_previous_cpu(benchmark, provider, S, E):
    _run(benchmark, "cpu", provider, S, E, 8, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("S,E,K", [(512, 128, 8), (4096, 512, 22)])
def test_prefill_previous_cuda(benchmark, provider, S, E, K):
    _run(benchmark, "cuda", provider, S, E, K, torch.bfloat16)
