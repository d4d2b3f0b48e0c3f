"""Byte sizes as users write them ("6GiB", "512 MB"), parsed without importing torch.

The command line parses `--memory-budget` with this before anything heavy loads, and
`patch()`/`load()`/`SlotPool` accept the same strings.
"""

from __future__ import annotations

import re

__all__ = ["parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a string like "6GiB", "512 MB", "1.5gb" (decimal and binary units).

    Raises:
        ValueError: for a negative int, a bool, or a string that is not a size.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"a byte size must be an int or a string like '6GiB', got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"a byte size must be >= 0, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {size!r} (e.g. 6GiB, 512MB, 1000000)")
    return int(float(m[1]) * _UNITS[m[2].lower()])
