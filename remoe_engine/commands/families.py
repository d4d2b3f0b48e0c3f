"""`remoe families`: which MoE families of the installed transformers remoe-engine runs exactly."""

from __future__ import annotations

import argparse
import json
import os

from remoe_engine.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "families", help="check every MoE family of the installed transformers",
        description="For every model type of the installed transformers whose experts go through "
        "ExpertsInterface, build a tiny random model from its config and check that patch() (at "
        "a full cache and at slots_per_layer = top_k) and load() give the same fp32 logits and "
        "greedy tokens as transformers. Prints one line per model type: exact (route_topk "
        "reproduces its router, so the reuse bias is available), exact, no bias (its router runs "
        "as it is), refused (with the reason), WRONG (a bug) or not built (no tiny model of that "
        "type runs here, with the reason). Takes a few minutes on a CPU.",
    )
    parser.add_argument("model_types", nargs="*", metavar="MODEL_TYPE",
                        help="check only these model types (default: all)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default=None,
                        help="also write the results as JSON, with the date and versions (how "
                             "bench/results/families-*.json, the README's table, is made)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from remoe_engine import coverage
    from remoe_engine.families import experts_interface_model_types

    known = experts_interface_model_types()
    unknown = [t for t in args.model_types if t not in known]
    if unknown:
        raise CommandError(f"{unknown[0]!r} is not a model type whose experts go through "
                           f"ExpertsInterface in this transformers ({len(known)} are)")
    results = coverage.check_all(args.model_types or None,
                                 progress=not args.no_progress and not args.json)
    if args.out is not None:
        _write(results, args.out)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(coverage.format_table(results))
    return 1 if any(r.outcome == "WRONG" for r in results) else 0


def _write(results, path: str) -> None:
    import datetime
    import platform

    import torch
    import transformers

    doc = dict(date=datetime.date.today().isoformat(), command="remoe families --out " + path,
               versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                             python=platform.python_version()),
               results=[r.to_dict() for r in results])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
