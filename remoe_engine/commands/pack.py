"""`remoe pack`: write a checkpoint's routed experts as one expert-major packed file."""

from __future__ import annotations

import argparse
import pathlib

from remoe_engine.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remoe pack`.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    parser = subparsers.add_parser(
        "pack", help="pack a checkpoint's experts into one file (one read per expert miss)",
        description="Read the routed experts of a safetensors checkpoint (the files "
        "transformers loads; headers only, then their byte ranges) and write them expert-major, "
        "each expert one 4 KiB-aligned blob in the pool's slot layout, so a miss is one read and "
        "can use O_DIRECT. Each blob carries a CRC32C keyed by its layer and expert, and the "
        "header its own CRC32C. Written to a temporary file .OUT.tmp-PID and renamed, so OUT is "
        "never half-written and a failed pack leaves OUT as it was; temporary files left by "
        "killed packs of OUT are removed. With --quantize the experts are written compressed "
        "(codes and scales; packed format version 3) and dequantized into the compute dtype as "
        "each one loads; FP8 and MXFP4 checkpoints are packed compressed as they are.",
    )
    parser.add_argument("checkpoint", type=pathlib.Path, metavar="CKPT",
                        help="checkpoint directory (config.json, and model.safetensors or "
                        "model.safetensors.index.json with its shards)")
    parser.add_argument("out", type=pathlib.Path, metavar="OUT", help="packed file to write")
    parser.add_argument("--model-type", default=None,
                        help="override config.json's model_type (picks the on-disk layout)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="write compressed experts: int8 (one scale per row), int8:gN, "
                        "int4 (= int4:g64) or int4:gN (N input columns per fp16 scale and zero "
                        "point, round to nearest), int4:gN+hqq (HQQ-style refined zero points)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the written file and check every expert blob's CRC32C")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from remoe_engine.store import ExpertStore, StoreError

    if args.out.exists() and not args.force:
        raise CommandError(f"'{args.out}' exists; pass --force to overwrite it")
    if not args.out.parent.is_dir():
        raise CommandError(f"output directory '{args.out.parent}' does not exist")
    if args.quantize is not None:
        from remoe_engine.quant import parse_scheme

        try:
            parse_scheme(args.quantize)
        except ValueError as error:
            raise CommandError(str(error)) from None
    try:
        store = ExpertStore.from_checkpoint(args.checkpoint, model_type=args.model_type)
        store.pack(args.out, progress=not args.no_progress, quantize=args.quantize)
        packed = ExpertStore.from_packed(args.out)
        if args.verify:
            packed.verify()
    except (StoreError, NotImplementedError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:  # one the store did not name, e.g. an unreadable directory
        where = f"'{error.filename}': " if error.filename else ""
        raise CommandError(f"{where}{error.strerror or error}") from None
    size = args.out.stat().st_size
    what = (f"{packed.compressed.scheme} compressed, {packed.blob_bytes} bytes per expert blob "
            f"({packed.layout.slot_bytes} as {str(packed.layout.dtype).removeprefix('torch.')})"
            if packed.compressed is not None else
            f"{packed.layout.slot_bytes} bytes per expert blob")
    print(f"wrote {args.out}: {store.model_type}, {len(store.layers)} layers x "
          f"{store.num_experts} experts, {what}, {size / 2**20:.1f} MiB")
    return 0
