"""The `remoe` command line.

Each subcommand lives in its own module, which defines `register(subparsers)`; this file only
lists them, so adding a command is one line in `_COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

# Modules that define `register(subparsers) -> None`; each parser sets `func(args) -> int`.
_COMMAND_MODULES = [
    "remoe_engine.commands.run",
    "remoe_engine.commands.serve",
    "remoe_engine.commands.trace",
    "remoe_engine.commands.simulate",
    "remoe_engine.commands.finetune",
    "remoe_engine.commands.eval",
    "remoe_engine.commands.pack",
    "remoe_engine.commands.families",
    "remoe_engine.commands.zoo",
    "remoe_engine.commands.demo",
    "remoe_engine.commands.version",
]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def finite_nonnegative(text: str) -> float:
    """argparse type for biases and similar: a finite number >= 0 ("nan" and "inf" are not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def memory_budget(text: str | None) -> int | None:
    """A `--memory-budget` value in bytes (None when not given), or a one-line CommandError."""
    if text is None:
        return None
    from remoe_engine.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise CommandError(f"--memory-budget: {error}") from None


def checked_model_dir(model: str | None) -> str:
    """The checkpoint folder a command runs (default: the built-in model), checked up front:
    a folder, with a config.json and a tokenizer."""
    import os

    if model is None:
        from remoe_engine import zoo

        try:
            return str(zoo.path("tiny"))
        except zoo.ZooError as error:
            raise CommandError(f"{error}; pass --model PATH") from None
    if not os.path.isdir(model):
        raise CommandError(f"--model {model}: not a directory")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise CommandError(f"--model {model}: no config.json (not a Hugging Face checkpoint "
                           "directory)")
    if not any(os.path.exists(os.path.join(model, name)) for name in _TOKENIZER_FILES):
        raise CommandError(f"--model {model}: no tokenizer ({', '.join(_TOKENIZER_FILES)}); it "
                           "is needed to encode prompts and text, so the folder needs one (save "
                           "it with tokenizer.save_pretrained(folder))")
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remoe",
        description="remoe-engine: run MoE LLMs whose experts do not fit in fast memory.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"remoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"remoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
