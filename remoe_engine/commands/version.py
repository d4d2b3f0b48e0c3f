"""`remoe version`: versions of everything that matters and whether CUDA kernels were built."""

from __future__ import annotations

import argparse
import platform


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "version", help="print versions and whether the CUDA kernels were built",
        description="Print the versions of remoe-engine, Python, torch and transformers, and "
        "whether remoe_engine._C contains CUDA kernels, and which CRC32C implementation checks "
        "packed expert blobs on this CPU.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import remoe_engine
    from remoe_engine import ops

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    rows = [
        ("remoe-engine", remoe_engine.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("transformers", transformers.__version__),
        ("CUDA kernels built", "yes" if ops.cuda_kernels_built() else "no"),
        ("GPU", gpu),
        ("CRC32C", ops.crc32c_impl()),  # the packed-blob check each read pays for
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
