"""Typed wrappers over the compiled ops in `torch.ops.remoe`, with their fake kernels.

Importing this module loads `remoe_engine._C` (which registers the ops with the dispatcher) and
registers fake (meta) kernels so `torch.compile(fullgraph=True)` can trace every op.
"""

from __future__ import annotations

import importlib.machinery
import os
import warnings
from dataclasses import dataclass

import torch


def _extension_import_error(error: ImportError) -> ImportError:
    """The error to raise when `remoe_engine._C` does not import: what happened, what to do.

    Two different faults look alike in Python's own message ("cannot import name '_C'"): the
    package directory holds no compiled extension (most often the source tree shadowing an
    installed copy, because Python was started from the repository root), or it holds one that
    the dynamic loader refused (built against another torch, a broken file); then the loader's
    reason is kept.
    """
    package_dir = os.path.dirname(os.path.abspath(__file__))
    found = [os.path.join(package_dir, "_C" + suffix)
             for suffix in importlib.machinery.EXTENSION_SUFFIXES
             if os.path.exists(os.path.join(package_dir, "_C" + suffix))]
    root = os.path.dirname(package_dir)
    build = ("build in place with `pip install --no-build-isolation -e .` or "
             "`python setup.py build_ext --inplace`")
    if found:
        message = (f"remoe_engine's compiled extension {found[0]} failed to load: {error}. "
                   f"A build for another torch than this one (torch {torch.__version__}) or a "
                   f"damaged file does this: rebuild it with `pip install --no-build-isolation .`"
                   + (f", or {build}" if os.path.exists(os.path.join(root, "setup.py")) else ""))
    elif os.path.exists(os.path.join(root, "setup.py")):
        message = (f"remoe_engine was imported from the source tree at {root} (no compiled "
                   f"extension there: {package_dir} has no _C*.so). Either run from another "
                   f"directory, where an installed remoe-engine is imported instead, or {build}.")
    else:
        message = (f"remoe_engine at {package_dir} has no compiled extension (_C*.so): the "
                   f"install is incomplete; reinstall with `pip install --no-build-isolation .` "
                   f"from the source tree.")
    return ImportError(message, name="remoe_engine._C", path=found[0] if found else None)


try:
    from remoe_engine import _C  # noqa: F401  (loads the library: registers torch.ops.remoe.*)
except ImportError as _error:
    raise _extension_import_error(_error) from _error

__all__ = ["ExpertsGate", "crc32c", "crc32c_impl", "cuda_kernels_built", "dequantize",
           "moe_experts", "moe_experts_compressed", "pinned_host_bytes", "pinned_host_empty",
           "route_topk", "route_topk_previous", "topk_overlap"]

_route_topk = torch.ops.remoe.route_topk.default


def route_topk(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    prefer: torch.Tensor | None = None,
    reuse_bias: float = 0.0,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    routed_scaling: float = 1.0,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused MoE router top-k with an optional cache-aware reuse bias.

    Covers the routing of every MoE family in transformers: Qwen/OLMoE/Mixtral (softmax, with or
    without renormalization), DeepSeek-V2 (softmax, group max, scaling), DeepSeek-V3 and Qwen3-Next
    style sigmoid routers (correction bias, group top-2 sum, renormalize, scaling) and GPT-OSS
    (`scoring="softmax_over_topk"`).

    Args:
        logits: router logits [T, E], float32 / bfloat16 / float16. Scores are computed in fp32.
        top_k: experts per token K, 1 <= K <= E.
        scoring: "softmax", "sigmoid", or "softmax_over_topk" (top-k on the logits, then a
            softmax over the K chosen logits).
        renormalize: divide the chosen weights by their sum (ignored for "softmax_over_topk").
        prefer: bool [E] or [T, E]: experts that get `reuse_bias` added to their selection score,
            e.g. experts resident in the cache or chosen by the previous token.
        reuse_bias: added to the selection score of preferred experts, in the units of the score
            (probability for softmax/sigmoid, logit for softmax_over_topk). It changes which
            experts are chosen, never the returned weights.
        correction_bias: float32 [E] added to the selection score only (DeepSeek-V3
            `e_score_correction_bias`).
        n_group, topk_group: group-limited selection: the E experts form n_group equal groups and
            only the topk_group best groups are eligible.
        group_score: how a group ranks: "max" of its selection scores (DeepSeek-V2) or
            "top2_sum", the sum of its two best (DeepSeek-V3).
        routed_scaling: the weights are multiplied by it last.
        check_finite: raise ValueError naming the first token and expert whose logit is NaN or
            +inf. Off by default because on CUDA it costs a host sync.

    Returns:
        weights [T, K] float32 and ids [T, K] int64. ids are in ranking order of the selection
        score: larger first, ties to the lower expert id, NaN after every number (so a row with
        NaN logits routes deterministically and its NaN weights keep it visibly broken).
    """
    if check_finite:
        _check_finite(logits)
    return _route_topk(
        logits, top_k, scoring, renormalize, prefer, float(reuse_bias), correction_bias,
        n_group, topk_group, group_score, float(routed_scaling),
    )


@dataclass(frozen=True)
class ExpertsGate:
    """How an expert's up-projection outputs become its down projection's inputs.

    gate(g, u) = act(g') * (u' + up_offset), where g' = min(g, limit) when clamp == "input",
    act's output is capped at limit when clamp == "output", and u' = clamp(u, -limit, limit)
    whenever clamp != "none". Without a gate ("none") it is act(u).

    Attributes:
        layout: "none" (N = I up rows), "chunk" (gate rows [0, I), up rows [I, 2I)) or
            "interleave" (even rows gate, odd rows up).
        activation: "silu", "gelu" (erf), "gelu_tanh", "relu", "relu2" or "swish_alpha"
            (x * sigmoid(alpha * x)).
        clamp: "none", "input" or "output".
        limit, alpha, up_offset: as above (limit only matters with a clamp).
    """

    layout: str = "chunk"
    activation: str = "silu"
    clamp: str = "none"
    limit: float = 0.0
    alpha: float = 1.0
    up_offset: float = 0.0


_moe_experts = torch.ops.remoe.moe_experts.default


def moe_experts(hidden: torch.Tensor, slots: torch.Tensor, route_weights: torch.Tensor,
                up: torch.Tensor, down: torch.Tensor, *, gate: ExpertsGate = ExpertsGate(),
                up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                transposed: bool = False) -> torch.Tensor:
    """One MoE layer's routed experts over the pool's slots, in one call.

    out[t] = sum_k route_weights[t, k] * down(gate(up(hidden[t]) + up_bias) + down_bias), each
    expert's weights read from slot slots[t, k] of the up/down views.

    Args:
        hidden: [T, H] float32 / bfloat16 / float16.
        slots: int64 [T, K]: the slot holding each routed expert, -1 for none (its weight is
            then ignored: a pair another wave computes, or an expert-parallel sentinel).
        route_weights: [T, K] floating.
        up: [S, N, H] ([S, H, N] if transposed), the pool's view of every slot, hidden's dtype.
        down: [S, H, I] ([S, I, H] if transposed).
        gate: the family's gate (`ExpertsGate`).
        up_bias, down_bias: [S, N] and [S, H], or None.
        transposed: the experts store x @ W rather than x @ W.T.

    Returns:
        float32 [T, H] (accumulated in fp32; the caller rounds once to its dtype).
    """
    return _moe_experts(hidden, slots, route_weights, up, up_bias, down, down_bias, gate.layout,
                        gate.activation, gate.clamp, float(gate.limit), float(gate.alpha),
                        float(gate.up_offset), transposed)


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many experts two routings of the same tokens share, per token: |a_t ∩ b_t|.

    The one definition behind every top-k agreement and expert-reuse figure of the project
    (`metrics`, the patched router's agreement counter, `remoe demo`).

    Args:
        a, b: integer [T, K] expert ids; each row lists distinct ids.

    Returns:
        int64 [T] on the inputs' device (no host sync).
    """
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(dim=-1).sum(dim=-1)


def _check_finite(logits: torch.Tensor) -> None:
    bad = torch.isnan(logits) | torch.isposinf(logits)
    # Host sync: only when the caller asked for the check.
    if bool(bad.any()):
        token, expert = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"route_topk: logits[{token}, {expert}] = {logits[token, expert].item()} "
            "(NaN or +inf): the router produced non-finite scores"
        )


def crc32c(data: torch.Tensor | bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of bytes, continuing `crc`: crc32c(b, crc32c(a)) == crc32c(a + b).

    The packed expert format's checksum, computed by the same C++ function the pool's reader
    threads verify with (hardware CRC instructions where the CPU has them).

    Args:
        data: a contiguous CPU uint8 tensor (any shape), or a bytes-like object.
        crc: the CRC32C of the bytes before `data` (0 for none).

    Returns:
        The 32-bit CRC as a non-negative int.
    """
    if not isinstance(data, torch.Tensor):
        view = memoryview(data).cast("B")
        if not len(view):
            data = torch.empty(0, dtype=torch.uint8)
        else:
            with warnings.catch_warnings():  # read-only bytes: the op only reads them
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(view, dtype=torch.uint8)
    return torch.ops.remoe.crc32c(data.reshape(-1), crc)


def crc32c_impl() -> str:
    """Which CRC32C implementation this CPU runs: "sse4.2", "armv8-crc" or "table"."""
    return torch.ops.remoe.crc32c_impl()


def cuda_kernels_built() -> bool:
    """Whether this build of remoe_engine._C contains the CUDA kernels (asks the dispatcher)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("remoe::route_topk", "CUDA")


@torch.library.register_fake("remoe::route_topk")
def _route_topk_fake(logits, top_k, scoring, renormalize, prefer, reuse_bias, correction_bias,
                     n_group, topk_group, group_score, routed_scaling):
    torch._check(logits.dim() == 2, lambda: "route_topk: logits must be 2-D")
    T = logits.shape[0]
    weights = logits.new_empty((T, top_k), dtype=torch.float32)
    ids = logits.new_empty((T, top_k), dtype=torch.int64)
    return weights, ids


@torch.library.register_fake("remoe::moe_experts")
def _moe_experts_fake(hidden, slots, route_weights, up, up_bias, down, down_bias, gate,
                      activation, clamp, limit, alpha, up_offset, transposed):
    torch._check(hidden.dim() == 2, lambda: "moe_experts: hidden must be 2-D")
    return hidden.new_empty(hidden.shape, dtype=torch.float32)


# Autograd is registered in C++ (csrc/routing/route_topk_autograd.cpp): a Python autograd kernel
# would add microseconds to every inference call.


def route_topk_previous(
    logits: torch.Tensor,
    top_k: int,
    *,
    previous: torch.Tensor | None = None,
    reuse_bias: float,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    routed_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_topk` with the "previous" reuse bias over whole sequences, in one call.

    Position s of each sequence prefers (adds `reuse_bias` to) the K experts position s - 1
    chose; position 0 prefers `previous`, or nothing when it is None. Each row equals
    `route_topk(logits[b, s], top_k, prefer=<mask of the previous ids>, reuse_bias=...)`
    exactly; the recurrence runs inside one kernel (CUDA: one warp per sequence) instead of a
    few launches per position. The weights carry no gradient.

    Args:
        logits: [B, S, E] float32 / bfloat16 / float16 router logits.
        top_k: K.
        previous: int64 [B, K], the ids chosen just before position 0, or None.
        reuse_bias, scoring, renormalize, correction_bias, n_group, topk_group, group_score,
            routed_scaling: as for `route_topk`.

    Returns:
        weights [B, S, K] float32 and ids [B, S, K] int64.
    """
    return torch.ops.remoe.route_topk_previous(
        logits, previous, top_k, scoring, renormalize, float(reuse_bias), correction_bias,
        n_group, topk_group, group_score, float(routed_scaling))


@torch.library.register_fake("remoe::route_topk_previous")
def _route_topk_previous_fake(logits, previous, top_k, scoring, renormalize, reuse_bias,
                              correction_bias, n_group, topk_group, group_score, routed_scaling):
    torch._check(logits.dim() == 3, lambda: "route_topk_previous: logits must be 3-D")
    B, S = logits.shape[:2]
    return (logits.new_empty((B, S, top_k), dtype=torch.float32),
            logits.new_empty((B, S, top_k), dtype=torch.int64))


# cudaHostRegister'ed ranges: big enough that a model's experts take few registrations, small
# enough that one failure is reported before a whole model's worth is locked.
PIN_CHUNK_BYTES = 1 << 30


def pinned_host_empty(rows: int, cols: int) -> torch.Tensor:
    """uint8 [rows, cols] page-locked host memory of exactly that size (rounded up to a page).

    torch's `pin_memory=True` rounds each request up to a power of two (54 GiB of experts pins
    64 GiB). This allocates normally and registers the memory with the CUDA driver in chunks of
    whole rows (about PIN_CHUNK_BYTES), unregistering it when the tensor is freed. A row never
    straddles two registrations, so a copy of one row is always from one pinned range.

    Args:
        rows, cols: the shape; `cols` should be a multiple of 4096 (a slot's bytes are).

    Raises:
        RuntimeError: CUDA is not available, this build has no CUDA support, or the memory
            cannot be locked (the driver's message, e.g. the host is short of memory).
    """
    if cuda_kernels_built() and not torch.cuda.is_available():
        raise RuntimeError("pinned host memory serves copies to a GPU, and no CUDA device is "
                           "available here (torch.cuda.is_available() is False)")
    # (A build without CUDA refuses in the op itself, naming the build.)
    chunk = max(1, PIN_CHUNK_BYTES // max(cols, 1)) * cols
    if chunk % 4096:
        chunk = PIN_CHUNK_BYTES  # rows not page-sized: page-sized chunks; rows may straddle
    return torch.ops.remoe.pinned_host_empty(rows, cols, chunk)


def pinned_host_bytes() -> int:
    """Host bytes page-locked by `pinned_host_empty` right now (page-rounded per tensor)."""
    return torch.ops.remoe.pinned_host_bytes()


def dequantize(blob: torch.Tensor, plan: torch.Tensor, dtype: torch.dtype,
               out_bytes: int) -> torch.Tensor:
    """Dequantize one compressed expert blob into slot bytes (csrc/quant/dequant.h).

    Args:
        blob: uint8 [n], CPU or CUDA: codes and scales as `plan` places them.
        plan: int64 [N, 12] on the CPU (remoe_engine.quant.QuantLayout.plan).
        dtype: the slot dtype: float32, bfloat16 or float16.
        out_bytes: bytes of the slot.

    Returns:
        uint8 [out_bytes] on blob's device, zero where no part writes.
    """
    return torch.ops.remoe.dequantize(blob, plan, dtype, out_bytes)


@torch.library.register_fake("remoe::dequantize")
def _dequantize_fake(blob, plan, dtype, out_bytes):
    return blob.new_empty((out_bytes,), dtype=torch.uint8)


def moe_experts_compressed(hidden: torch.Tensor, slots: torch.Tensor,
                           route_weights: torch.Tensor, blobs: torch.Tensor, plan: torch.Tensor,
                           up_rows: int, *, gate: ExpertsGate = ExpertsGate()) -> torch.Tensor:
    """`moe_experts` over slots that hold compressed expert blobs (CPU).

    The codes are decoded as they are read (few tokens) or the routed slots dequantized into a
    scratch a chunk at a time (many tokens); nothing compressed is ever expanded into a slot.

    Args:
        hidden: [T, H] float32 / bfloat16 / float16.
        slots: int64 [T, K], -1 for none, as for `moe_experts`.
        route_weights: [T, K] floating.
        blobs: uint8 [S, B], each row one slot's blob (the pool's slot buffer).
        plan: int64 [n, 11] on the CPU (`remoe_engine.quant.QuantLayout.compute_plan`).
        up_rows: N, the up projection's rows (2I for a gated expert).
        gate: the family's gate (`ExpertsGate`).

    Returns:
        float32 [T, H].
    """
    return torch.ops.remoe.moe_experts_compressed(
        hidden, slots, route_weights, blobs, plan, int(up_rows), gate.layout, gate.activation,
        gate.clamp, float(gate.limit), float(gate.alpha), float(gate.up_offset))


@torch.library.register_fake("remoe::moe_experts_compressed")
def _moe_experts_compressed_fake(hidden, slots, route_weights, blobs, plan, up_rows, gate,
                                 activation, clamp, limit, alpha, up_offset):
    torch._check(hidden.dim() == 2, lambda: "moe_experts_compressed: hidden must be 2-D")
    return hidden.new_empty(hidden.shape, dtype=torch.float32)
