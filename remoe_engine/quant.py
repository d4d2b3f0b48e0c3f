"""Compressed experts: the byte layout of one compressed expert blob, its dequantization, and the
quantizers `remoe pack --quantize` uses.

A compressed store keeps each expert as one blob of codes and scales (`QuantLayout`); the pool
reads (and checksums) the blob and dequantizes it into the slot in the compute dtype as it loads
(csrc/quant/dequant.h: in the reader thread on the CPU). Storage, the host tier and every transfer
move the compressed bytes; the slot holds the compute dtype.

A blob is made of parts. Each part is a matrix [rows, cols] of codes with a grid of scales over
[block_rows, block_cols] blocks (and zero points for uint4), landing in rows [row0, row0 + rows)
of one slot tensor seen as [out, in] (`transposed`: the tensor is stored [in, out], as GPT-OSS
keeps its experts, so the part lands transposed). Element (r, c) dequantizes to

    raw codes (f32 / bf16 / f16)     code
    fp8_e4m3, e2m1, int8             code * scale[r // block_rows, c // block_cols]
    uint4                            (code - zero[..]) * scale[..]

computed in fp32, then rounded to the slot dtype. The formats:

- "fp8" (read from checkpoints): transformers' finegrained FP8 (`integrations/finegrained_fp8.py`):
  float8_e4m3fn weights with a `weight_scale_inv` grid (fp32, or UE8M0 = float8_e8m0fnu powers of
  two) over `quantization_config.weight_block_size` blocks (128 x 128 in DeepSeek-V3/R1, Qwen3
  FP8), ragged last blocks allowed.
- "mxfp4" (read from checkpoints): transformers' MXFP4 (`integrations/mxfp4.py`, GPT-OSS):
  `*_blocks` [.., R, C / 32, 16] uint8, two e2m1 codes per byte (low nibble first), `*_scales`
  [.., R, C / 32] uint8 UE8M0 exponents (2^(s - 127)); transformers dequantizes [R, C] and
  transposes it to the in-memory [C, R].
- "int8[:gN]" (remoe pack): symmetric round-to-nearest, one fp32 scale per row (or per group of N
  columns of the [out, in] matrix).
- "int4:gN" (remoe pack): asymmetric round-to-nearest over groups of N input columns (default
  64), fp16 scale and zero point per group; optionally refined HQQ-style (`refine=True`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

__all__ = ["QuantLayout", "QuantPart", "QuantScheme", "parse_scheme", "quantize_expert"]

CODE_KINDS = {"f32": 0, "bf16": 1, "f16": 2, "fp8_e4m3": 3, "e2m1": 4, "int8": 5, "uint4": 6}
SCALE_KINDS = {None: -1, "f32": 0, "e8m0": 1, "f16": 2, "bf16": 3}
CODE_BITS = {"f32": 32, "bf16": 16, "f16": 16, "fp8_e4m3": 8, "e2m1": 4, "int8": 8, "uint4": 4}
SCALE_BYTES = {"f32": 4, "e8m0": 1, "f16": 2, "bf16": 2}
RAW_CODES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_TORCH_OF = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# transformers' FP4_VALUES (integrations/mxfp4.py): e2m1 code -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
               -6.0)

PART_ALIGN = 256  # codes and scales start at multiples of it, as slot tensors do
BLOB_ALIGN = 4096  # store.ALIGN: a blob is read with O_DIRECT


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class QuantPart:
    """One matrix of codes (and its scales) landing in rows of one slot tensor."""

    param: str  # slot tensor, e.g. "gate_up_proj"
    row0: int  # first row of the [out, in] view of the tensor it fills
    rows: int
    cols: int
    transposed: bool  # the slot tensor is stored [in, out]
    codes: str  # a CODE_KINDS name
    code_offset: int
    block: tuple[int, int] = (1, 1)  # (block_rows, block_cols) of one scale
    scale: str | None = None  # a SCALE_KINDS name; None for raw codes
    scale_offset: int = -1
    zero_offset: int = -1  # uint4 only: zero points, same dtype and grid as the scales

    @property
    def code_bytes(self) -> int:
        return (self.rows * self.cols * CODE_BITS[self.codes] + 7) // 8

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.rows // self.block[0]), -(-self.cols // self.block[1]))

    @property
    def scale_bytes(self) -> int:
        return 0 if self.scale is None else math.prod(self.grid) * SCALE_BYTES[self.scale]

    def to_json(self) -> dict:
        return {"param": self.param, "row0": self.row0, "rows": self.rows, "cols": self.cols,
                "transposed": self.transposed, "codes": self.codes,
                "code_offset": self.code_offset, "block": list(self.block), "scale": self.scale,
                "scale_offset": self.scale_offset, "zero_offset": self.zero_offset}


@dataclass(frozen=True)
class QuantLayout:
    """The bytes of one compressed expert blob (every expert of a store shares it).

    Attributes:
        scheme: what wrote it: "fp8", "mxfp4", "int8", "int8:g128", "int4:g64", ...
        parts: in blob order.
        blob_bytes: bytes per blob, a multiple of 4096.
    """

    scheme: str
    parts: tuple[QuantPart, ...]
    blob_bytes: int

    @property
    def payload_bytes(self) -> int:
        return sum(p.code_bytes + p.scale_bytes * (2 if p.zero_offset >= 0 else 1)
                   for p in self.parts)

    def plan(self, slot) -> torch.Tensor:
        """The C++ dequantize plan into slot layout `slot` (a store.SlotLayout in the compute
        dtype): int64 [len(parts), 12], the columns of csrc/quant/dequant.h's DequantPart."""
        size = slot.dtype.itemsize
        rows = []
        for p in self.parts:
            t = slot.tensor(p.param)
            total_rows, cols = _out_in(t.shape, p.transposed)
            if p.transposed:  # element (r, c) of the [out, in] view is tensor[c, r]
                dst, rs, cs = t.offset + size * p.row0, 1, total_rows
            else:
                dst, rs, cs = t.offset + size * p.row0 * cols, cols, 1
            rows.append((CODE_KINDS[p.codes], p.rows, p.cols, *p.block, p.code_offset,
                         SCALE_KINDS[p.scale], p.scale_offset, p.zero_offset, dst, rs, cs))
        return torch.tensor(rows, dtype=torch.int64).view(-1, 12)

    def compute_plan(self, up_name: str) -> torch.Tensor:
        """The plan of `ops.moe_experts_compressed`, which computes straight from the blob:
        int64 [len(parts), 11], per part the matrix it fills (0 up = `up_name`, 1 its bias, 2
        down_proj, 3 its bias), its first row there and its codes and scales (the columns of
        csrc/experts/moe_experts_compressed_cpu.cpp). A part's codes are [out, in] row-major
        whatever the slot tensor's orientation, so the plan does not depend on it.

        Raises:
            ValueError: a part of a tensor the fused op does not compute.
        """
        matrices = {up_name: 0, f"{up_name}_bias": 1, "down_proj": 2, "down_proj_bias": 3}
        rows = []
        for p in self.parts:
            if p.param not in matrices:
                raise ValueError(f"compressed part of {p.param!r}: the fused experts op computes "
                                 f"{sorted(matrices)}")
            rows.append((matrices[p.param], p.row0, CODE_KINDS[p.codes], p.rows, p.cols,
                         *p.block, p.code_offset, SCALE_KINDS[p.scale], p.scale_offset,
                         p.zero_offset))
        return torch.tensor(rows, dtype=torch.int64).view(-1, 11)

    def matrix_rows(self, param: str) -> int:
        """Rows of slot tensor `param` seen [out, in] (what its parts fill together)."""
        return sum(p.rows for p in self.parts if p.param == param)

    def check_covers(self, slot) -> None:
        """Every slot tensor is filled exactly once, row by row, by parts of its own width.

        Raises:
            ValueError: naming the first tensor or part that does not fit.
        """
        by_param: dict[str, list[QuantPart]] = {}
        for p in self.parts:
            by_param.setdefault(p.param, []).append(p)
        names = [t.name for t in slot.tensors]
        if set(by_param) != set(names):
            raise ValueError(f"compressed parts fill {sorted(by_param)}, the slot holds "
                             f"{sorted(names)}")
        for t in slot.tensors:
            at = 0
            for p in sorted(by_param[t.name], key=lambda p: p.row0):
                total_rows, cols = _out_in(t.shape, p.transposed)
                if p.row0 != at or p.cols != cols:
                    raise ValueError(f"part of {t.name!r} at row {p.row0} ({p.rows} x {p.cols}) "
                                     f"does not continue rows 0..{at} of {t.name} {list(t.shape)}")
                at += p.rows
            if at != total_rows:
                raise ValueError(f"parts of {t.name!r} fill {at} of its {total_rows} rows")

    def dequantize(self, blob: torch.Tensor, slot) -> dict[str, torch.Tensor]:
        """Reference dequantization in plain PyTorch (what the C++ path must equal bit for bit).

        Args:
            blob: uint8 [blob_bytes] (CPU).
            slot: the store.SlotLayout to fill; its dtype is the output dtype.

        Returns:
            name -> tensor [*shape] of slot.dtype.

        Raises:
            ValueError: a scale or zero point that is not a finite number.
        """
        out = {t.name: torch.zeros(t.shape, dtype=slot.dtype) for t in slot.tensors}
        for p in self.parts:
            value = _codes(blob, p)  # [rows, cols] fp32
            if p.scale is not None:
                scale = _grid(blob, p, p.scale_offset)
                if not bool(torch.isfinite(scale).all()):
                    raise ValueError(f"part of {p.param!r} has scales that are not finite "
                                     "numbers: the scales are corrupt")
                if p.zero_offset >= 0:
                    value = value - _expand(_grid(blob, p, p.zero_offset), p)
                value = value * _expand(scale, p)
            view = out[p.param].T if p.transposed else out[p.param]
            if view.dim() == 1:
                view = view.unsqueeze(0)
            view[p.row0 : p.row0 + p.rows] = value.to(slot.dtype)
        return out

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "blob_bytes": self.blob_bytes,
                "parts": [p.to_json() for p in self.parts]}

    @classmethod
    def from_json(cls, d: object) -> QuantLayout:
        """The layout a packed header describes; ValueError naming the first inconsistency."""
        if not (isinstance(d, dict) and isinstance(d.get("scheme"), str)
                and isinstance(d.get("parts"), list) and d["parts"]):
            raise ValueError(f"compressed layout {str(d)[:80]} is not {{scheme, blob_bytes, "
                             "parts}")
        blob_bytes = d.get("blob_bytes")
        if type(blob_bytes) is not int or blob_bytes <= 0 or blob_bytes % BLOB_ALIGN:
            raise ValueError(f"blob_bytes {blob_bytes!r} is not a multiple of {BLOB_ALIGN}")
        parts = []
        for j in d["parts"]:
            try:
                part = QuantPart(
                    param=_typed(j, "param", str), row0=_count(j, "row0"),
                    rows=_count(j, "rows", 1), cols=_count(j, "cols", 1),
                    transposed=_typed(j, "transposed", bool), codes=_typed(j, "codes", str),
                    code_offset=_count(j, "code_offset"),
                    block=tuple(_count({"b": b}, "b", 1) for b in j["block"]),
                    scale=j["scale"], scale_offset=_typed(j, "scale_offset", int),
                    zero_offset=_typed(j, "zero_offset", int))
            except (KeyError, TypeError) as error:
                raise ValueError(f"compressed part {str(j)[:80]}: {error}") from None
            _check_part(part, blob_bytes)
            parts.append(part)
        return cls(d["scheme"], tuple(parts), blob_bytes)


def _typed(d: dict, key: str, kind: type):
    value = d[key]
    if type(value) is not kind:
        raise TypeError(f"{key} is {value!r}, not a {kind.__name__}")
    return value


def _count(d: dict, key: str, least: int = 0) -> int:
    value = _typed(d, key, int)
    if value < least:
        raise TypeError(f"{key} is {value}, less than {least}")
    return value


def _check_part(p: QuantPart, blob_bytes: int) -> None:
    if p.codes not in CODE_KINDS or p.scale not in SCALE_KINDS or len(p.block) != 2:
        raise ValueError(f"part of {p.param!r}: codes {p.codes!r}, scale {p.scale!r} or block "
                         f"{p.block} unknown")
    raw = p.codes in RAW_CODES.values()
    if raw != (p.scale is None) or (p.codes == "uint4") != (p.zero_offset >= 0):
        raise ValueError(f"part of {p.param!r}: codes {p.codes} with scale {p.scale} and zero "
                         f"offset {p.zero_offset}")
    if CODE_BITS[p.codes] == 4 and (p.cols % 2 or p.block[1] % 2):
        raise ValueError(f"part of {p.param!r}: 4-bit codes need an even number of columns "
                         "and of block columns")
    spans = [(p.code_offset, p.code_bytes)]
    if p.scale is not None:
        spans.append((p.scale_offset, p.scale_bytes))
    if p.zero_offset >= 0:
        spans.append((p.zero_offset, p.scale_bytes))
    for offset, n in spans:
        if offset < 0 or offset + n > blob_bytes:
            raise ValueError(f"part of {p.param!r}: bytes {offset}..{offset + n} outside the "
                             f"{blob_bytes}-byte blob")


def _out_in(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """(rows, cols) of a slot tensor's [out, in] view (a 1-D bias is one row)."""
    if len(shape) == 1:
        return 1, shape[0]
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _codes(blob: torch.Tensor, p: QuantPart) -> torch.Tensor:
    raw = blob[p.code_offset : p.code_offset + p.code_bytes]
    if p.codes in _TORCH_OF:
        values = raw.view(_TORCH_OF[p.codes]).float()
    elif p.codes == "fp8_e4m3":
        values = raw.view(torch.float8_e4m3fn).float()
    elif p.codes == "int8":
        values = raw.view(torch.int8).float()
    else:  # 4-bit, element 2k in the low nibble of byte k
        nibbles = torch.stack([raw & 0xF, raw >> 4], dim=-1).flatten().long()
        values = (torch.tensor(E2M1_VALUES)[nibbles] if p.codes == "e2m1"
                  else nibbles.float())
    return values.reshape(p.rows, p.cols)


def _grid(blob: torch.Tensor, p: QuantPart, offset: int) -> torch.Tensor:
    raw = blob[offset : offset + p.scale_bytes]
    if p.scale == "e8m0":
        return raw.view(torch.float8_e8m0fnu).float().reshape(p.grid)
    return raw.view(_TORCH_OF[p.scale]).float().reshape(p.grid)


def _expand(grid: torch.Tensor, p: QuantPart) -> torch.Tensor:
    """A per-block grid [gr, gc] as one value per element [rows, cols]."""
    return (grid.repeat_interleave(p.block[0], 0)[: p.rows]
            .repeat_interleave(p.block[1], 1)[:, : p.cols])


class LayoutBuilder:
    """Places parts' codes and scales one after another, each PART_ALIGN-aligned."""

    def __init__(self) -> None:
        self.parts: list[QuantPart] = []
        self.end = 0

    def take(self, nbytes: int) -> int:
        offset = self.end
        self.end = _round_up(offset + nbytes, PART_ALIGN)
        return offset

    def add(self, part: QuantPart) -> QuantPart:
        """Give `part` (with placeholder offsets) its place; returns it placed."""
        code = self.take(part.code_bytes)
        scale = self.take(part.scale_bytes) if part.scale is not None else -1
        zero = self.take(part.scale_bytes) if part.zero_offset >= 0 else -1
        placed = replace(part, code_offset=code, scale_offset=scale, zero_offset=zero)
        self.parts.append(placed)
        return placed

    def build(self, scheme: str) -> QuantLayout:
        return QuantLayout(scheme, tuple(self.parts), _round_up(max(self.end, 1), BLOB_ALIGN))


# --- remoe pack --quantize -------------------------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """A quantizer `remoe pack --quantize` runs (`parse_scheme`)."""

    kind: str  # "int8", "int4", "fp8", "mxfp4" or "bf16" (raw bfloat16, no scales)
    group: int | None  # input columns per scale; None: the whole row (fp8: 128 x 128 blocks)
    refine: bool = False  # int4: HQQ-style refinement of the zero points
    name: str = field(default="", compare=False)

    @property
    def bits(self) -> int:
        return {"int8": 8, "fp8": 8, "int4": 4, "mxfp4": 4, "bf16": 16}[self.kind]


_SCHEME = re.compile(r"(int8|int4|fp8|mxfp4|bf16)(?::g(\d+))?(\+hqq)?")
FP8_BLOCK = 128  # DeepSeek-V3's and Qwen3 FP8's weight_block_size, both dims
FP8_MAX = 448.0  # largest float8_e4m3fn


def parse_scheme(text: str) -> QuantScheme:
    """'int8', 'int8:g128', 'int4' (= int4:g64), 'int4:g32', 'int4:g64+hqq', 'fp8' (e4m3 with
    fp32 scales over 128 x 128 blocks, as transformers' finegrained FP8), 'mxfp4' (e2m1 with
    UE8M0 scales per 32 input columns), 'bf16' (no quantization: bfloat16 storage) ->
    QuantScheme.

    Raises:
        ValueError: saying what is accepted.
    """
    m = _SCHEME.fullmatch(text.strip().lower())
    kind = m[1] if m else None
    if (m is None or (m[2] is not None and (int(m[2]) < 2 or kind not in ("int8", "int4")))
            or (m[3] and kind != "int4")):
        raise ValueError(f"--quantize {text!r}: expected int8, int8:gN, int4, int4:gN, "
                         "int4:gN+hqq (N >= 2 input columns per scale, even for int4), fp8, "
                         "mxfp4 or bf16")
    group = int(m[2]) if m[2] else {"int4": 64, "mxfp4": 32}.get(kind)
    if kind == "int4" and group % 2:
        raise ValueError(f"--quantize {text!r}: int4 groups must hold an even number of columns")
    name = kind + (f":g{group}" if m[2] or kind == "int4" else "") + ("+hqq" if m[3] else "")
    return QuantScheme(kind, group, bool(m[3]), name)


def quantize_expert(tensors: dict[str, torch.Tensor], scheme: QuantScheme,
                    transposed: bool, layout: QuantLayout | None = None
                    ) -> tuple[QuantLayout, torch.Tensor]:
    """Quantize one expert's slot tensors into a blob.

    Args:
        tensors: name -> tensor [*shape] in slot order (2-D weights are quantized along their
            input dimension; 1-D tensors, biases, are kept raw).
        scheme: the quantizer.
        transposed: the 2-D tensors are stored [in, out] (GPT-OSS).
        layout: the layout of an earlier expert of the same store, to place this one the same way.

    Returns:
        (layout, blob uint8 [blob_bytes]), padding zero.
    """
    builder = LayoutBuilder()
    pieces = []
    for name, t in tensors.items():
        w = t.detach().float()
        if w.dim() == 1:
            code = RAW_CODES.get(t.dtype, "f32")
            part = builder.add(QuantPart(name, 0, 1, w.numel(), False, code, 0))
            pieces.append((part, (w.to(_TORCH_OF[code]).contiguous().view(torch.uint8),)))
            continue
        w = (w.T if transposed else w).contiguous()  # [out, in]
        rows, cols = w.shape
        group = min(scheme.group or cols, cols)
        if scheme.kind == "bf16":
            part = builder.add(QuantPart(name, 0, rows, cols, transposed, "bf16", 0))
            pieces.append((part, (w.to(torch.bfloat16).contiguous().view(torch.uint8),)))
        elif scheme.kind == "fp8":
            codes, inv = _fp8_blocks(w, FP8_BLOCK)
            part = builder.add(QuantPart(name, 0, rows, cols, transposed, "fp8_e4m3", 0,
                                         (FP8_BLOCK, FP8_BLOCK), "f32", 0))
            pieces.append((part, (codes.view(torch.uint8), inv)))
        elif scheme.kind == "mxfp4":
            if cols % 32:
                raise ValueError(f"{name}: MXFP4 needs input columns in groups of 32, got {cols}")
            codes, exps = _mxfp4(w)
            part = builder.add(QuantPart(name, 0, rows, cols, transposed, "e2m1", 0, (1, 32),
                                         "e8m0", 0))
            pieces.append((part, (_pack_nibbles(codes), exps)))
        elif scheme.bits == 8:
            codes, scale = _int8_rtn(w, group)
            part = builder.add(QuantPart(name, 0, rows, cols, transposed, "int8", 0,
                                         (1, group), "f32", 0))
            pieces.append((part, (codes.view(torch.uint8), scale)))
        else:
            if cols % 2:
                raise ValueError(f"{name}: int4 needs an even number of input columns, got {cols}")
            codes, scale, zero = _int4_rtn(w, group, scheme.refine)
            part = builder.add(QuantPart(name, 0, rows, cols, transposed, "uint4", 0,
                                         (1, group), "f16", 0, 0))
            pieces.append((part, (_pack_nibbles(codes), scale, zero)))
    built = builder.build(scheme.name)
    if layout is not None and layout != built:
        raise ValueError("experts of one store must share one compressed layout")
    blob = torch.zeros(built.blob_bytes, dtype=torch.uint8)
    for part, arrays in pieces:
        offsets = (part.code_offset, part.scale_offset, part.zero_offset)
        for offset, array in zip(offsets, arrays, strict=False):
            data = array.contiguous().view(torch.uint8).flatten()
            blob[offset : offset + data.numel()] = data
    return built, blob


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, cols] -> [rows, ceil(cols / group), group], the ragged last group zero-padded."""
    rows, cols = w.shape
    pad = -cols % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(rows, -1, group)


def _fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize arithmetic over ragged blocks: per block scale = 448 / max|w|
    (1 for an all-zero block), codes = clamp(w * scale) as float8_e4m3fn; stores 1 / scale (the
    `weight_scale_inv` grid)."""
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    padded = torch.nn.functional.pad(w, (0, pc, 0, pr))
    tiles = padded.view((rows + pr) // block, block, (cols + pc) // block, block)
    amax = tiles.abs().amax(dim=(1, 3))  # [grid rows, grid cols]
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
    inv = (1.0 / scale).float()
    q = (tiles * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows + pr, cols + pc)[:rows, :cols].contiguous(), inv


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32 input columns the smallest power of two 2^e with max |w| / 2^e <= 6 (stored as
    the UE8M0 byte e + 127) and each value's nearest e2m1 code (0..15, bit 3 the sign)."""
    rows, cols = w.shape
    g = w.view(rows, cols // 32, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), 0.0).clamp(-127, 127)
    x = g / torch.exp2(e)[..., None]
    magnitudes = torch.tensor(E2M1_VALUES[:8])
    idx = (x.abs()[..., None] - magnitudes).abs().argmin(-1)
    codes = (idx | ((x < 0).long() << 3)).to(torch.uint8)
    return codes.view(rows, cols), (e + 127).to(torch.uint8)


def _int8_rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _groups(w, group)
    scale = g.abs().amax(-1) / 127.0  # [rows, groups] fp32
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.flatten(1)[:, : w.shape[1]], scale


def _int4_rtn(w: torch.Tensor, group: int, refine: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group: w ~ (q - z) * s, q in 0..15; s and z stored as fp16."""
    cols = w.shape[1]
    g = _groups(w, group)
    if cols % group:  # the padding must not widen the last group's range
        last = g[:, -1, : cols % group]
        g[:, -1, cols % group :] = last[:, :1]
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-4).half().float()  # [rows, groups]
    zero = (-lo / scale).half().float()
    if refine:
        scale, zero = _hqq_refine(g, scale, zero)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)
    return q.to(torch.uint8).flatten(1)[:, :cols], scale.half(), zero.half()


def _hqq_refine(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, iters: int = 20,
                beta: float = 10.0, p: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's half-quadratic refinement of the zero point (Badri & Shaji, 2023): alternately
    shrink the error W - dequant(Q) with an lp (p < 1) proximal step and refit the zero point to
    it, keeping the scale; the quantization error becomes sparse instead of spread out."""
    s, z = scale[..., None], zero[..., None]
    best, best_err = z, None
    for _ in range(iters):
        q = torch.round(g / s + z).clamp(0, 15)
        r = g - (q - z) * s
        err = r.abs().mean(-1, keepdim=True)
        if best_err is None:
            best_err = err
        improved = err < best_err
        best = torch.where(improved, z, best)
        best_err = torch.minimum(err, best_err)
        # Generalized soft threshold of the residual (prox of |.|^p).
        e = torch.sign(r) * torch.relu(r.abs() - (1.0 / beta) * r.abs().clamp(min=1e-8) ** (p - 1))
        z = (q - (g - e) / s).mean(-1, keepdim=True).half().float()
        beta *= 1.01
    return scale, best[..., 0].half().float()


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [rows, cols] (cols even) -> [rows * cols / 2] bytes, low nibble first."""
    flat = codes.flatten()
    return flat[0::2] | (flat[1::2] << 4)
