"""`remoe simulate`: replay routing traces through expert caches (LRU, LFU, Belady/OPT)."""

from __future__ import annotations

import argparse
import json
import pathlib

from remoe_engine.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remoe simulate`.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    parser = subparsers.add_parser(
        "simulate", help="replay routing traces through LRU, LFU and Belady-optimal caches",
        description="Replay one or two routing traces (from `remoe trace`) through expert caches "
        "at many sizes, token by token as at decode, and report hits, misses, bytes fetched "
        "per token and the transfer floor on time per output token (misses x bytes per expert "
        "/ bandwidth). A token's experts of a layer are pinned together, so sizes start at "
        "top-k. Two traces (e.g. the original and a fine-tuned router) share one figure.",
    )
    parser.add_argument("traces", type=pathlib.Path, nargs="+", metavar="TRACE",
                        help="one or two trace files (.safetensors or .npz)")
    parser.add_argument("--label", action="append", default=None,
                        help="name of each trace in the table and the plot, in order "
                        "(default: the file name)")
    parser.add_argument("--policy", default="lru,lfu,opt",
                        help="comma-separated policies from lru, lfu, opt (all three)")
    parser.add_argument("--slots", default=None, metavar="SPEC",
                        help="cache sizes: a list '4,8,16', a range 'A:B' or 'A:B:STEP' "
                        "(inclusive), or a mix; slots per layer for --scope layer, in total for "
                        "--scope global (default: powers of two from top-k up to the experts "
                        "per layer, times the layer count for global)")
    parser.add_argument("--scope", choices=("layer", "global"), default="layer",
                        help="a cache per MoE layer, or one shared by all layers (layer)")
    parser.add_argument("--flush-between-sequences", action="store_true",
                        help="start every sequence of the trace from an empty cache (default: "
                        "one cache across all sequences, as a server's pool keeps its experts "
                        "between requests)")
    parser.add_argument("--bytes-per-expert", type=int, default=None, metavar="BYTES",
                        help="bytes fetched per miss (default: from the trace, when recorded)")
    parser.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                        help="link bandwidth for the time-per-token floor, e.g. 25 for PCIe "
                        "Gen4 x16, 7 for NVMe Gen4")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of a table")
    parser.add_argument("--plot", type=pathlib.Path, default=None, metavar="PNG",
                        help="write a hit rate vs cache size figure")
    parser.set_defaults(func=run)


def parse_slots(spec: str) -> list[int]:
    """Cache sizes from '4,8,16', 'A:B', 'A:B:STEP' or a comma-separated mix.

    Args:
        spec: the --slots value.

    Returns:
        Sorted distinct sizes.

    Raises:
        CommandError: for anything that is not such a list of positive integers.
    """
    sizes: set[int] = set()
    try:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            if ":" in item:
                bounds = [int(x) for x in item.split(":")]
                if len(bounds) not in (2, 3) or (len(bounds) == 3 and bounds[2] < 1):
                    raise ValueError(item)
                start, stop, step = bounds[0], bounds[1], bounds[2] if len(bounds) == 3 else 1
                if stop < start:
                    raise ValueError(item)
                sizes.update(range(start, stop + 1, step))
            else:
                sizes.add(int(item))
    except ValueError:
        raise CommandError(f"--slots {spec!r}: expected sizes like '4,8,16', '4:64' or "
                           "'4:64:4'") from None
    if not sizes or min(sizes) < 1:
        raise CommandError(f"--slots {spec!r}: sizes must be positive integers")
    return sorted(sizes)


def default_slots(top_k: int, num_experts: int, layers: int, scope: str) -> list[int]:
    """Powers of two from top-k up to E (and E itself), times L for a global cache."""
    sizes = {top_k, num_experts}
    size = 1
    while size < num_experts:
        if size > top_k:
            sizes.add(size)
        size *= 2
    scale = layers if scope == "global" else 1
    return sorted(s * scale for s in sizes)


def _format_table(entries: list[dict]) -> str:
    lines = []
    for entry in entries:
        meta, reuse = entry["meta"], entry["eor"]
        about = (f"  model {meta['model'] or '?'} ({meta['model_type'] or meta['mode']}), router "
                 f"{meta['router_hash'] or '-'}, {entry['tokens']} tokens in "
                 f"{entry['sequences']} sequences, {len(meta['layers'])} MoE layers, "
                 f"top-{meta['top_k']} of {meta['num_experts']}")
        if reuse is not None:
            about += f", EOR {reuse['eor']:.3f}"
        lines += [f"{entry['label']}: {entry['path']}", about]
        header = (f"  {'policy':<6} {'slots':>6} {'hit rate':>8} {'hits':>10} {'misses':>10} "
                  f"{'miss/tok':>8} {'p90':>6}")
        first = entry["results"][0]
        if first["bytes_per_token"] is not None:
            header += f" {'MB/tok':>8}"
        if first["tpot_floor_ms"] is not None:
            header += f" {'floor ms':>9} {'p90 ms':>8}"
        lines.append(header)
        for r in entry["results"]:
            row = (f"  {r['policy']:<6} {r['slots']:>6} {r['hit_rate']:>8.3f} {r['hits']:>10} "
                   f"{r['misses']:>10} {r['misses_per_token']:>8.2f} "
                   f"{r['misses_per_token_p90']:>6.1f}")
            if r["bytes_per_token"] is not None:
                row += f" {r['bytes_per_token'] / 1e6:>8.3f}"
            if r["tpot_floor_ms"] is not None:
                row += f" {r['tpot_floor_ms']:>9.3f} {r['tpot_floor_p90_ms']:>8.3f}"
            lines.append(row)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if len(args.traces) > 2:
        raise CommandError(f"give one or two traces, got {len(args.traces)}")
    labels = args.label or []
    if len(labels) > len(args.traces):
        raise CommandError(f"{len(labels)} --label for {len(args.traces)} trace(s)")
    labels += [p.stem for p in args.traces[len(labels):]]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    policies = [p.strip().lower() for p in args.policy.split(",") if p.strip()]

    from remoe_engine import metrics, sim, trace

    if not policies or any(p not in sim.POLICIES for p in policies):
        raise CommandError(f"--policy {args.policy!r}: choose from {', '.join(sim.POLICIES)}")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise CommandError(f"--bandwidth must be > 0 GB/s, got {args.bandwidth}")
    if args.bytes_per_expert is not None and args.bytes_per_expert < 1:
        raise CommandError(f"--bytes-per-expert must be >= 1, got {args.bytes_per_expert}")
    if args.plot is not None and not args.plot.parent.is_dir():
        raise CommandError(f"--plot {args.plot}: directory {args.plot.parent} does not exist")
    try:
        traces = [trace.load(p) for p in args.traces]
    except trace.TraceFileError as error:
        raise CommandError(str(error)) from None
    for path, tr in zip(args.traces, traces, strict=True):
        if tr.num_tokens == 0:  # every rate would be 0/0
            raise CommandError(f"{path}: the trace holds no tokens; nothing to replay")
    first = traces[0]
    slots = (parse_slots(args.slots) if args.slots else
             default_slots(first.top_k, first.num_experts, first.num_layers, args.scope))

    flush = "sequence" if args.flush_between_sequences else "never"
    entries, series = [], []
    for path, label, tr in zip(args.traces, labels, traces, strict=True):
        try:
            results = sim.sweep(tr, policies, slots, scope=args.scope,
                                bytes_per_expert=args.bytes_per_expert,
                                bandwidth_gbps=args.bandwidth, flush=flush)
        except ValueError as error:
            raise CommandError(f"{path}: {error}") from None
        try:
            reuse = metrics.expert_reuse(tr).to_dict()
        except ValueError:  # no two consecutive tokens: nothing to report, not an error
            reuse = None
        entries.append({
            "label": label, "path": str(path), "meta": tr.meta.to_dict(),
            "tokens": tr.num_tokens, "sequences": tr.num_sequences, "eor": reuse,
            "results": [r.to_dict() for r in results],
        })
        series.append((label, results))
    report = {"scope": args.scope, "flush": flush, "policies": policies, "slots": slots,
              "bandwidth_gbps": args.bandwidth, "traces": entries}
    if len(traces) == 2:
        try:
            report["agreement"] = metrics.router_agreement(traces[0], traces[1]).to_dict()
        except ValueError:  # traces of different tokens: hit rates compare, routers do not
            report["agreement"] = None

    if args.plot is not None:
        model = first.meta.model or first.meta.model_type or "trace"
        sim.plot_hit_rates(
            series,
            args.plot,
            title=f"{model}: hit rate vs cache size ({args.scope} scope, "
                  + ("cache emptied per sequence, " if flush == "sequence" else "")
                  + f"top-{first.top_k} of {first.num_experts}, {first.num_tokens} tokens)",
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format_table(entries))
        if report.get("agreement"):
            a = report["agreement"]
            kl = f", KL {a['kl']:.4f} nats" if a["kl"] is not None else ""
            print(f"router agreement of {labels[1]} with {labels[0]}: top-k "
                  f"{a['topk_agreement']:.3f}{kl}")
        if args.plot is not None:
            print(f"wrote {args.plot}")
    return 0
