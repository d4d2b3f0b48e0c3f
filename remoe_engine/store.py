"""Where routed experts' bytes live, and how one expert maps onto one pool slot.

Three tiers feed the slot pool (`remoe_engine.pool`):

- a Hugging Face checkpoint directory (`ExpertStore.from_checkpoint`): one or many safetensors
  shards, with or without `model.safetensors.index.json`. Only the headers are read, to get each
  expert tensor's byte range; the pool then reads those ranges straight from the files.
- a packed file (`ExpertStore.from_packed`, written by `ExpertStore.pack` / `remoe pack`):
  expert-major, each expert one 4 KiB-aligned blob in slot layout, so a miss is one read (and can
  use O_DIRECT).
- host memory (`ExpertStore.from_model`): every expert as one blob row of a host tensor, pinned on
  CUDA machines, taken from a live transformers model.

Slot layout (`SlotLayout`): one expert is one contiguous blob holding the experts module's fused
parameters for that expert, in its in-memory orientation, each at a 256-byte-aligned offset:

- most families: `gate_up_proj [2I, H]` (gate rows, then up rows) | `down_proj [H, I]`
- GPT-OSS: `gate_up_proj [H, 2I]` (gate/up interleaved) | `gate_up_proj_bias [2I]` |
  `down_proj [I, H]` | `down_proj_bias [H]`

The bytes of each tensor equal transformers' `experts.<name>[e]` exactly, so the expert
computation views a slot as tensors without a copy (`SlotLayout.views`).

Packed file format, version 1 (all integers little-endian):

    [0, 8)            magic b"REMOEPAK"
    [8, 12)           u32 format version
    [12, 16)          u32 n: byte length of the JSON header
    [16, 16 + n)      JSON: model_type, layers, num_experts, dtype, tensors (name, shape, offset,
                      nbytes), slot_bytes, data_offset, crc32 (hex string per blob), source
    [.., data_offset) zero padding; data_offset is a multiple of 4096
    blob (i, e)       at data_offset + (i * num_experts + e) * slot_bytes, i = position of the
                      layer in `layers`; slot_bytes is a multiple of 4096, padding is zero
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from remoe_engine import families

__all__ = [
    "ALIGN", "ExpertStore", "PACK_MAGIC", "PACK_VERSION", "Segment", "SlotLayout", "SlotTensor",
    "StoreError", "TensorInfo", "read_safetensors_header",
]

ALIGN = 4096  # blob and slot alignment: the O_DIRECT block size (csrc/transfer/reader.h)
TENSOR_ALIGN = 256  # tensor offsets inside a slot: enough for any vectorized load
PACK_MAGIC = b"REMOEPAK"
PACK_VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, JSON length

# safetensors dtype names -> torch dtypes.
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


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header."""

    key: str
    file: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) into byte ranges.

    Args:
        path: a .safetensors file.

    Returns:
        key -> TensorInfo with absolute offsets, for every tensor of the file.

    Raises:
        StoreError: naming the file (and tensor) when the file is missing, truncated or its header
            is corrupt or inconsistent with the file size.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise StoreError(f"'{path}' is truncated: {size} bytes, not even a safetensors "
                                 "header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > 100 << 20:
                raise StoreError(f"'{path}' is truncated or not a safetensors file: header length "
                                 f"{n} but the file has {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise StoreError(f"safetensors file '{path}' does not exist") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"'{path}' has a corrupt safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise StoreError(f"'{path}' has a corrupt safetensors header: not a JSON object")
    data_start = 8 + n
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"'{path}': corrupt header entry for tensor '{key}': "
                             f"{entry!r}") from None
        if dtype not in _ST_DTYPES:
            raise StoreError(f"'{path}': tensor '{key}' has dtype {dtype}, which remoe-engine does "
                             f"not read (known: {', '.join(_ST_DTYPES)})")
        itemsize = _ST_DTYPES[dtype].itemsize
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise StoreError(f"'{path}': tensor '{key}' spans bytes {begin}..{end} but shape "
                             f"{list(shape)} of {dtype} needs {math.prod(shape) * itemsize}")
        if data_start + end > size:
            raise StoreError(f"'{path}' is truncated: tensor '{key}' ends at byte "
                             f"{data_start + end} but the file has {size} bytes")
        out[key] = TensorInfo(key, path, data_start + begin, end - begin, dtype, shape)
    return out


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
        dtype = getattr(torch, d["dtype"])
        tensors = tuple(SlotTensor(t["name"], tuple(t["shape"]), t["offset"], t["nbytes"])
                        for t in d["tensors"])
        layout = cls(dtype, tensors, d["slot_bytes"])
        for t in tensors:
            if (t.offset % TENSOR_ALIGN or t.offset + t.nbytes > layout.slot_bytes
                    or t.nbytes != math.prod(t.shape) * dtype.itemsize):
                raise ValueError(f"tensor {t.name!r} at {t.offset}+{t.nbytes} does not fit a "
                                 f"{layout.slot_bytes}-byte slot of {dtype}")
        if layout.slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes {layout.slot_bytes} is not a multiple of {ALIGN}")
        return layout


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
    """

    def __init__(self, *, layout: SlotLayout, layers: Sequence[int], num_experts: int,
                 model_type: str, source: str,
                 segments: dict[tuple[int, int], list[Segment]] | None = None,
                 host_blobs: torch.Tensor | None = None, crc32: Sequence[int] | None = None):
        if (segments is None) == (host_blobs is None):
            raise ValueError("ExpertStore needs exactly one of segments (disk) or host_blobs")
        self.layout = layout
        self.layers = tuple(int(layer) for layer in layers)
        self.num_experts = int(num_experts)
        self.model_type = model_type
        self.source = source
        self.tier = "host" if host_blobs is not None else "disk"
        self.host_blobs = host_blobs
        self._segments = segments or {}
        self._crc32 = list(crc32) if crc32 is not None else None
        self._layer_pos = {layer: i for i, layer in enumerate(self.layers)}
        self._fds: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"ExpertStore({self.model_type}, {self.tier} tier from {self.source!r}: "
                f"{len(self.layers)} layers x {self.num_experts} experts, "
                f"{self.layout.slot_bytes} bytes per slot)")

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
        """One expert's slot bytes, read in Python (for packing and checks, not the hot path).

        Returns:
            uint8 [slot_bytes]; padding is zero (a view of `host_blobs` for the host tier).
        """
        self._check(layer, expert)
        if self.tier == "host":
            return self.host_blobs[self._layer_pos[layer] * self.num_experts + expert]
        buf = bytearray(self.layout.slot_bytes)
        view = memoryview(buf)
        for s in self._segments[(layer, expert)]:
            fd = self._fds.get(s.file)
            if fd is None:
                fd = self._fds[s.file] = os.open(s.file, os.O_RDONLY | os.O_CLOEXEC)
            got = os.preadv(fd, [view[s.slot_offset : s.slot_offset + s.nbytes]], s.offset)
            if got != s.nbytes:
                raise StoreError(f"'{s.file}' is truncated: '{s.what}' needs bytes "
                                 f"{s.offset}..{s.offset + s.nbytes}, got {got} of {s.nbytes}")
        return torch.frombuffer(buf, dtype=torch.uint8)

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors (name -> [*shape]), as transformers holds `experts.<name>[e]`."""
        return self.layout.views(self.read_expert(layer, expert))

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
            path: checkpoint directory (config.json + one or many .safetensors, with or without
                model.safetensors.index.json), or one .safetensors file inside it.
            model_type: overrides config.json's model_type (picks the on-disk layout).

        Returns:
            A disk-tier store.

        Raises:
            StoreError: naming the file and tensor: missing shard, truncated or corrupt header,
                missing expert tensor, dtype or shape mismatch between experts.
        """
        path = Path(path)
        directory = path.parent if path.is_file() else path
        if not directory.is_dir():
            raise StoreError(f"checkpoint directory '{directory}' does not exist")
        config = _read_text_config(directory, required=model_type is None)
        model_type = model_type or config["model_type"]
        layout_spec = families.disk_layout_of(model_type)
        tensors = _checkpoint_tensors(directory, only=path if path.is_file() else None)
        # Layers past num_hidden_layers are not part of the model transformers builds (DeepSeek-V3
        # keeps its multi-token-prediction layer 61 on disk): never index them.
        layout, layers, num_experts, segments = _index_experts(
            tensors, layout_spec, config.get("num_hidden_layers"))
        return cls(layout=layout, layers=layers, num_experts=num_experts, model_type=model_type,
                   source=str(directory), segments=segments)

    @classmethod
    def from_packed(cls, path: str | os.PathLike) -> ExpertStore:
        """Open a packed expert file (written by `pack` / `remoe pack`).

        Raises:
            StoreError: naming the file: not a packed file, newer format version, corrupt header,
                truncated (naming the first missing expert blob).
        """
        path = str(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                prefix = f.read(_PREFIX.size)
                magic, version, n = (_PREFIX.unpack(prefix) if len(prefix) == _PREFIX.size
                                     else (prefix, 0, 0))
                if magic != PACK_MAGIC:
                    raise StoreError(f"'{path}' is not a remoe packed expert file (it starts with "
                                     f"{prefix[:8]!r}, expected {PACK_MAGIC!r})")
                if version > PACK_VERSION:
                    raise StoreError(f"'{path}' has packed format version {version}; this "
                                     f"remoe-engine reads up to {PACK_VERSION}: upgrade it")
                raw = f.read(n)
        except FileNotFoundError:
            raise StoreError(f"packed expert file '{path}' does not exist") from None
        try:
            header = json.loads(raw)
            layout = SlotLayout.from_json(header)
            layers, num_experts = header["layers"], int(header["num_experts"])
            data_offset, crc32 = int(header["data_offset"]), header["crc32"]
            if data_offset % ALIGN or data_offset < _PREFIX.size + n:
                raise ValueError(f"data_offset {data_offset} is not a multiple of {ALIGN} past "
                                 "the header")
            if len(crc32) != len(layers) * num_experts:
                raise ValueError(f"{len(crc32)} checksums for {len(layers)} x {num_experts} blobs")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise StoreError(f"'{path}' has a corrupt header: {error}") from None
        expected = data_offset + len(layers) * num_experts * layout.slot_bytes
        if size < expected:
            first = max(0, size - data_offset) // layout.slot_bytes
            raise StoreError(
                f"'{path}' is truncated: {size} bytes, its header describes {expected}; expert "
                f"blob (layer {layers[first // num_experts]}, expert {first % num_experts}) and "
                "all after it are missing or incomplete")
        segments = {}
        for i, layer in enumerate(layers):
            for e in range(num_experts):
                offset = data_offset + (i * num_experts + e) * layout.slot_bytes
                segments[(layer, e)] = [Segment(path, offset, layout.slot_bytes, 0,
                                                f"expert blob (layer {layer}, expert {e})")]
        return cls(layout=layout, layers=layers, num_experts=num_experts,
                   model_type=header.get("model_type", "?"), source=path, segments=segments,
                   crc32=[int(c, 16) for c in crc32])

    @classmethod
    def from_model(cls, model: nn.Module, *, pin_memory: bool | None = None, take: bool = False
                   ) -> ExpertStore:
        """Copy a live transformers model's routed experts into host blobs (the host tier).

        Args:
            model: a transformers v5 MoE model with materialized experts (any device).
            pin_memory: pin the blobs (fast, truly async host-to-GPU copies). Default: pin when
                CUDA is available.
            take: after copying a layer's experts, replace its expert parameters with meta
                tensors of the same shape, freeing their memory (peak: the model + one layer).

        Returns:
            A host-tier store; `host_blobs` is uint8 [len(layers) * num_experts, slot_bytes].
        """
        blocks = families.find_moe_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MoE blocks")
        family = families.family_of(model.config)
        params = families.DISK_LAYOUTS[family.disk_layout].params
        first = blocks[0].experts
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
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        rows = len(blocks) * num_experts
        blobs = torch.empty(rows, layout.slot_bytes, dtype=torch.uint8, pin_memory=pin_memory)
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
                   model_type=family.model_type, source="model", host_blobs=blobs)

    # --- packed files ----------------------------------------------------------------------------

    def pack(self, out: str | os.PathLike, *, progress: bool = True) -> Path:
        """Write this store as a packed expert file (format in the module docstring).

        Written to a temporary file next to `out`, flushed to disk, then renamed over `out`, so
        a crash never leaves a half-written file under the final name.

        Args:
            out: destination path.
            progress: show a progress bar (tqdm, on stderr).

        Returns:
            The path written.
        """
        from tqdm import tqdm

        out = Path(out)
        count = len(self.layers) * self.num_experts
        header = {
            "format": "remoe-packed-experts", "version": PACK_VERSION,
            "model_type": self.model_type, "layers": list(self.layers),
            "num_experts": self.num_experts, **self.layout.to_json(),
            "data_offset": 0, "source": self.source, "crc32": ["00000000"] * count,
        }
        # Fixed-width fields: the header's length is known before the checksums are.
        header_len = len(json.dumps(header).encode())
        header["data_offset"] = _round_up(_PREFIX.size + header_len + 32, ALIGN)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f, tqdm(total=count * self.layout.slot_bytes, unit="B",
                                            unit_scale=True, desc=f"packing {out.name}",
                                            disable=not progress) as bar:
                f.seek(header["data_offset"])
                for i, layer in enumerate(self.layers):
                    for e in range(self.num_experts):
                        blob = self.read_expert(layer, e).numpy()
                        header["crc32"][i * self.num_experts + e] = f"{zlib.crc32(blob):08x}"
                        f.write(blob)
                        bar.update(len(blob))
                raw = json.dumps(header).encode()
                f.seek(0)
                f.write(_PREFIX.pack(PACK_MAGIC, PACK_VERSION, len(raw)) + raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out

    def verify(self) -> None:
        """Check every blob of a packed store against its CRC-32 (the pool does not, per read).

        Raises:
            StoreError: naming the file and the first corrupt blob.
        """
        if self._crc32 is None:
            raise ValueError("verify: only packed stores carry checksums")
        for i, layer in enumerate(self.layers):
            for e in range(self.num_experts):
                crc = zlib.crc32(self.read_expert(layer, e).numpy())
                if crc != self._crc32[i * self.num_experts + e]:
                    raise StoreError(f"'{self.source}' is corrupt: expert blob (layer {layer}, "
                                     f"expert {e}) has CRC-32 {crc:08x}, the header says "
                                     f"{self._crc32[i * self.num_experts + e]:08x}")


def _read_text_config(directory: Path, required: bool) -> dict:
    """config.json's text config (the top level, or `text_config` for multimodal models)."""
    config = directory / "config.json"
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        if not required:
            return {}
        raise StoreError(f"'{config}' does not exist: pass model_type to pick the on-disk "
                         "expert layout") from None
    except json.JSONDecodeError as error:
        raise StoreError(f"'{config}' is not valid JSON: {error}") from None
    text = data.get("text_config") or data
    if required and "model_type" not in text:
        raise StoreError(f"'{config}' has no model_type")
    return text


def _checkpoint_tensors(directory: Path, only: Path | None) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, key -> TensorInfo, shards resolved through the index."""
    index = directory / "model.safetensors.index.json"
    if only is not None:
        return read_safetensors_header(only)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise StoreError(f"'{index}' is corrupt: {error}") from None
        by_file: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_file.setdefault(shard, []).append(key)
        tensors = {}
        for shard, keys in by_file.items():
            shard_path = directory / shard
            if not shard_path.exists():
                raise StoreError(f"shard '{shard_path}' is missing: '{index}' maps {len(keys)} "
                                 f"tensors to it, e.g. '{keys[0]}'")
            header = read_safetensors_header(shard_path)
            for key in keys:
                if key not in header:
                    raise StoreError(f"'{index}' maps tensor '{key}' to '{shard_path}', whose "
                                     "header has no such tensor")
                tensors[key] = header[key]
        return tensors
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise StoreError(f"'{directory}' has no .safetensors files")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    return tensors


def _index_experts(tensors: dict[str, TensorInfo], spec: families.DiskLayout,
                   num_layers: int | None = None,
                   ) -> tuple[SlotLayout, list[int], int, dict[tuple[int, int], list[Segment]]]:
    """Match checkpoint keys against a family's disk layout and build each expert's segments
    (only layers below `num_layers` when given)."""
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
        raise StoreError(f"no routed expert tensors of the '{spec.name}' layout found among "
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

    layer0 = [lookup(layers[0], 0, i) for i in range(len(patterns))]
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
    return layout, layers, num_experts, segments
