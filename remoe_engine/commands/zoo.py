"""`remoe zoo`: the built-in models (train one, find a shipped one)."""

from __future__ import annotations

import argparse
import pathlib

from remoe_engine.cli import CommandError

# Options whose value, when not given, comes from the preset (full run or --tiny).
_SHAPE_OPTIONS = [
    ("--steps", int, "optimizer steps, the schedule's length (default 2500; --tiny: 30)"),
    ("--layers", int, "decoder layers, all MoE (default 4)"),
    ("--experts", int, "routed experts per layer (default 32)"),
    ("--top-k", int, "experts per token (default 4)"),
    ("--hidden", int, "hidden size (default 128)"),
    ("--moe-intermediate", int, "expert intermediate size (default 64)"),
    ("--heads", int, "attention heads (default 4)"),
    ("--kv-heads", int, "key/value heads (default 2)"),
    ("--head-dim", int, "attention head dimension (default 32)"),
    ("--vocab", int, "BPE vocabulary size (default 4096)"),
    ("--seq-len", int, "training window length in tokens (default 256)"),
    ("--batch", int, "windows per step (default 8)"),
    ("--lr", float, "peak AdamW learning rate (default 3e-3)"),
    ("--warmup", int, "linear warm-up steps (default 100)"),
    ("--weight-decay", float, "AdamW weight decay on matrices (default 0.1)"),
    ("--aux-coef", float, "load-balancing loss coefficient (default 0.01)"),
    ("--eval-every", int, "steps between held-out points on the loss curve (default 250)"),
    ("--slice-tokens", int, "held-out tokens shipped for the fast test (default 16384)"),
    ("--held-out-fraction", float, "expected share of files held out (default 0.1)"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remoe zoo` and its subcommands.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    zoo = subparsers.add_parser("zoo", help="built-in models: train one, or find a shipped one",
                                description="Built-in MoE models trained by this project.")
    zoo.set_defaults(func=lambda args: (zoo.print_help(), 0)[1])
    sub = zoo.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")

    train = sub.add_parser(
        "train", help="train a small Qwen3-MoE and write a checkpoint with its model card",
        description="Train a byte-level BPE tokenizer and a small Qwen3-MoE on a folder of text "
        "(default: this Python's standard library sources), evaluate the saved checkpoint on "
        "held-out files, and write config, weights, tokenizer, MODEL_CARD.md, card.json and "
        "loss_curve.png to --out. The shipped 'tiny' model's card ends with the exact command "
        "that reproduces it.",
    )
    train.add_argument("--out", type=pathlib.Path, required=True,
                       help="output checkpoint directory")
    train.add_argument("--data", type=pathlib.Path, default=None, metavar="DIR",
                       help="folder of text files (default: this Python's standard library "
                       ".py sources, test suites and site-packages skipped)")
    train.add_argument("--suffix", action="append", dest="suffixes", metavar="EXT",
                       help="file ending to read, repeatable (default: .py for the standard "
                       "library, else .py .txt .md .rst)")
    train.add_argument("--seed", type=int, default=0, help="seed for split, init, batches")
    train.add_argument("--minutes", type=float, default=None,
                       help="wall-clock cap on training; stops early when reached")
    for flag, kind, text in _SHAPE_OPTIONS:
        train.add_argument(flag, type=kind, default=None, help=text)
    train.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false",
                       help="do not renormalise the top-k routing weights (default: renormalise)")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; the shipped model used 1, "
                       "which also keeps a shared machine's load from stalling the run)")
    train.add_argument("--name", default=None, help="model name on the card (default: tiny)")
    train.add_argument("--tiny", action="store_true",
                       help="CI-size smoke run (seconds): 2 layers, 8 experts, 30 steps")
    train.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")
    train.set_defaults(func=_train)

    path = sub.add_parser("path", help="print a shipped model's checkpoint directory")
    path.add_argument("name", nargs="?", default="tiny", help="model name (default: tiny)")
    path.set_defaults(func=_path)

    lst = sub.add_parser("list", help="list the shipped models")
    lst.set_defaults(func=_list)


def config_from_args(args: argparse.Namespace):
    """The `TrainConfig` for parsed `remoe zoo train` arguments (preset, then explicit options).

    Args:
        args: parsed arguments.

    Returns:
        `remoe_engine.zoo.train.TrainConfig`.
    """
    from remoe_engine.zoo.train import TINY_OVERRIDES, TrainConfig

    values = dict(TINY_OVERRIDES) if args.tiny else {}
    for flag, _, _ in _SHAPE_OPTIONS:
        key = flag[2:].replace("-", "_")
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.name is not None:
        values["name"] = args.name
    return TrainConfig(out=args.out, data=args.data, suffixes=args.suffixes, seed=args.seed,
                       minutes=args.minutes, norm_topk_prob=args.norm_topk_prob,
                       threads=args.threads, progress=args.progress, **values)


def _train(args: argparse.Namespace) -> int:
    from remoe_engine.zoo import ZooError
    from remoe_engine.zoo.train import run

    try:
        card = run(config_from_args(args), log=lambda line: print(line, flush=True))
    except ZooError as error:
        raise CommandError(str(error)) from None
    print(f"wrote {args.out}: {card['summary']}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from remoe_engine.zoo import ZooError, path

    try:
        print(path(args.name))
    except ZooError as error:
        raise CommandError(str(error)) from None
    return 0


def _list(args: argparse.Namespace) -> int:
    from remoe_engine.zoo import available, path

    for name in available():
        print(f"{name}\t{path(name)}")
    return 0
