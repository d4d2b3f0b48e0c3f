"""`remoe serve`: an OpenAI-compatible server over one model whose experts stream from disk."""

from __future__ import annotations

import argparse
import os
import sys

from remoe_engine.cli import CommandError, checked_model_dir, finite_nonnegative, memory_budget


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Load a model with its experts streamed from disk (the built-in model by "
        "default) and serve /v1/completions and /v1/chat/completions (streaming or not), "
        "/v1/models, /health and /metrics (Prometheus). Concurrent requests each get the tokens "
        "they would get alone. Needs `pip install \"remoe-engine[serve]\"` (FastAPI, uvicorn).",
    )
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory (default: the built-in model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--memory-budget", default=None,
                      help="bytes for the expert pool, e.g. 4MiB (default: every expert fits)")
    size.add_argument("--slots-per-layer", type=int, default=None,
                      help="expert slots per MoE layer instead of a budget")
    parser.add_argument("--policy", choices=["lru", "lfu"], default="lru",
                        help="eviction policy (lru)")
    parser.add_argument("--reuse-bias", type=finite_nonnegative, default=0.0,
                        help="cache-aware routing bias (0: exact routing)")
    parser.add_argument("--bias-source", choices=["previous", "resident"], default="previous",
                        help="experts the bias prefers (previous: the sequence's previous token; "
                             "resident: the pool's, which other requests change)")
    parser.add_argument("--router-delta", default=None,
                        help="a ReMoE router delta (.safetensors) to apply")
    parser.add_argument("--packed", default=None, metavar="FILE",
                        help="read the experts from this `remoe pack` file (e.g. written with "
                        "--quantize int4:g64) instead of the checkpoint")
    parser.add_argument("--slot-format", choices=["auto", "compressed", "dequantized"],
                        default="auto",
                        help="for compressed experts, what a pool slot holds: the compressed "
                        "blob (more experts per budget; the CPU default) or the expert "
                        "dequantized into float32 on every load")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--name", default=None,
                        help="the model id clients send (default: the folder's name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from remoe_engine.serve import Engine, build_app
    except ImportError as error:
        raise CommandError(f"remoe serve needs FastAPI and uvicorn ({error}): "
                           "pip install \"remoe-engine[serve]\"") from None
    import torch
    from transformers import AutoTokenizer

    import remoe_engine

    model_dir = checked_model_dir(args.model)
    budget = memory_budget(args.memory_budget)
    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be in [1, 65535], got {args.port}")
    if args.packed is not None and not os.path.isfile(args.packed):
        raise CommandError(f"--packed {args.packed}: no such file")
    print(f"remoe serve: loading {model_dir}", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = remoe_engine.load(model_dir, memory_budget=budget,
                                  slots_per_layer=args.slots_per_layer, policy=args.policy,
                                  reuse_bias=args.reuse_bias, bias_source=args.bias_source,
                                  device=args.device, dtype=torch.float32, packed=args.packed,
                                  slot_format=args.slot_format)
        if args.router_delta:
            remoe_engine.apply_router_delta(model, args.router_delta)
    except (NotImplementedError, ValueError, OSError) as error:
        raise CommandError(str(error).splitlines()[0]) from None
    name = args.name or os.path.basename(os.path.normpath(model_dir))
    app = build_app(Engine(model, tokenizer, name))
    print(f"remoe serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
