"""remoe::crc32c, the packed blobs' checksum: known values, chaining, every code path of the
hardware kernel (alignment head, three-stream blocks of 8 KiB and 256 B, tail) against a
bitwise reference."""

from __future__ import annotations

import pytest
import torch

from remoe_engine import ops


def _reference(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_known_values():
    assert ops.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert ops.crc32c(b"") == 0
    assert ops.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert ops.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xFF
    assert ops.crc32c_impl() in ("sse4.2", "armv8-crc", "table")


@pytest.mark.parametrize("length", [1, 7, 8, 255, 767, 768, 769, 3 * 8192 - 1, 3 * 8192,
                                    3 * 8192 + 3 * 256 + 11])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_matches_the_bitwise_reference_and_chains(length, offset):
    gen = torch.Generator().manual_seed(length)
    data = torch.randint(0, 256, (length + offset,), dtype=torch.uint8, generator=gen)[offset:]
    want = _reference(bytes(data.tolist()))
    assert ops.crc32c(data) == want
    cut = length // 3
    assert ops.crc32c(data[cut:], ops.crc32c(data[:cut])) == want


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        ops.crc32c(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="32-bit CRC"):
        ops.crc32c(b"abc", 1 << 40)
