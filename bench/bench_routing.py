"""Routing latency: the fused route_topk op against plain PyTorch.

Providers:
  torch      what a user would otherwise write (transformers' router math): fp32 softmax, the
             reuse bias added to preferred experts, topk, gather the unbiased weights, renormalize.
  reference  remoe_engine.reference.route_topk: the golden function with the full contract
             (stable ranking, NaN rule); the issue's targets are stated against it.
  remoe      remoe_engine.ops.route_topk, the fused kernel.

Shapes: decode T in {1, 8}, prefill T in {512, 4096}; E in {60, 64, 128, 256}; K in {4, 6, 8};
the reuse bias is on (prefer = a resident set of E/4 experts), plus a bias-free control.

Run:  pytest bench/bench_routing.py --benchmark-json=/tmp/routing.json
      python bench/report.py /tmp/routing.json --baseline reference --out bench/results/...
"""

from __future__ import annotations

import pytest
import torch

from remoe_engine import ops
from remoe_engine import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _synced(fn, device):
    """GPU timings must include the kernel, not just its launch."""
    if device == "cpu":
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def torch_routing(logits, top_k, prefer, reuse_bias):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    select = probs + reuse_bias * prefer if prefer is not None else probs
    ids = torch.topk(select, top_k, dim=-1).indices  # [T, K]
    weights = probs.gather(-1, ids)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def ref_routing(logits, top_k, prefer, reuse_bias):
    return ref.route_topk(logits, top_k, prefer=prefer, reuse_bias=reuse_bias)


def remoe_routing(logits, top_k, prefer, reuse_bias):
    return ops.route_topk(logits, top_k, prefer=prefer, reuse_bias=reuse_bias)


PROVIDERS = {"torch": torch_routing, "reference": ref_routing, "remoe": remoe_routing}


def _inputs(T, E, device):
    gen = torch.Generator().manual_seed(T + E)
    logits = (torch.randn(T, E, generator=gen) * 2).to(device)
    prefer = torch.zeros(E, dtype=torch.bool)
    prefer[torch.randperm(E, generator=gen)[: E // 4]] = True
    return logits, prefer.to(device)


def _run(benchmark, device, provider, T, E, K, reuse_bias):
    logits, prefer = _inputs(T, E, device)
    prefer_arg = prefer if reuse_bias else None
    fn = PROVIDERS[provider]
    # Correctness once before timing: every provider picks the reference's experts.
    w, ids = fn(logits, K, prefer_arg, reuse_bias)
    rw, rids = ref_routing(logits, K, prefer_arg, reuse_bias)
    assert torch.equal(ids.sort(-1).values, rids.sort(-1).values)
    benchmark.group = f"{device} T={T} E={E} K={K} bias={reuse_bias}"
    benchmark.extra_info.update(provider=provider, device=device, T=T, E=E, K=K,
                                reuse_bias=reuse_bias,
                                phase="decode" if T <= 8 else "prefill",
                                threads=torch.get_num_threads())
    benchmark(_synced(fn, device), logits, K, prefer_arg, reuse_bias)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("K", [4, 6, 8])
@pytest.mark.parametrize("E", [60, 64, 128, 256])
@pytest.mark.parametrize("T", [1, 8, 512, 4096])
@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_with_bias(benchmark, device, provider, T, E, K):
    _run(benchmark, device, provider, T, E, K, reuse_bias=0.05)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("E,K", [(64, 6), (256, 8)])
@pytest.mark.parametrize("T", [1, 8, 512, 4096])
@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_no_bias(benchmark, device, provider, T, E, K):
    _run(benchmark, device, provider, T, E, K, reuse_bias=0.0)
