"""Where routed experts' bytes live, and how one expert maps onto one pool slot.

Three tiers feed the slot pool (`remoe_engine.pool`):

- a Hugging Face checkpoint directory (`ExpertStore.from_checkpoint`): the safetensors files
  transformers' `from_pretrained` would load (`model.safetensors`, or the shards named by
  `model.safetensors.index.json`; other .safetensors files there are not part of the model). Only
  the headers are read, to get each expert tensor's byte range; the pool then reads those ranges
  straight from the files. Headers are held to the safetensors library's own rules.
- a packed file (`ExpertStore.from_packed`, written by `ExpertStore.pack` / `remoe pack`):
  expert-major, each expert one 4 KiB-aligned blob in slot layout, so a miss is one read (and can
  use O_DIRECT).
- host memory (`ExpertStore.from_model`): every expert as one blob row of a host tensor, pinned
  for a pool on a GPU, taken from a live transformers model.

Slot layout (`SlotLayout`): one expert is one contiguous blob holding the experts module's fused
parameters for that expert, in its in-memory orientation, each at a 256-byte-aligned offset:

- most families: `gate_up_proj [2I, H]` (gate rows, then up rows) | `down_proj [H, I]`
- GPT-OSS: `gate_up_proj [H, 2I]` (gate/up interleaved) | `gate_up_proj_bias [2I]` |
  `down_proj [I, H]` | `down_proj_bias [H]`

The bytes of each tensor equal transformers' `experts.<name>[e]` exactly, so the expert
computation views a slot as tensors without a copy (`SlotLayout.views`).

Packed file format, version 2 (version 3 below; all integers little-endian):

    [0, 8)            magic b"REMOEPAK"
    [8, 12)           u32 format version (2)
    [12, 16)          u32 n: byte length of the JSON header
    [16, 20)          u32 CRC32C of the n JSON bytes
    [20, 20 + n)      JSON (UTF-8): format, version, model_type, layers (transformers layer
                      indices, strictly ascending), num_experts, dtype, tensors (name, shape,
                      offset, nbytes), slot_bytes, data_offset, source, crc32c (one checksum per
                      blob, in blob order, each 8 lowercase hex digits)
    [.., data_offset) zero padding; data_offset is a multiple of 4096
    blob (i, e)       at data_offset + (i * num_experts + e) * slot_bytes, i = position of the
                      layer in `layers`; slot_bytes is a multiple of 4096, padding is zero
    end of file       right after the last blob

The checksum of blob (layer, e) is keyed by the blob's identity: CRC32C (Castagnoli) over 16 bytes
(int64 transformers layer index `layer`, then int64 expert id `e`) followed by the blob's
slot_bytes bytes (`blob_checksum`; `blob_seed` is the CRC32C of the 16 key bytes alone, which the
blob's bytes continue). A header that relabels blobs, or blobs moved within the file, fail it.

Version 3 is version 2 with compressed blobs (`remoe pack --quantize`, or an FP8 / MXFP4
checkpoint packed as it is): the header adds `compressed` (remoe_engine.quant.QuantLayout: scheme,
blob_bytes, parts) and `transposed`; each blob is `compressed.blob_bytes` long (a multiple of
4096, padding zero) and holds codes and scales, which the pool dequantizes into the slot layout
the other fields describe (in the compute dtype) as it loads; checksums cover the compressed
bytes. Version 2 is still written for uncompressed experts, so older readers refuse only what
they cannot read ("upgrade remoe-engine").

Compressed checkpoints (`from_checkpoint`): transformers' finegrained FP8 (float8_e4m3fn weights,
`weight_scale_inv` in fp32 or UE8M0 over `quantization_config.weight_block_size` blocks) and
MXFP4 (`*_blocks` / `*_scales`, GPT-OSS) are read as compressed stores: each expert's codes and
scales are byte ranges of the files, landing in the compressed blob layout.

Version 1 (a 16-byte prefix without the header checksum; unkeyed zlib CRC-32 per blob, field
`crc32`) was written by earlier remoe-engines and is refused: re-run `remoe pack`.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from remoe_engine import families
from remoe_engine.quant import QuantLayout

__all__ = [
    "ALIGN", "ExpertStore", "PACK_MAGIC", "PACK_VERSION", "Segment", "SlotLayout", "SlotTensor",
    "StoreError", "TensorInfo", "blob_checksum", "blob_seed", "read_safetensors_header",
]

ALIGN = 4096  # blob and slot alignment: the O_DIRECT block size (csrc/transfer/reader.h)
TENSOR_ALIGN = 256  # tensor offsets inside a slot: enough for any vectorized load
PACK_MAGIC = b"REMOEPAK"
PACK_VERSION = 2
PACK_VERSION_COMPRESSED = 3  # a packed file of compressed experts (the "compressed" field)
_PREFIX = struct.Struct("<8sIII")  # magic, version, JSON length, CRC32C of the JSON
_MAGIC_VERSION = struct.Struct("<8sI")  # what every version starts with
_BLOB_KEY = struct.Struct("<qq")  # transformers layer index, expert id: what a blob checksum keys
_MAX_PACKED_HEADER = 100_000_000  # bytes; far above any real header (DeepSeek-V3: ~0.2 MB)
_CRC_HEX = re.compile(r"[0-9a-f]{8}")

# safetensors' rules (safetensors/src/tensor.rs): a header is at most MAX_HEADER_SIZE bytes, and
# every dtype it knows has this many bits per element (Dtype::bitsize).
_ST_MAX_HEADER = 100_000_000
_ST_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

# safetensors dtype names -> torch dtypes: the ones remoe-engine reads experts in.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class StoreError(ValueError):
    """A checkpoint or packed file the store cannot use; the message names the file and tensor."""


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_count(x: object) -> bool:
    """A JSON non-negative integer (not a bool, not a float such as 2.0)."""
    return type(x) is int and x >= 0


def _short(x: object, limit: int = 80) -> str:
    """repr for an error message: one line, bounded."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- checksums -----------------------------------------------------------------------------------


def _crc32c(data: bytes | torch.Tensor, crc: int = 0) -> int:
    """CRC32C of bytes or a 1-D CPU uint8 tensor, continuing `crc`."""
    # Imported here: the store stays importable before the compiled extension is loaded.
    from remoe_engine import ops

    if not isinstance(data, torch.Tensor):
        if not data:
            return crc
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return ops.crc32c(data, crc)


def blob_seed(layer: int, expert: int) -> int:
    """CRC32C of a blob's 16-byte key: int64 LE transformers layer index, int64 LE expert id.

    Returns:
        The u32 CRC32C from which `blob_checksum` continues over the blob's bytes.
    """
    return _crc32c(_BLOB_KEY.pack(layer, expert))


def blob_checksum(layer: int, expert: int, blob: torch.Tensor) -> int:
    """The packed format's checksum of one expert blob, keyed by the blob's identity.

    Args:
        layer: transformers layer index.
        expert: expert id.
        blob: uint8 [slot_bytes], contiguous, on the CPU.

    Returns:
        u32 CRC32C over the key (`blob_seed`) followed by the blob's bytes.
    """
    return _crc32c(blob, blob_seed(layer, expert))


# --- reading files -------------------------------------------------------------------------------

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _open_regular(path: str | os.PathLike) -> tuple[int, int]:
    """Open a file for reading, refusing anything but a regular file before reading a byte.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer forever (it
    changes nothing for a regular file); checking fstat of the opened descriptor, not a stat of
    the path, leaves no window in which the path can be swapped between the check and the read.

    Returns:
        (fd, size in bytes); the caller closes fd.

    Raises:
        FileNotFoundError: the path does not exist (the caller says what was expected there).
        StoreError: naming the path: not a regular file, or it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StoreError(f"cannot open '{path}': {error.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "something")
        raise StoreError(f"'{path}' is {kind}, not a regular file")
    return fd, st.st_size


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to n bytes at offset: fewer only at the end of the file."""
    chunks = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 30), offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, modification time in ns): what must not change between reading a
    file's header and reading its experts."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_file(path: str | os.PathLike) -> bytes:
    """A whole regular file (config.json, an index); FileNotFoundError or StoreError."""
    fd, size = _open_regular(path)
    try:
        return _pread(fd, size, 0)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header."""

    key: str
    file: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    identity: tuple[int, ...] = ()  # the file's `file_identity` when its header was read


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) into byte ranges.

    Holds the file to the safetensors library's own rules (`SafeTensors::read_metadata` and
    `Metadata::validate` in safetensors/src/tensor.rs), which transformers relies on: a header of
    at most 100,000,000 bytes of UTF-8 JSON; `__metadata__`, if present, maps strings to strings;
    every other entry has a known `dtype` string, a `shape` of non-negative integers and
    `data_offsets` of exactly two non-negative integers whose difference is the tensor's size;
    sorted by offsets, the tensors tile the data section (everything after the header) exactly:
    the first begins at 0, each begins where the one before ends, the last ends at the end of the
    file. A file the safetensors library would refuse is refused here too, so an overlapping,
    misplaced or truncated tensor never becomes an expert.

    Args:
        path: a .safetensors file.

    Returns:
        key -> TensorInfo with absolute offsets, for every tensor of the file.

    Raises:
        StoreError: naming the file (and tensor) when the file is missing, not a regular file,
            truncated, or its header is corrupt or breaks a rule above.
    """
    path = str(path)
    raw, size, identity = _read_header_bytes(path)
    try:
        header = json.loads(raw.decode("utf-8"))  # UTF-8 only, as safetensors (json sniffs UTF-16)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"'{path}' has a corrupt safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise StoreError(f"'{path}' has a corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise StoreError(f"'{path}': __metadata__ must map strings to strings, not "
                         f"{_short(metadata)}")
    spans = [(*_tensor_span(f"'{path}': tensor '{key}'", entry), key)
             for key, entry in header.items()]  # (begin, end, key), data section offsets
    data_start = 8 + len(raw)
    _check_tiling(path, spans, header, data_start, size)
    return {key: TensorInfo(key, path, data_start + begin, end - begin, header[key]["dtype"],
                            tuple(header[key]["shape"]), identity) for begin, end, key in spans}


def _read_header_bytes(path: str) -> tuple[bytes, int, tuple[int, int, int, int]]:
    """The header's JSON bytes, the file's size and identity, the length prefix checked."""
    try:
        fd, size = _open_regular(path)
    except FileNotFoundError:
        raise StoreError(f"safetensors file '{path}' does not exist") from None
    identity = file_identity(os.fstat(fd))
    try:
        prefix = _pread(fd, 8, 0)
        if len(prefix) < 8:
            raise StoreError(f"'{path}' is truncated: {size} bytes, not even a safetensors "
                             "header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise StoreError(f"'{path}' is truncated or not a safetensors file: header length "
                             f"{n} but the file has {size} bytes (and the limit is "
                             f"{_ST_MAX_HEADER})")
        return _pread(fd, n, 8), size, identity
    finally:
        os.close(fd)


def _tensor_span(where: str, entry: object) -> tuple[int, int]:
    """One header entry checked (types, dtype, shape, a size that matches its offsets); returns
    its data offsets (begin, end)."""
    if not isinstance(entry, dict):
        raise StoreError(f"{where}: {_short(entry)} is not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise StoreError(f"{where}: no {field} (entry {_short(entry)})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise StoreError(f"{where}: dtype {_short(dtype)} is not a string")
    if dtype not in _ST_BITS:
        raise StoreError(f"{where}: unknown dtype {_short(dtype)} (safetensors knows "
                         f"{', '.join(_ST_BITS)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise StoreError(f"{where}: shape {_short(shape)} is not a list of non-negative "
                         "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(_is_count(o) for o in offsets)):
        raise StoreError(f"{where}: data_offsets {_short(offsets)} is not a list of two "
                         "non-negative integers")
    begin, end = offsets
    if end < begin:
        raise StoreError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    count = math.prod(shape)
    if count * _ST_BITS[dtype] % 8:
        raise StoreError(f"{where}: {count} {dtype} elements do not end on a byte boundary")
    if end - begin != count * _ST_BITS[dtype] // 8:
        raise StoreError(f"{where} spans data bytes {begin}..{end} but shape {shape} of "
                         f"{dtype} needs {count * _ST_BITS[dtype] // 8}")
    return begin, end


def _check_tiling(path: str, spans: list[tuple[int, int, str]], header: dict, data_start: int,
                  size: int) -> None:
    """Sorted by offset, the tensors must tile the data section exactly: no overlap, no gap, no
    byte after the last, none missing at the end (a truncated file)."""
    at, last = 0, None  # the tiling so far ends at data byte `at`, with tensor `last`
    for begin, end, key in sorted(spans):
        if begin < at:
            prev = header[last]["data_offsets"]
            raise StoreError(f"'{path}': tensors '{last}' (data bytes {prev[0]}..{prev[1]}) and "
                             f"'{key}' (data bytes {begin}..{end}) overlap")
        if begin > at:
            between = f"between '{last}' and '{key}'" if last is not None else f"before '{key}'"
            raise StoreError(f"'{path}': data bytes {at}..{begin} belong to no tensor "
                             f"({between})")
        at, last = end, key
    if data_start + at > size:
        raise StoreError(f"'{path}' is truncated: tensor '{last}' ends at byte "
                         f"{data_start + at} but the file has {size} bytes")
    if data_start + at < size:
        after = f"after '{last}'" if last is not None else "the header lists no tensor"
        raise StoreError(f"'{path}': data bytes {at}..{size - data_start} belong to no tensor "
                         f"({after})")


@dataclass(frozen=True)
class SlotTensor:
    """One tensor inside a slot."""

    name: str  # the experts module parameter it holds, e.g. "gate_up_proj"
    shape: tuple[int, ...]  # per expert, e.g. (2I, H)
    offset: int  # bytes from the slot start, a multiple of TENSOR_ALIGN
    nbytes: int


@dataclass(frozen=True)
class SlotLayout:
    """Byte layout of one expert in a slot (and in a packed blob and a host blob row).

    Attributes:
        dtype: the dtype of every tensor.
        tensors: in slot order.
        slot_bytes: bytes per slot, a multiple of ALIGN (4 KiB).
    """

    dtype: torch.dtype
    tensors: tuple[SlotTensor, ...]
    slot_bytes: int

    @classmethod
    def build(cls, dtype: torch.dtype, shapes: Sequence[tuple[str, Sequence[int]]]) -> SlotLayout:
        """Lay out tensors (name, per-expert shape) in order, each TENSOR_ALIGN-aligned."""
        tensors, offset = [], 0
        for name, shape in shapes:
            nbytes = math.prod(shape) * dtype.itemsize
            tensors.append(SlotTensor(name, tuple(int(s) for s in shape), offset, nbytes))
            offset = _round_up(offset + nbytes, TENSOR_ALIGN)
        return cls(dtype, tuple(tensors), _round_up(max(offset, 1), ALIGN))

    def in_dtype(self, dtype: torch.dtype) -> SlotLayout:
        """The same tensors in another dtype (this layout itself when the dtype is its own)."""
        if dtype == self.dtype:
            return self
        return SlotLayout.build(dtype, [(t.name, t.shape) for t in self.tensors])

    @property
    def payload_bytes(self) -> int:
        """Bytes of real data per expert (the slot minus alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> SlotTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"slot layout has no tensor {name!r}; it has "
                       f"{[t.name for t in self.tensors]}")

    def views(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """View slot bytes as the expert's tensors, without copying.

        Args:
            slots: uint8 [slot_bytes] (one slot) or [N, slot_bytes] (e.g. the whole pool buffer).

        Returns:
            name -> tensor [*shape] or [N, *shape] of `dtype`, sharing memory with `slots`.
        """
        if slots.dtype != torch.uint8 or slots.shape[-1] != self.slot_bytes:
            raise ValueError(f"views: expected uint8 [..., {self.slot_bytes}], got {slots.dtype} "
                             f"{list(slots.shape)}")
        return {t.name: slots[..., t.offset : t.offset + t.nbytes].view(self.dtype)
                .unflatten(-1, t.shape) for t in self.tensors}

    def gaps(self) -> Iterator[tuple[int, int]]:
        """Byte ranges [begin, end) of the slot that hold no tensor (alignment padding)."""
        at = 0
        for t in self.tensors:
            if t.offset > at:
                yield at, t.offset
            at = t.offset + t.nbytes
        if at < self.slot_bytes:
            yield at, self.slot_bytes

    def to_json(self) -> dict:
        return {
            "dtype": _dtype_name(self.dtype), "slot_bytes": self.slot_bytes,
            "tensors": [{"name": t.name, "shape": list(t.shape), "offset": t.offset,
                         "nbytes": t.nbytes} for t in self.tensors],
        }

    @classmethod
    def from_json(cls, d: dict) -> SlotLayout:
        """The layout a packed header describes; ValueError naming the first inconsistency."""
        dtype = getattr(torch, d["dtype"], None) if isinstance(d["dtype"], str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {_short(d['dtype'])} is not a torch dtype")
        slot_bytes = d["slot_bytes"]
        if not _is_count(slot_bytes) or slot_bytes == 0 or slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes {_short(slot_bytes)} is not a multiple of {ALIGN}")
        if not isinstance(d["tensors"], list) or not d["tensors"]:
            raise ValueError(f"tensors {_short(d['tensors'])} is not a non-empty list")
        tensors, end = [], 0
        for t in d["tensors"]:
            if not (isinstance(t, dict) and isinstance(t.get("name"), str)
                    and isinstance(t.get("shape"), list) and all(map(_is_count, t["shape"]))
                    and _is_count(t.get("offset")) and _is_count(t.get("nbytes"))):
                raise ValueError(f"tensor {_short(t)} is not {{name, shape, offset, nbytes}}")
            tensor = SlotTensor(t["name"], tuple(t["shape"]), t["offset"], t["nbytes"])
            if (tensor.offset % TENSOR_ALIGN or tensor.offset < end
                    or tensor.offset + tensor.nbytes > slot_bytes
                    or tensor.nbytes != math.prod(tensor.shape) * dtype.itemsize):
                raise ValueError(f"tensor {tensor.name!r} at {tensor.offset}+{tensor.nbytes} does "
                                 f"not fit a {slot_bytes}-byte slot of {dtype} after the tensors "
                                 "before it")
            tensors.append(tensor)
            end = tensor.offset + tensor.nbytes
        if len({t.name for t in tensors}) != len(tensors):
            raise ValueError(f"tensor names repeat: {[t.name for t in tensors]}")
        return cls(dtype, tuple(tensors), slot_bytes)


@dataclass(frozen=True)
class Segment:
    """A byte range of a file that lands at `slot_offset` of an expert's slot."""

    file: str
    offset: int
    nbytes: int
    slot_offset: int
    what: str  # tensor key, or the packed blob's name, for error messages


class ExpertStore:
    """Every routed expert of a model, on disk or in host memory, in slot layout.

    Build one with `from_checkpoint`, `from_packed` or `from_model`. Layers are named by their
    transformers layer index (`layers`, e.g. (1, 2, 3) for DeepSeek with one dense layer); the
    pool uses their position in `layers` internally.

    Attributes:
        layout: the slot layout shared by every expert.
        layers: MoE layer indices, ascending.
        num_experts: routed experts per layer.
        model_type: transformers model type, e.g. "qwen3_moe".
        tier: "disk" (byte ranges of files) or "host" (`host_blobs`).
        host_blobs: uint8 [len(layers) * num_experts, slot_bytes] for the host tier, else None.
        source: the checkpoint directory, packed file or "model".

    A packed store also carries each blob's checksum (`blob_checksums`, `verify`).
    """

    def __init__(self, *, layout: SlotLayout, layers: Sequence[int], num_experts: int,
                 model_type: str, source: str,
                 segments: dict[tuple[int, int], list[Segment]] | None = None,
                 host_blobs: torch.Tensor | None = None, crc32c: Sequence[int] | None = None,
                 file_identities: dict[str, tuple[int, ...]] | None = None,
                 compressed: QuantLayout | None = None, transposed: bool = False):
        if (segments is None) == (host_blobs is None):
            raise ValueError("ExpertStore needs exactly one of segments (disk) or host_blobs")
        self.layout = layout
        # Compressed experts: each blob is `compressed`'s codes and scales, dequantized into
        # `layout` (in the pool's compute dtype) as it loads. None: blobs are in `layout`.
        self.compressed = compressed
        if compressed is not None:
            compressed.check_covers(layout)
        # The 2-D expert tensors are stored [in, out] (GPT-OSS): what quantizing groups along.
        self.transposed = bool(transposed)
        self.layers = tuple(int(layer) for layer in layers)
        self.num_experts = int(num_experts)
        self.model_type = model_type
        self.source = source
        self.tier = "host" if host_blobs is not None else "disk"
        self.host_blobs = host_blobs
        self._segments = segments or {}
        self._crc32c = list(crc32c) if crc32c is not None else None  # expected, blob order
        self._checksums: torch.Tensor | None = None  # blob_checksums(), built on first use
        self._layer_pos = {layer: i for i, layer in enumerate(self.layers)}
        self._fds: dict[str, int] = {}
        self._identities = dict(file_identities or {})

    def check_unchanged(self) -> None:
        """Every file of the disk tier is the one whose header was read (same device, inode,
        size and modification time): offsets taken from an older version of a file would read
        the wrong bytes. The pool calls it right after opening the files; from then on the
        reader checks each file after every read.

        Raises:
            StoreError: naming the first file that changed.
        """
        for path, identity in self._identities.items():
            if not identity:
                continue
            try:
                now = file_identity(os.stat(path))
            except OSError as error:
                raise StoreError(f"'{path}' cannot be examined: {error.strerror}") from None
            if now != identity:
                raise StoreError(f"'{path}' changed after its header was read (size "
                                 f"{identity[2]} -> {now[2]} bytes, or another file or "
                                 "modification time): open the store again")

    def __repr__(self) -> str:
        what = (f"{self.compressed.scheme} blobs of {self.blob_bytes} bytes"
                if self.compressed is not None else f"{self.layout.slot_bytes} bytes per slot")
        return (f"ExpertStore({self.model_type}, {self.tier} tier from {self.source!r}: "
                f"{len(self.layers)} layers x {self.num_experts} experts, {what})")

    @property
    def blob_bytes(self) -> int:
        """Bytes one expert takes in this store (and per miss): the compressed blob, or a slot."""
        return self.compressed.blob_bytes if self.compressed is not None else (
            self.layout.slot_bytes)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    # --- lookup --------------------------------------------------------------------------------

    def layer_position(self, layer: int) -> int:
        """Position of a transformers layer index in `layers` (the pool's dense layer index)."""
        try:
            return self._layer_pos[layer]
        except KeyError:
            raise KeyError(f"layer {layer} has no routed experts; MoE layers: "
                           f"{self.layers}") from None

    @property
    def files(self) -> list[str]:
        """Files the disk tier reads, in first-use order."""
        return list(dict.fromkeys(s.file for segs in self._segments.values() for s in segs))

    def segments(self, layer: int, expert: int) -> list[Segment]:
        """Where expert `expert` of `layer` lies on disk (disk tier only)."""
        self._check(layer, expert)
        if self.tier != "disk":
            raise ValueError("segments: a host-tier store has no files")
        return self._segments[(layer, expert)]

    def source_table(self) -> tuple[list[str], torch.Tensor, list[str]]:
        """The disk tier as the pool's C++ side takes it.

        Returns:
            files, table int64 [N, 6] of rows (layer position, expert, file index, file offset,
            nbytes, slot offset), and a label (tensor key) per row.
        """
        files = self.files
        file_id = {f: i for i, f in enumerate(files)}
        rows, labels = [], []
        for (layer, expert), segs in self._segments.items():
            for s in segs:
                rows.append((self._layer_pos[layer], expert, file_id[s.file], s.offset, s.nbytes,
                             s.slot_offset))
                labels.append(s.what)
        return files, torch.tensor(rows, dtype=torch.int64).view(-1, 6), labels

    def read_expert(self, layer: int, expert: int) -> torch.Tensor:
        """One expert's blob, read in Python (for packing and checks, not the hot path).

        Returns:
            uint8 [blob_bytes] (slot bytes, or the compressed blob); padding is zero (a view of
            `host_blobs` for the host tier).
        """
        self._check(layer, expert)
        if self.tier == "host":
            return self.host_blobs[self._layer_pos[layer] * self.num_experts + expert]
        buf = bytearray(self.blob_bytes)
        view = memoryview(buf)
        for s in self._segments[(layer, expert)]:
            fd = self._fds.get(s.file)
            if fd is None:
                try:
                    fd, _ = _open_regular(s.file)
                except FileNotFoundError:
                    raise StoreError(f"'{s.file}' no longer exists: it held '{s.what}'") from None
                self._fds[s.file] = fd
            try:
                got = os.preadv(fd, [view[s.slot_offset : s.slot_offset + s.nbytes]], s.offset)
            except OSError as error:
                raise StoreError(f"cannot read '{s.what}' from '{s.file}': "
                                 f"{error.strerror}") from None
            if got != s.nbytes:
                raise StoreError(f"'{s.file}' is truncated: '{s.what}' needs bytes "
                                 f"{s.offset}..{s.offset + s.nbytes}, got {got} of {s.nbytes}")
        return torch.frombuffer(buf, dtype=torch.uint8)

    def expert_tensors(self, layer: int, expert: int, dtype: torch.dtype | None = None
                       ) -> dict[str, torch.Tensor]:
        """One expert's tensors (name -> [*shape]), as transformers holds `experts.<name>[e]`
        (compressed experts dequantized, in `dtype`, default the layout's)."""
        blob = self.read_checked(layer, expert)
        if self.compressed is not None:
            slot = self.layout.in_dtype(dtype or self.layout.dtype)
            return self.compressed.dequantize(blob, slot)
        tensors = self.layout.views(blob)
        return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}

    def _check(self, layer: int, expert: int) -> None:
        self.layer_position(layer)
        if not 0 <= expert < self.num_experts:
            raise KeyError(f"expert {expert} outside [0, {self.num_experts})")

    # --- builders --------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, model_type: str | None = None
                        ) -> ExpertStore:
        """Index a safetensors checkpoint's routed experts by reading headers only.

        Args:
            path: checkpoint directory (config.json and the safetensors files transformers'
                `from_pretrained` loads: model.safetensors, or the shards that
                model.safetensors.index.json names), or one .safetensors file inside it.
            model_type: overrides config.json's model_type (picks the on-disk layout).

        Returns:
            A disk-tier store.

        Raises:
            StoreError: naming the file and tensor: no weights file, missing shard, a file that is
                not a regular file, truncated or corrupt header, a tensor in two shards, missing
                expert tensor, dtype or shape mismatch between experts.
        """
        path = Path(path)
        if path.is_dir():
            directory, only = path, None
        elif os.path.lexists(path):  # a file (or a FIFO, ...: refused when it is opened)
            directory, only = path.parent, path
        else:
            raise StoreError(f"checkpoint directory '{path}' does not exist")
        full_config = _read_config(directory, required=model_type is None)
        config = _text_config(directory, full_config, required=model_type is None)
        model_type = model_type or config["model_type"]
        layout_spec = families.disk_layout_of(model_type, {**config, "_full": full_config})
        tensors = (read_safetensors_header(only) if only is not None
                   else _checkpoint_tensors(directory, full_config))
        # Layers past num_hidden_layers are not part of the model transformers builds (DeepSeek-V3
        # keeps its multi-token-prediction layer 61 on disk): never index them.
        quant_config = full_config.get("quantization_config") or config.get(
            "quantization_config")
        layout, layers, num_experts, segments, compressed = _index_any(
            tensors, layout_spec, config.get("num_hidden_layers"),
            quant_config if isinstance(quant_config, dict) else None)
        used = {s.file for segs in segments.values() for s in segs}
        identities = {t.file: t.identity for t in tensors.values() if t.file in used}
        return cls(layout=layout, layers=layers, num_experts=num_experts, model_type=model_type,
                   source=str(directory), segments=segments, file_identities=identities,
                   compressed=compressed, transposed=layout_spec.transposed)

    @classmethod
    def from_packed(cls, path: str | os.PathLike) -> ExpertStore:
        """Open a packed expert file (written by `pack` / `remoe pack`; format in the module
        docstring). Reads the header only; `verify` (or the pool, per read) checks the blobs.

        Raises:
            StoreError: naming the file: not a regular file, not a packed file, another format
                version, truncated, a header that fails its checksum or is inconsistent, bytes
                after the last blob.
        """
        path = str(path)
        try:
            fd, size = _open_regular(path)
        except FileNotFoundError:
            raise StoreError(f"packed expert file '{path}' does not exist") from None
        identity = file_identity(os.fstat(fd))
        try:
            prefix = _pread(fd, _PREFIX.size, 0)
            magic = prefix[: len(PACK_MAGIC)]
            if magic != PACK_MAGIC[: len(magic)]:
                raise StoreError(f"'{path}' is not a remoe packed expert file (it starts with "
                                 f"{magic!r}, expected {PACK_MAGIC!r})")
            version = None
            if len(prefix) >= _MAGIC_VERSION.size:  # every version has one; check it first
                version = _MAGIC_VERSION.unpack_from(prefix)[1]
                _check_version(path, version)
            if len(prefix) < _PREFIX.size:
                raise StoreError(f"'{path}' is truncated: {size} bytes, less than the "
                                 f"{_PREFIX.size}-byte prefix of a packed file")
            _, _, n, header_crc = _PREFIX.unpack(prefix)
            if _PREFIX.size + n > size or n > _MAX_PACKED_HEADER:
                raise StoreError(f"'{path}' is truncated: {size} bytes, but its prefix announces "
                                 f"a {n}-byte header ending at byte {_PREFIX.size + n}")
            raw = _pread(fd, n, _PREFIX.size)
        finally:
            os.close(fd)
        if (crc := _crc32c(raw)) != header_crc:
            raise StoreError(f"'{path}' has a corrupt header: its CRC32C is {crc:08x}, the prefix "
                             f"says {header_crc:08x}")
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
            layout = SlotLayout.from_json(header)
            compressed = None
            if version == PACK_VERSION_COMPRESSED:
                compressed = QuantLayout.from_json(header["compressed"])
                compressed.check_covers(layout)
            elif "compressed" in header:
                raise ValueError(f"a version {version} header with a 'compressed' field")
            transposed = header.get("transposed", False)
            if not isinstance(transposed, bool):
                raise ValueError(f"transposed {_short(transposed)} is not a boolean")
            layers, num_experts = header["layers"], header["num_experts"]
            if not (isinstance(layers, list) and layers and all(map(_is_count, layers))
                    and all(a < b for a, b in itertools.pairwise(layers))):
                raise ValueError(f"layers {_short(layers)} must be distinct ascending "
                                 "non-negative integers")
            if not _is_count(num_experts) or num_experts == 0:
                raise ValueError(f"num_experts must be a positive integer, not "
                                 f"{_short(num_experts)}")
            data_offset = header["data_offset"]
            if not _is_count(data_offset) or data_offset % ALIGN or (
                    data_offset < _PREFIX.size + n):
                raise ValueError(f"data_offset {_short(data_offset)} is not a multiple of {ALIGN} "
                                 "past the header")
            if "crc32c" not in header:
                raise ValueError("no 'crc32c' field (per-blob checksums)")
            crcs = header["crc32c"]
            if not isinstance(crcs, list):
                raise ValueError("crc32c is not a list")
            if len(crcs) != len(layers) * num_experts:
                raise ValueError(f"{len(crcs)} CRC32C checksums for {len(layers)} x "
                                 f"{num_experts} expert blobs")
            for i, c in enumerate(crcs):
                if not (isinstance(c, str) and _CRC_HEX.fullmatch(c)):
                    raise ValueError(f"crc32c[{i}] is {_short(c)}, not 8 hex digits")
        except KeyError as error:
            raise StoreError(f"'{path}' has a corrupt header: no {error} field") from None
        except (UnicodeDecodeError, ValueError, TypeError) as error:
            raise StoreError(f"'{path}' has a corrupt header: {error}") from None
        blob_bytes = compressed.blob_bytes if compressed is not None else layout.slot_bytes
        expected = data_offset + len(layers) * num_experts * blob_bytes
        if size < expected:
            first = max(0, size - data_offset) // blob_bytes
            raise StoreError(
                f"'{path}' is truncated: {size} bytes, its header describes {expected}; expert "
                f"blob (layer {layers[first // num_experts]}, expert {first % num_experts}) and "
                "all after it are missing or incomplete")
        if size > expected:
            raise StoreError(f"'{path}' has {size - expected} bytes after its last expert blob "
                             f"(its header describes {expected}): not a file remoe pack wrote")
        segments = {}
        for i, layer in enumerate(layers):
            for e in range(num_experts):
                offset = data_offset + (i * num_experts + e) * blob_bytes
                segments[(layer, e)] = [Segment(path, offset, blob_bytes, 0,
                                                f"expert blob (layer {layer}, expert {e})")]
        return cls(layout=layout, layers=layers, num_experts=num_experts,
                   model_type=str(header.get("model_type", "?")), source=path, segments=segments,
                   crc32c=[int(c, 16) for c in crcs], file_identities={path: identity},
                   compressed=compressed, transposed=transposed)

    @classmethod
    def from_model(cls, model: nn.Module, *, pin_memory: bool | None = None, take: bool = False
                   ) -> ExpertStore:
        """Copy a live transformers model's routed experts into host blobs (the host tier).

        Args:
            model: a transformers v5 MoE model with materialized experts (any device).
            pin_memory: page-lock the blobs, exactly their size (fast, truly async host-to-GPU
                copies; only for a pool on a GPU: it needs CUDA). Default: False.
            take: after copying a layer's experts, replace its expert parameters with meta
                tensors of the same shape, freeing their memory (peak: the model + one layer).

        Returns:
            A host-tier store; `host_blobs` is uint8 [len(layers) * num_experts, slot_bytes].
        """
        blocks = families.find_moe_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MoE blocks")
        family = families.family_of(model.config)
        first = blocks[0].experts
        # The slot order is the experts module's parameter order, as for a checkpoint's layout.
        params = [name for name, _ in first.named_parameters(recurse=False)]
        if not params:
            raise ValueError(f"{blocks[0].name}.experts has no parameters: the experts were "
                             "never loaded (or already taken)")
        dtype = getattr(first, params[0]).dtype
        shapes = [(p, tuple(getattr(first, p).shape[1:])) for p in params]
        num_experts = int(first.num_experts)
        for block in blocks:
            for name, shape in shapes:
                t = getattr(block.experts, name)
                if t.is_meta:
                    raise ValueError(f"{block.name}.experts.{name} is on the meta device: the "
                                     "experts were never loaded (or already taken)")
                if t.dtype != dtype or tuple(t.shape) != (num_experts, *shape):
                    raise StoreError(
                        f"{block.name}.experts.{name} is {t.dtype} {list(t.shape)} but "
                        f"{blocks[0].name}.experts.{name} is {dtype} {[num_experts, *shape]}")
        layout = SlotLayout.build(dtype, shapes)
        pin_memory = bool(pin_memory)
        rows = len(blocks) * num_experts
        blobs = _host_blobs(rows, layout.slot_bytes, pin_memory)
        for begin, end in layout.gaps():
            blobs[:, begin:end].zero_()  # deterministic padding: packs are reproducible
        with torch.no_grad():
            for i, block in enumerate(blocks):
                dst = layout.views(blobs[i * num_experts : (i + 1) * num_experts])
                for name, _ in shapes:
                    param = getattr(block.experts, name)
                    dst[name].copy_(param)  # [E, *shape], device -> host
                    if take:
                        setattr(block.experts, name, nn.Parameter(
                            torch.empty_like(param, device="meta"), requires_grad=False))
        return cls(layout=layout, layers=[b.layer_idx for b in blocks], num_experts=num_experts,
                   model_type=family.model_type, source="model", host_blobs=blobs,
                   transposed=bool(getattr(first, "is_transposed", False)))

    # --- packed files ----------------------------------------------------------------------------

    def pack(self, out: str | os.PathLike, *, progress: bool = True,
             quantize: str | None = None) -> Path:
        """Write this store as a packed expert file (format in the module docstring).

        Written to a temporary file `.OUT.tmp-PID` next to `out`, flushed to disk, then renamed
        over `out`, so a crash never leaves a half-written file under the final name, and a failed
        pack leaves `out` as it was. Temporary files of `out` left by packs that were killed (their
        PID no longer runs) are removed first, each named in a line on stderr.

        Args:
            out: destination path.
            progress: show a progress bar (tqdm, on stderr).
            quantize: write compressed experts: "int8", "int8:gN", "int4[:gN]" or
                "int4:gN+hqq" (remoe_engine.quant.parse_scheme); the file is format version 3.
                A compressed store (FP8, MXFP4) is written as it is unless this is given, when
                it is dequantized and quantized again.

        Returns:
            The path written.

        Raises:
            StoreError: reading an expert failed, or writing did (permission denied, read-only
                or full filesystem, file too large: one line naming `out`); nothing is left
                behind.
        """
        from tqdm import tqdm

        out = Path(out)
        try:
            mode = os.stat(out).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as error:
            raise StoreError(f"cannot write '{out}': {error.strerror}") from None
        if mode is not None and not stat.S_ISREG(mode):  # never rename over a device or FIFO
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "something")
            raise StoreError(f"cannot write '{out}': it is {kind}, not a regular file")
        for stale, pid in _remove_stale_temps(out):
            print(f"removed stale temporary file '{stale}' (left by process {pid}, which is not "
                  "running)", file=sys.stderr)
        count = len(self.layers) * self.num_experts
        crcs = ["00000000"] * count
        blob_of, compressed = self._packer(quantize)
        version = PACK_VERSION if compressed is None else PACK_VERSION_COMPRESSED
        header = {
            "format": "remoe-packed-experts", "version": version,
            "model_type": self.model_type, "layers": list(self.layers),
            "num_experts": self.num_experts, **self.layout.to_json(),
            "data_offset": 0, "source": self.source, "crc32c": crcs,
        }
        if compressed is not None:
            header["compressed"] = compressed.to_json()
            header["transposed"] = self.transposed
        # Fixed-width fields: the header's length is known before the checksums are.
        header_len = len(json.dumps(header).encode())
        header["data_offset"] = data_offset = _round_up(_PREFIX.size + header_len + 32, ALIGN)
        slot = compressed.blob_bytes if compressed is not None else self.layout.slot_bytes
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        fd = None
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                tmp = None  # not ours to remove
                raise StoreError(f"cannot write '{out}': this process is already packing it "
                                 "(its temporary file exists)") from None
            # Held until this process ends: a later pack that finds the file locked leaves it
            # alone even when the PID check cannot see this process (another PID namespace).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with tqdm(total=count * slot, unit="B", unit_scale=True,
                      desc=f"packing {out.name}", disable=not progress) as bar:
                for i, layer in enumerate(self.layers):
                    for e in range(self.num_experts):
                        blob = blob_of(layer, e)
                        crcs[i * self.num_experts + e] = f"{blob_checksum(layer, e, blob):08x}"
                        _pwrite_all(fd, blob.numpy(), data_offset + (i * self.num_experts + e)
                                    * slot)
                        bar.update(slot)
            raw = json.dumps(header).encode()
            _pwrite_all(fd, _PREFIX.pack(PACK_MAGIC, version, len(raw), _crc32c(raw)) + raw, 0)
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, out)
            tmp = None
        except OSError as error:
            code = errno.errorcode.get(error.errno, error.errno)
            raise StoreError(f"cannot write '{out}': {error.strerror or error} ({code})") from None
        finally:  # any failure, KeyboardInterrupt included: leave nothing behind
            if fd is not None:
                os.close(fd)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        _fsync_directory(out.parent)
        return out

    def _packer(self, quantize: str | None):
        """(layer, expert) -> the blob `pack` writes, and the compressed layout it has (None:
        slot layout)."""
        if quantize is None:
            return self.read_checked, self.compressed
        from remoe_engine.quant import parse_scheme, quantize_expert

        scheme = parse_scheme(quantize)
        try:
            compressed, _ = quantize_expert(self.expert_tensors(self.layers[0], 0), scheme,
                                            self.transposed)
        except ValueError as error:
            raise StoreError(f"cannot quantize the experts of '{self.source}' as "
                             f"{scheme.name}: {error}") from None

        def blob_of(layer: int, e: int) -> torch.Tensor:
            return quantize_expert(self.expert_tensors(layer, e), scheme, self.transposed,
                                   compressed)[1]

        return blob_of, compressed

    def blob_checksums(self) -> torch.Tensor | None:
        """Each blob's checksum, as the pool's reader threads check a blob they read.

        Returns:
            int64 [len(layers) * num_experts, 2] for a packed store, row i * num_experts + e (the
            blob order) = (blob_seed(layers[i], e), the header's CRC32C of that blob): the CRC32C
            of the blob's bytes continued from the seed must equal the second. None for a
            checkpoint or host store, which carry no checksums.
        """
        if self._crc32c is None:
            return None
        if self._checksums is None:
            seeds = [blob_seed(layer, e) for layer in self.layers for e in range(self.num_experts)]
            self._checksums = torch.tensor(list(zip(seeds, self._crc32c, strict=True)),
                                           dtype=torch.int64)
        return self._checksums.clone()

    def verify(self) -> None:
        """Read every blob of a packed store and check it against its keyed CRC32C.

        Raises:
            StoreError: naming the file and the first blob that fails: damaged bytes, or a header
                that does not describe the blob at that place (relabelled or moved blobs).
        """
        if self._crc32c is None:
            raise ValueError("verify: only packed stores carry checksums")
        for layer in self.layers:
            for e in range(self.num_experts):
                self.read_checked(layer, e)

    def read_checked(self, layer: int, expert: int) -> torch.Tensor:
        """`read_expert`, and for a packed store the blob's keyed CRC32C checked too.

        Raises:
            StoreError: naming the file and the blob whose bytes fail their checksum.
        """
        blob = self.read_expert(layer, expert)
        if self._crc32c is not None:
            crc = blob_checksum(layer, expert, blob)
            want = self._crc32c[self.layer_position(layer) * self.num_experts + expert]
            if crc != want:
                raise StoreError(
                    f"'{self.source}' is corrupt: expert blob (layer {layer}, expert {expert}) "
                    f"has CRC32C {crc:08x}, the header says {want:08x}: it fails its CRC32C "
                    "check (damaged, or not the blob the header describes); run `remoe pack` "
                    "again")
        return blob

    def host_copy(self, dtype: torch.dtype | None = None, *, pin_memory: bool = False
                  ) -> ExpertStore:
        """A host-tier copy of this store: every expert read once into host memory (a packed
        store's blobs checked against their CRC32C on the way), converted to `dtype`.

        Args:
            dtype: the copy's float dtype (default: this store's).
            pin_memory: page-locked host memory of exactly the blobs' size, for asynchronous
                copies to a GPU pool (needs CUDA).

        Returns:
            An ExpertStore with tier "host".
        """
        E = self.num_experts
        if self.compressed is not None:
            # The host tier keeps the compressed bytes; the pool dequantizes each load.
            blobs = torch.zeros(len(self.layers) * E, self.blob_bytes, dtype=torch.uint8,
                                pin_memory=pin_memory)
            for i, layer in enumerate(self.layers):
                for e in range(E):
                    blobs[i * E + e].copy_(self.read_checked(layer, e))
            return ExpertStore(layout=self.layout, layers=self.layers, num_experts=E,
                               model_type=self.model_type, source=self.source, host_blobs=blobs,
                               compressed=self.compressed, transposed=self.transposed)
        dtype = dtype or self.layout.dtype
        layout = self.layout.in_dtype(dtype)
        blobs = _host_blobs(len(self.layers) * E, layout.slot_bytes, pin_memory).zero_()
        for i, layer in enumerate(self.layers):
            for e in range(E):
                blob = self.read_checked(layer, e)
                if layout is self.layout:
                    blobs[i * E + e].copy_(blob)
                else:
                    src, dst = self.layout.views(blob), layout.views(blobs[i * E + e])
                    for name, tensor in src.items():
                        dst[name].copy_(tensor)  # dtype conversion, once per expert
        return ExpertStore(layout=layout, layers=self.layers, num_experts=E,
                           model_type=self.model_type, source=self.source, host_blobs=blobs,
                           transposed=self.transposed)


def _host_blobs(rows: int, slot_bytes: int, pin_memory: bool) -> torch.Tensor:
    """uint8 [rows, slot_bytes] host blobs (uninitialized), page-locked when asked: exactly
    that many bytes (`ops.pinned_host_empty`), not torch's power-of-two rounding, which pins
    64 GiB for 54 GiB of experts. Freed (and unlocked) with the tensor."""
    if not pin_memory:
        return torch.empty(rows, slot_bytes, dtype=torch.uint8)
    from remoe_engine import ops

    return ops.pinned_host_empty(rows, slot_bytes)


def measure_read_bandwidth(path: str | os.PathLike) -> tuple[float, bool]:
    """Sequential read bandwidth of a file in bytes/s, best of 3, and whether it was read with
    O_DIRECT (bypassing the page cache, as the pool reads packed files where it can): the B of
    the floor M / B that every TPOT is reported next to."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    chunk = 4 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    direct = hasattr(os, "O_DIRECT")
    best = 0.0
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            direct = False
            fd = os.open(path, os.O_RDONLY)
        try:
            start, offset = time.perf_counter(), 0
            while offset < size:
                try:
                    n = os.preadv(fd, [buf], offset)
                except OSError:  # e.g. tmpfs refuses O_DIRECT reads
                    if not direct:
                        raise
                    direct = False
                    break
                if n <= 0:
                    break
                offset += n
            elapsed = time.perf_counter() - start
            if offset >= size and elapsed > 0:
                best = max(best, size / elapsed)
        finally:
            os.close(fd)
    return best, direct


def _check_version(path: str, version: int) -> None:
    """Refuse a packed file of any format version but PACK_VERSION (slot-layout blobs) and
    PACK_VERSION_COMPRESSED (compressed blobs), saying what to do."""
    if version in (PACK_VERSION, PACK_VERSION_COMPRESSED):
        return
    if version > PACK_VERSION_COMPRESSED:
        raise StoreError(f"'{path}' has packed format version {version}; this remoe-engine reads "
                         f"versions {PACK_VERSION} and {PACK_VERSION_COMPRESSED}: upgrade "
                         "remoe-engine")
    written = ("written by an earlier remoe-engine (unkeyed CRC-32 checksums, an unchecked "
               "header)" if version == 1 else "which no remoe-engine writes")
    raise StoreError(f"'{path}' has packed format version {version}, {written}; this "
                     f"remoe-engine reads version {PACK_VERSION}: re-run `remoe pack` to rewrite "
                     "it")


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` (bytes-like) at `offset`; a short write is retried, an error raised."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:  # no progress and no error: the kernel's way of saying the device is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable, where the filesystem supports it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the rename is what makes the file whole; this only makes it durable sooner
    finally:
        os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only the existence and permission checks
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove_stale_temps(out: Path) -> list[tuple[Path, int]]:
    """Remove the temporary files `.OUT.tmp-PID` of packs of `out` that were killed.

    One is stale when process PID does not exist and no process holds the lock a pack takes on
    its temporary file; anything else (a live pack's file, a name that is not ours, a symlink, a
    file we may not remove) is left alone.

    Returns:
        (path, pid) of each file removed.
    """
    pattern = re.compile(re.escape(f".{out.name}.tmp-") + r"([0-9]+)")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or int(m[1]) == os.getpid() or _process_exists(int(m[1])):
            continue
        path = out.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer
            os.unlink(path)
            removed.append((path, int(m[1])))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _read_config(directory: Path, required: bool) -> dict:
    """config.json as a dict ({} when it is absent and not required)."""
    config = directory / "config.json"
    try:
        raw = _read_file(config)
    except FileNotFoundError:
        if not required:
            return {}
        raise StoreError(f"'{config}' does not exist: pass model_type to pick the on-disk "
                         "expert layout") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"'{config}' is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise StoreError(f"'{config}' is not a JSON object")
    return data


def _text_config(directory: Path, config: dict, required: bool) -> dict:
    """The text model's config: the top level, or `text_config` for multimodal models."""
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise StoreError(f"'{directory / 'config.json'}': text_config is not an object")
    if required and "model_type" not in text:
        raise StoreError(f"'{directory / 'config.json'}' has no model_type")
    return text


_SAFE_WEIGHTS_NAME = "model.safetensors"
_SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _checkpoint_tensors(directory: Path, config: dict) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, key -> TensorInfo, from exactly the files transformers
    loads.

    Follows transformers' `_get_resolved_checkpoint_files` (modeling_utils.py) for a local
    directory: config.json's `transformers_weights` if set (a .safetensors file or a
    .safetensors.index.json inside the directory); else `model.safetensors`; else
    `model.safetensors.index.json`, whose weight_map's distinct shard names, sorted, are the files
    (`get_checkpoint_shard_files`, utils/hub.py), each loaded whole (`_load_pretrained_model`
    reads every key of every shard). Any other .safetensors file in the directory (a backup, a
    stray shard) is not part of the model and is never read.

    Stricter than transformers in two places, where it would go on silently: it skips a name that
    is not a regular file (`os.path.isfile`) and falls through to the next candidate, where here
    the name is taken and the file refused; and when a tensor is in two shards the later shard's
    copy wins there, where here it is an error.
    """
    explicit = config.get("transformers_weights")
    if explicit is not None:
        if not (isinstance(explicit, str) and explicit.endswith((".safetensors",
                                                                  ".safetensors.index.json"))):
            raise StoreError(f"'{directory / 'config.json'}': transformers_weights "
                             f"{_short(explicit)} is neither a .safetensors file nor a "
                             ".safetensors.index.json")
        target = directory / explicit
        if os.path.commonpath([os.path.abspath(directory), os.path.abspath(target)]) != (
                os.path.abspath(directory)):
            raise StoreError(f"'{directory / 'config.json'}': transformers_weights "
                             f"{explicit!r} is outside the checkpoint directory")
        sharded = explicit.endswith(".safetensors.index.json")
    elif os.path.lexists(directory / _SAFE_WEIGHTS_NAME):
        target, sharded = directory / _SAFE_WEIGHTS_NAME, False
    elif os.path.lexists(directory / _SAFE_WEIGHTS_INDEX_NAME):
        target, sharded = directory / _SAFE_WEIGHTS_INDEX_NAME, True
    else:
        present = sorted(p.name for p in directory.glob("*.safetensors"))
        raise StoreError(f"'{directory}' has neither {_SAFE_WEIGHTS_NAME} nor "
                         f"{_SAFE_WEIGHTS_INDEX_NAME}, so transformers would not load it "
                         f"(.safetensors files there: {', '.join(present) or 'none'})")
    if not sharded:
        return read_safetensors_header(target)

    index = target
    try:
        weight_map = json.loads(_read_file(index).decode("utf-8"))["weight_map"]
        if not (isinstance(weight_map, dict)
                and all(isinstance(shard, str) for shard in weight_map.values())):
            raise TypeError(f"weight_map is not an object of shard file names: "
                            f"{_short(weight_map)}")
    except FileNotFoundError:
        raise StoreError(f"checkpoint index '{index}' does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise StoreError(f"'{index}' is corrupt: {error}") from None
    by_file: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_file.setdefault(shard, []).append(key)
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(by_file):
        shard_path = directory / shard
        if not os.path.lexists(shard_path):
            keys = by_file[shard]
            raise StoreError(f"shard '{shard_path}' is missing: '{index}' maps {len(keys)} "
                             f"tensors to it, e.g. '{keys[0]}'")
        header = read_safetensors_header(shard_path)
        for key in by_file[shard]:
            if key not in header:
                raise StoreError(f"'{index}' maps tensor '{key}' to '{shard_path}', whose "
                                 "header has no such tensor")
        for key, info in header.items():
            if key in tensors:
                raise StoreError(f"tensor '{key}' is in both '{tensors[key].file}' and "
                                 f"'{shard_path}' ('{index}' maps it to "
                                 f"'{weight_map.get(key, 'neither')}'): which one is meant?")
            tensors[key] = info
    return tensors


def _index_any(tensors: dict[str, TensorInfo], spec: families.DiskLayout,
               num_layers: int | None, quant_config: dict | None = None):
    """`_index_experts` with the first of a layout and its alternatives that matches any key
    (transformers applies a conversion rule only where its source keys exist, too)."""
    first_error = None
    tensors, companions = _with_mxfp4(tensors)
    for candidate in (spec, *spec.alternatives):
        try:
            return _index_experts(tensors, candidate, num_layers, quant_config, companions)
        except _NoExpertKeys as error:
            first_error = first_error or error
    raise first_error


class _NoExpertKeys(StoreError):
    """No checkpoint key matches a layout's pieces."""


def _index_experts(tensors: dict[str, TensorInfo], spec: families.DiskLayout,
                   num_layers: int | None = None, quant_config: dict | None = None,
                   companions: dict[str, tuple[TensorInfo, TensorInfo]] | None = None,
                   ) -> tuple[SlotLayout, list[int], int, dict[tuple[int, int], list[Segment]],
                              QuantLayout | None]:
    """Match checkpoint keys against a family's disk layout and build each expert's segments
    (only layers below `num_layers` when given). FP8 and MXFP4 experts (`_with_mxfp4`) give a
    compressed layout too (`_index_compressed`); else it is None."""
    patterns = [(piece, re.compile(piece.pattern)) for piece in spec.pieces]
    # (layer, expert or None for fused keys, piece index) -> tensor
    found: dict[tuple[int, int | None, int], TensorInfo] = {}
    for key, info in tensors.items():
        for i, (piece, pattern) in enumerate(patterns):
            m = pattern.search(key)
            if m and (num_layers is None or int(m["L"]) < num_layers):
                found[(int(m["L"]), None if piece.fused else int(m["E"]), i)] = info
                break
    if not found:
        raise _NoExpertKeys(f"no routed expert tensors of the '{spec.name}' layout found among "
                         f"{len(tensors)} checkpoint tensors (e.g. '{next(iter(tensors), '')}')")
    layers = sorted({layer for layer, _, _ in found})
    fused = all(piece.fused for piece in spec.pieces)
    if fused:
        num_experts = found[(layers[0], None, 0)].shape[0]
    else:
        num_experts = 1 + max(e for _, e, _ in found)

    # One reference tensor per piece fixes dtype and per-expert shape; every other must match.
    ref_dtype: TensorInfo | None = None
    ref_piece: dict[int, TensorInfo] = {}

    def expert_shape(info: TensorInfo, piece: families.DiskPiece) -> tuple[int, ...]:
        return info.shape[1:] if piece.fused else info.shape

    def lookup(layer: int, expert: int, i: int) -> TensorInfo:
        nonlocal ref_dtype
        info = found.get((layer, None if patterns[i][0].fused else expert, i))
        if info is None:
            example = next((t.key for (lay, _, j), t in found.items() if j == i and lay == layer),
                           None) or next(t.key for (_, _, j), t in found.items() if j == i)
            raise StoreError(f"layer {layer} expert {expert}: missing tensor matching "
                             f"'{patterns[i][0].pattern}' (like '{example}')")
        if info.dtype not in _ST_DTYPES and info.dtype not in _COMPRESSED:
            raise StoreError(f"tensor '{info.key}' in '{info.file}' has dtype {info.dtype}, which "
                             f"remoe-engine does not read experts in (it reads "
                             f"{', '.join([*_ST_DTYPES, *_COMPRESSED])})")
        if compressed:  # compressed weights beside raw biases: one dtype per piece
            ref_dtype = ref_piece.get(i, info)
        ref_dtype = ref_dtype or info
        if info.dtype != ref_dtype.dtype:
            raise StoreError(f"dtype mismatch: tensor '{info.key}' in '{info.file}' is "
                             f"{info.dtype} but '{ref_dtype.key}' in '{ref_dtype.file}' is "
                             f"{ref_dtype.dtype}; every routed expert tensor must share one dtype")
        ref = ref_piece.setdefault(i, info)
        piece = patterns[i][0]
        if expert_shape(info, piece) != expert_shape(ref, piece) or (
                piece.fused and info.shape[0] != num_experts):
            raise StoreError(f"shape mismatch: tensor '{info.key}' in '{info.file}' has shape "
                             f"{list(info.shape)} but '{ref.key}' has {list(ref.shape)}")
        return info

    compressed = any(info.dtype in _COMPRESSED for info in found.values())
    layer0 = [lookup(layers[0], 0, i) for i in range(len(patterns))]
    if compressed:
        return _index_compressed(spec, patterns, layers, num_experts, layer0, lookup, tensors,
                                 quant_config or {}, companions or {})
    dtype = _ST_DTYPES[layer0[0].dtype]
    shapes = []
    for param in spec.params:
        parts = sorted((piece.part, i) for i, (piece, _) in enumerate(patterns)
                       if piece.param == param)
        part_shapes = [expert_shape(layer0[i], patterns[i][0]) for _, i in parts]
        if any(s[1:] != part_shapes[0][1:] for s in part_shapes):
            keys = [layer0[i].key for _, i in parts]
            raise StoreError(f"'{param}' parts cannot be concatenated on dim 0: shapes "
                             f"{[list(s) for s in part_shapes]} ({keys})")
        shapes.append((param, (sum(s[0] for s in part_shapes), *part_shapes[0][1:])))
    layout = SlotLayout.build(dtype, shapes)

    segments: dict[tuple[int, int], list[Segment]] = {}
    for layer in layers:
        for e in range(num_experts):
            segs = []
            for param in spec.params:
                at = layout.tensor(param).offset
                for _, i in sorted((p.part, i) for i, (p, _) in enumerate(patterns)
                                   if p.param == param):
                    info = lookup(layer, e, i)
                    piece = patterns[i][0]
                    n = info.nbytes // num_experts if piece.fused else info.nbytes
                    offset = info.offset + (e * n if piece.fused else 0)
                    segs.append(Segment(info.file, offset, n, at, info.key))
                    at += n
            segments[(layer, e)] = segs
    return layout, layers, num_experts, segments, None


# Expert weights stored compressed: transformers' finegrained FP8 (a float8_e4m3fn weight with a
# `weight_scale_inv` grid beside it) and MXFP4 (`*_blocks` and `*_scales`, seen here as one
# virtual tensor of dtype "MXFP4" under the parameter's own name).
_COMPRESSED = ("F8_E4M3", "MXFP4")
_FP8_SCALE_DTYPES = {"F32": "f32", "F8_E8M0": "e8m0", "U8": "e8m0"}


def _with_mxfp4(tensors: dict[str, TensorInfo]
                ) -> tuple[dict[str, TensorInfo], dict[str, tuple[TensorInfo, TensorInfo]]]:
    """The checkpoint's tensors, with each MXFP4 pair `X_blocks` [.., R, G, 16] + `X_scales`
    [.., R, G] also seen as one tensor `X` of dtype "MXFP4" and shape [.., R, 32 G] (the
    dequantized [out, in] shape, before transformers transposes it).

    Returns:
        (tensors, {X: (blocks, scales)}).
    """
    companions = {}
    extra = {}
    for key, blocks in tensors.items():
        if not key.endswith("_blocks"):
            continue
        base = key.removesuffix("_blocks")
        scales = tensors.get(base + "_scales")
        if scales is None or base in tensors:
            continue
        if blocks.dtype != "U8" or len(blocks.shape) < 3 or blocks.shape[-1] != 16:
            raise StoreError(f"MXFP4 tensor '{key}' in '{blocks.file}' is {blocks.dtype} "
                             f"{list(blocks.shape)}; transformers' MXFP4 blocks are U8 "
                             "[.., rows, groups, 16] (32 e2m1 codes per group)")
        if scales.dtype not in ("U8", "F8_E8M0") or tuple(scales.shape) != blocks.shape[:-1]:
            raise StoreError(f"MXFP4 scales '{scales.key}' in '{scales.file}' are {scales.dtype} "
                             f"{list(scales.shape)}, but '{key}' {list(blocks.shape)} needs U8 "
                             f"{list(blocks.shape[:-1])} (one UE8M0 exponent per 32 codes)")
        shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
        extra[base] = TensorInfo(base, blocks.file, blocks.offset, blocks.nbytes, "MXFP4", shape,
                                 blocks.identity)
        companions[base] = (blocks, scales)
    return ({**tensors, **extra} if extra else tensors), companions


def _fp8_scale_key(key: str) -> str:
    """transformers' name of a FP8 weight's scales (Fp8Quantize._quantize_one)."""
    return key.removesuffix("weight") + "weight_scale_inv" if key.endswith(".weight") else (
        key + "_scale_inv")


def _index_compressed(spec, patterns, layers, num_experts, layer0, lookup, tensors, quant_config,
                      companions):
    """`_index_experts` for FP8 / MXFP4 experts: the slot layout (nominal dtype bfloat16, or the
    raw tensors' dtype), the compressed blob layout, and each expert's segments into the blob."""
    from remoe_engine.quant import RAW_CODES, LayoutBuilder, QuantPart

    block = quant_config.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(_is_count(b) and b > 0 for b in block)):
        raise StoreError(f"quantization_config.weight_block_size {_short(block)} is not two "
                         "positive integers")
    builder = LayoutBuilder()
    placed: list[tuple[int, QuantPart]] = []  # (piece index, part)
    shapes = []
    raw_dtypes = set()
    kinds = set()
    for param in spec.params:
        row0, width, transposed, ndim = 0, None, False, 2
        for _, i in sorted((p.part, i) for i, (p, _) in enumerate(patterns) if p.param == param):
            info, piece = layer0[i], patterns[i][0]
            shape = info.shape[1:] if piece.fused else info.shape
            if info.dtype == "MXFP4":
                kinds.add("mxfp4")
                rows, cols = shape
                part = QuantPart(param, row0, rows, cols, True, "e2m1", 0, (1, 32), "e8m0", 0)
                transposed = True
            elif info.dtype == "F8_E4M3":
                kinds.add("fp8")
                if len(shape) != 2:
                    raise StoreError(f"FP8 tensor '{info.key}' is {list(info.shape)}: not a matrix")
                rows, cols = shape
                scale = _fp8_scales(info, piece, tensors, num_experts)
                grid = scale.shape[1:] if piece.fused else scale.shape
                bm, bn = _fp8_block(info, scale, rows, cols, grid, block)
                part = QuantPart(param, row0, rows, cols, False, "fp8_e4m3", 0, (bm, bn),
                                 _FP8_SCALE_DTYPES[scale.dtype], 0)
            else:
                dtype = _ST_DTYPES[info.dtype]
                if dtype not in RAW_CODES:
                    raise StoreError(f"tensor '{info.key}' is {info.dtype}: beside compressed "
                                     "experts only float tensors are read")
                raw_dtypes.add(dtype)
                ndim = len(shape)
                rows, cols = (1, shape[0]) if ndim == 1 else shape
                part = QuantPart(param, row0, rows, cols, False, RAW_CODES[dtype], 0)
            if width is not None and (cols != width or transposed):
                raise StoreError(f"'{param}' parts cannot be concatenated: '{info.key}' has "
                                 f"{cols} input columns, the part before it {width}")
            width = cols
            row0 += rows
            placed.append((i, builder.add(part)))
        shapes.append((param, (width,) if ndim == 1 else (width, row0) if transposed
                       else (row0, width)))
    nominal = raw_dtypes.pop() if len(raw_dtypes) == 1 else torch.bfloat16
    layout = SlotLayout.build(nominal, shapes)
    quant = builder.build("+".join(sorted(kinds)))
    quant.check_covers(layout)

    def piece_of(info: TensorInfo, fused: bool, e: int, want: int, where: str) -> Segment:
        n = info.nbytes // num_experts if fused else info.nbytes
        if n != want:
            raise StoreError(f"tensor '{info.key}' in '{info.file}' holds {n} bytes per expert, "
                             f"its compressed layout needs {want}")
        return Segment(info.file, info.offset + (e * n if fused else 0), n, 0, where)

    segments: dict[tuple[int, int], list[Segment]] = {}
    for layer in layers:
        for e in range(num_experts):
            segs = []
            for i, part in placed:
                info, piece = lookup(layer, e, i), patterns[i][0]
                if info.dtype == "MXFP4":
                    blocks, scales = companions[info.key]
                    pairs = [(blocks, part.code_bytes, part.code_offset),
                             (scales, part.scale_bytes, part.scale_offset)]
                elif info.dtype == "F8_E4M3":
                    scale = _fp8_scales(info, piece, tensors, num_experts)
                    ref = _fp8_scales(layer0[i], piece, tensors, num_experts)
                    if scale.shape != ref.shape or scale.dtype != ref.dtype:
                        raise StoreError(
                            f"scale mismatch: '{scale.key}' in '{scale.file}' is {scale.dtype} "
                            f"{list(scale.shape)} but '{ref.key}' is {ref.dtype} "
                            f"{list(ref.shape)}")
                    pairs = [(info, part.code_bytes, part.code_offset),
                             (scale, part.scale_bytes, part.scale_offset)]
                else:
                    pairs = [(info, part.code_bytes, part.code_offset)]
                for t, want, offset in pairs:
                    seg = piece_of(t, piece.fused, e, want, t.key)
                    segs.append(dataclasses.replace(seg, slot_offset=offset))
            segments[(layer, e)] = segs
    return layout, layers, num_experts, segments, quant


def _fp8_scales(info: TensorInfo, piece, tensors: dict[str, TensorInfo],
                num_experts: int) -> TensorInfo:
    key = _fp8_scale_key(info.key)
    scale = tensors.get(key)
    if scale is None:
        raise StoreError(f"FP8 tensor '{info.key}' in '{info.file}' has no scales: expected "
                         f"'{key}' (transformers' finegrained FP8 layout)")
    if scale.dtype not in _FP8_SCALE_DTYPES:
        raise StoreError(f"FP8 scales '{key}' in '{scale.file}' are {scale.dtype}; transformers "
                         "reads F32 or UE8M0 (F8_E8M0) weight_scale_inv")
    if len(scale.shape) != len(info.shape) or (piece.fused and scale.shape[0] != num_experts):
        raise StoreError(f"FP8 scales '{key}' are {list(scale.shape)}, which does not match "
                         f"'{info.key}' {list(info.shape)}")
    return scale


def _fp8_block(info: TensorInfo, scale: TensorInfo, rows: int, cols: int, grid, block
               ) -> tuple[int, int]:
    """The block a FP8 weight's scale grid covers: quantization_config.weight_block_size (the
    last blocks may be ragged), else rows / grid rows exactly, as transformers' Fp8Dequantize."""
    gr, gc = grid
    if block is not None:
        bm, bn = block
        if (gr, gc) != (-(-rows // bm), -(-cols // bn)):
            raise StoreError(f"FP8 scales '{scale.key}' in '{scale.file}' are a {gr} x {gc} grid, "
                             f"but '{info.key}' [{rows}, {cols}] in {bm} x {bn} blocks "
                             f"(weight_block_size) needs {-(-rows // bm)} x {-(-cols // bn)}")
        return bm, bn
    if gr == 0 or gc == 0 or rows % gr or cols % gc:
        raise StoreError(f"FP8 scales '{scale.key}' ({gr} x {gc}) do not divide '{info.key}' "
                         f"[{rows}, {cols}] and config.json gives no weight_block_size")
    return rows // gr, cols // gc
