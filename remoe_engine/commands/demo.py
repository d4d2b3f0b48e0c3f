"""`remoe demo`: routing with and without the cache-aware reuse bias, on random router logits.

The op alone, without a model (`remoe run` tells the whole story on a real one): the fused op
chooses experts for a stream of tokens, and a reuse bias toward the previous token's experts
raises expert reuse (fewer fetches) while the returned weights stay unbiased.
"""

from __future__ import annotations

import argparse
import time

from remoe_engine.cli import finite_nonnegative


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="route a token stream with and without the reuse bias",
        description="Route a stream of correlated random router logits with the fused "
        "route_topk op, with and without a reuse bias toward the previous token's experts, and "
        "report expert reuse between consecutive tokens and the op's latency.",
    )
    parser.add_argument("--tokens", type=int, default=256, help="tokens in the stream (256)")
    parser.add_argument("--experts", type=int, default=64, help="routed experts E (64)")
    parser.add_argument("--top-k", type=int, default=6, help="experts per token K (6)")
    parser.add_argument("--reuse-bias", type=finite_nonnegative, default=0.05,
                        help="bias added to the previous token's experts' probability (0.05)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.set_defaults(func=run)


def _stream(tokens: int, experts: int, seed: int, device: str):
    import torch

    # An AR(1) stream: consecutive tokens have related router logits, as in real text.
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(tokens, experts)
    state = torch.randn(experts, generator=gen)
    for t in range(tokens):
        state = 0.8 * state + 0.6 * torch.randn(experts, generator=gen)
        logits[t] = 2.0 * state
    return logits.to(device)


def run(args: argparse.Namespace) -> int:
    import torch

    from remoe_engine import metrics, ops
    from remoe_engine.cli import CommandError
    from remoe_engine.trace import RoutingTrace, TraceMeta

    if not 1 <= args.top_k <= args.experts:
        raise CommandError(f"--top-k must be in [1, --experts={args.experts}], got {args.top_k}")
    if args.tokens < 2:
        raise CommandError(f"--tokens must be at least 2, got {args.tokens}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda asked for, but no CUDA GPU is visible")

    logits = _stream(args.tokens, args.experts, args.seed, args.device)
    print(f"route_topk on {args.tokens} tokens, E={args.experts}, K={args.top_k}, "
          f"device={args.device}, CUDA kernels built: {ops.cuda_kernels_built()}")
    print(f"{'reuse bias':>10}  {'reuse (EOR)':>11}  {'top-k agreement':>15}  {'us/token':>8}")
    meta = TraceMeta(top_k=args.top_k, num_experts=args.experts, layers=[0], mode="synthetic",
                     source="remoe demo: an AR(1) stream of random router logits")
    baseline = None
    for bias in (0.0, args.reuse_bias):
        prefer = torch.zeros(args.experts, dtype=torch.bool, device=args.device)
        chosen = []
        start = time.perf_counter()
        for t in range(args.tokens):  # token by token, as at decode
            _, ids = ops.route_topk(logits[t : t + 1], args.top_k, prefer=prefer, reuse_bias=bias)
            prefer = torch.zeros_like(prefer).index_fill_(0, ids[0], True)
            chosen.append(ids[0])
        elapsed = time.perf_counter() - start
        routing = RoutingTrace(ids=torch.stack(chosen).cpu()[None],
                               offsets=torch.tensor([0, args.tokens]), meta=meta)
        if baseline is None:
            baseline = routing
        reuse = metrics.expert_reuse(routing).eor
        agreement = metrics.router_agreement(baseline, routing).topk_agreement
        print(f"{bias:>10.3f}  {reuse:>11.3f}  {agreement:>15.3f}  "
              f"{elapsed / args.tokens * 1e6:>8.1f}")
    return 0
