"""`remoe run`: the whole story on one model (by default the built-in one).

An MoE model generates with its experts streamed from disk under a memory budget that holds about
a quarter of them, in up to five configurations: the original router, the ReMoE router delta
shipped with the model ("remoe"), each with the cache-aware reuse bias ("+bias"), and the learned
reuse bias shipped with the model ("learned", trained by remoe finetune --learn-bias). Every
configuration then decodes the same held-out tokens one at a time, interleaved with a copy that
holds every expert (the compute floor), and a table compares tokens/s, TPOT next to its floor,
hit rate, bytes read per token, perplexity, expert reuse (EOR) and top-k agreement with the
original router. `--quantize SCHEME[,SCHEME...]` adds a row per compressed expert scheme (the
original router, experts packed with `remoe pack --quantize SCHEME`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from remoe_engine.cli import CommandError, checked_model_dir, finite_nonnegative, memory_budget

# A model folder's shipped learned reuse bias (a router delta with strengths), for the "learned"
# row of remoe run.
LEARNED_DELTA_NAME = "reuse-bias-delta.safetensors"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="generate with experts streamed from disk and compare routers",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory of a supported MoE family "
                             "(default: the built-in model)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--memory-budget", default=None,
                      help="bytes for the expert pool, e.g. 4MiB (default: a quarter of the "
                           "experts)")
    size.add_argument("--slots-per-layer", type=int, default=None,
                      help="expert slots per MoE layer instead of a budget")
    parser.add_argument("--policy", choices=["lru", "lfu"], default="lru",
                        help="eviction policy (lru)")
    parser.add_argument("--reuse-bias", type=finite_nonnegative, default=None,
                        help="cache-aware routing bias of the +bias rows (default: the model "
                             "card's recommendation, 0.02 for the built-in model, else 0.05); "
                             "0 drops those rows")
    parser.add_argument("--bias-source", choices=["previous", "resident"], default=None,
                        help="experts the bias prefers: the pool's (resident) or the previous "
                             "token's (default: the model card's recommendation, else resident)")
    parser.add_argument("--router-delta", default=None,
                        help="ReMoE router delta (.safetensors); default: the model's "
                             "router-delta.safetensors if present; 'none' to skip")
    parser.add_argument("--learned-delta", default=None,
                        help="router delta with a learned reuse bias (remoe finetune "
                             "--learn-bias) for the 'learned' row; default: the model's "
                             f"{LEARNED_DELTA_NAME} if present; 'none' to skip")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--prompt", default=None, help="generation prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="tokens each configuration generates from the prompt (48)")
    parser.add_argument("--eval-tokens", type=int, default=256,
                        help="held-out tokens every configuration decodes for the table (256; "
                             "without held-out text: the prompt and the original router's "
                             "output)")
    parser.add_argument("--eval-text", default=None,
                        help="text file for the held-out evaluation (default: the model's "
                             "shipped held-out slice)")
    parser.add_argument("--prefetch", action="store_true",
                        help="at decode, start reading the next MoE layer's likely experts early "
                        "(off by default: it reads more bytes than it saves on the built-in "
                        "model; see bench/bench_prefetch.py)")
    parser.add_argument("--quantize", default=None, metavar="SCHEMES",
                        help="comma-separated compressed expert schemes, one more row each "
                        "(original router, experts packed compressed): int8, int8:gN, int4:gN, "
                        "int4:gN+hqq, fp8, mxfp4, bf16")
    parser.add_argument("--slot-format", default="auto",
                        choices=["auto", "compressed", "dequantized", "both"],
                        help="what the --quantize rows' slots hold: the compressed blobs "
                        "(computed from directly; a budget holds more experts), the experts "
                        "dequantized into float32 on every load, both (two rows per scheme), or "
                        "auto (load()'s default: compressed on the CPU)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", default=None,
                        help="also write the report as JSON to this file, with the date, the "
                             "machine, the versions and the command line (how the README's "
                             "bench/results/run-cpu-*.json are made)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _recommended(model_dir: str) -> tuple[float, str]:
    """The reuse bias and source the model card's evidence recommends (card.json "remoe"),
    else 0.05 and "resident"."""
    path = os.path.join(model_dir, "card.json")
    try:
        with open(path) as f:
            section = json.load(f)["remoe"]
        return (float(section["recommended_reuse_bias"]),
                str(section.get("recommended_bias_source", "resident")))
    except (OSError, KeyError, TypeError, ValueError):
        return 0.05, "resident"


def _write_report(report: dict, path: str) -> None:
    """The report and where it came from, written to a temporary name first."""
    import datetime
    import platform

    import torch
    import transformers

    threads = os.environ.get("OMP_NUM_THREADS")
    doc = dict(report, command=" ".join(
        ([f"OMP_NUM_THREADS={threads}"] if threads else []) + ["remoe", *sys.argv[1:]]),
        date=datetime.date.today().isoformat(),
        machine=dict(node=platform.node(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                     python=platform.python_version()),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    model_dir = checked_model_dir(args.model)
    budget = memory_budget(args.memory_budget)
    if args.slots_per_layer is not None and args.slots_per_layer < 1:
        raise CommandError(f"--slots-per-layer must be >= 1, got {args.slots_per_layer}")
    if args.max_new_tokens < 2:
        raise CommandError(f"--max-new-tokens must be >= 2, got {args.max_new_tokens}")
    if args.eval_tokens < 2:
        raise CommandError(f"--eval-tokens must be >= 2, got {args.eval_tokens}")
    if args.router_delta not in (None, "none") and not os.path.isfile(args.router_delta):
        raise CommandError(f"--router-delta {args.router_delta}: no such file")
    if args.learned_delta not in (None, "none") and not os.path.isfile(args.learned_delta):
        raise CommandError(f"--learned-delta {args.learned_delta}: no such file")
    if args.eval_text is not None and not os.path.isfile(args.eval_text):
        raise CommandError(f"--eval-text {args.eval_text}: no such file")
    schemes = ()
    if args.quantize:
        from remoe_engine.quant import parse_scheme

        try:
            schemes = tuple(parse_scheme(s).name for s in args.quantize.split(",") if s.strip())
        except ValueError as error:
            raise CommandError(str(error)) from None
    progress = not args.no_progress and not args.json
    if progress:  # importing torch and transformers takes seconds: say something first
        print(f"remoe run: {model_dir}", file=sys.stderr, flush=True)

    import torch

    from remoe_engine.compare import DEFAULT_PROMPT, RunSettings, format_table
    from remoe_engine.compare import run as run_report

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda asked for, but no CUDA GPU is visible")
    recommended_bias, recommended_source = _recommended(model_dir)
    delta = args.router_delta
    if delta is None:
        shipped = os.path.join(model_dir, "router-delta.safetensors")
        delta = shipped if os.path.exists(shipped) else None
    elif delta == "none":
        delta = None
    learned = args.learned_delta
    if learned is None:
        shipped = os.path.join(model_dir, LEARNED_DELTA_NAME)
        learned = shipped if os.path.exists(shipped) else None
    elif learned == "none":
        learned = None
    if learned is not None:
        from remoe_engine.finetune.delta import read_learned_bias

        try:
            if read_learned_bias(learned) is None:
                raise CommandError(f"--learned-delta {learned}: the delta has no learned reuse "
                                   "bias (use --router-delta for router weights alone)")
        except ValueError as e:
            raise CommandError(f"--learned-delta {learned}: {e}") from None
    settings = RunSettings(
        model=model_dir, memory_budget=budget, slots_per_layer=args.slots_per_layer,
        policy=args.policy,
        reuse_bias=recommended_bias if args.reuse_bias is None else args.reuse_bias,
        bias_source=recommended_source if args.bias_source is None else args.bias_source,
        router_delta=delta, learned_delta=learned, device=args.device,
        prompt=args.prompt if args.prompt is not None else DEFAULT_PROMPT,
        max_new_tokens=args.max_new_tokens, eval_tokens=args.eval_tokens,
        eval_text=args.eval_text, progress=progress, prefetch=args.prefetch, quantize=schemes,
        slot_format=args.slot_format)
    log = (lambda line: print(f"remoe run: {line}", file=sys.stderr, flush=True)) if progress \
        else (lambda line: None)
    try:
        report = run_report(settings, log=log)
    except (NotImplementedError, ValueError, OSError) as error:
        raise CommandError(str(error).splitlines()[0]) from None
    if args.out is not None:
        _write_report(report, args.out)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    budget_text = (f"{report['memory_budget'] / 2**20:.2f} MiB of "
                   f"{report['expert_bytes'] / 2**20:.2f} MiB of experts"
                   if report["memory_budget"] else f"{args.slots_per_layer} slots per layer")
    print(f"model: {model_dir}")
    print(f"experts streamed from disk ({'O_DIRECT' if report['o_direct'] else 'buffered'}, "
          f"{report['read_bandwidth_gbps']:.2f} GB/s measured) under {budget_text}, "
          f"{report['policy'].upper()}")
    first = report["rows"][0]
    print(f"\n{settings.prompt}{first['text']}\n")
    print(format_table(report))
    print(f"\nall rows: {report['eval_tokens'] - 1} tokens decoded one at a time with the KV "
          f"cache ({report['eval_source']}); compute floor {report['compute_floor_ms']:.2f} ms")
    return 0
