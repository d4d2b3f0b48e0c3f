"""The expert slot pool: fixed expert slots on the compute device, fed by an ExpertStore.

A thin facade over the C++ pool (`torch.classes.remoe.SlotPool`, csrc/pool/slot_pool.h), which
owns the slot buffer, the residency table, the pins, the reader threads and the counters. This
module only maps transformers layer indices to the pool's dense ones, converts ids, and shapes
the stats.

Typical use by the expert computation (one MoE layer, K experts per token)::

    slots = pool.acquire(layer, ids)            # pins; waits for the loads (CPU) / stream (CUDA)
    w = pool.weights                            # name -> [num_slots, *shape] views of the buffer
    y = ffn(x, w["gate_up_proj"][slots[0]], w["down_proj"][slots[0]])
    pool.release(layer, ids)                    # CUDA: the slot's next load waits for this work

When a layer needs more distinct experts than can be pinned at once (prefill), use
`pool.waves(layer, ids)`, which acquires at most `max_pinnable(layer)` of them at a time.

Policy specification
--------------------
The cache simulator (`remoe_engine.sim`) reproduces these hits and misses exactly for the same
sequence of acquire calls; any change here must change it too.

- Scope. `slots_per_layer=S`: layer i owns slots [i*S, (i+1)*S) and only ever evicts its own
  experts. `memory_budget=B`: one global scope of floor(B / slot_bytes) slots shared by all
  layers, whose victims may belong to any layer.
- Clock. One global counter. Each `acquire(layer, ids)` takes the distinct ids of `ids` in
  first-occurrence order and gives the j-th of them the stamp clock + j, hit or miss; the clock
  then advances by the number of distinct ids. (`prefetch` stamps each load it starts, +1 each.)
- One acquire = one request. All its distinct ids are classified against the residency at the
  start of the call: resident ones are hits, the others misses. Then every hit is pinned, its
  stamp updated and its use count incremented; then each miss, in order, takes the
  lowest-numbered free slot of the scope or else evicts a victim, and becomes resident with its
  stamp, use count 1 and one pin. The call's own experts (hits and already placed misses) are
  pinned, so a request never evicts its own keys.
- Victim: among the scope's resident, unpinned experts. LRU: the smallest stamp. LFU: the smallest
  use count (acquires since it became resident; reset when evicted), ties to the smallest stamp.
  Stamps are unique, so the victim is always unique.
- Pins: each acquire adds one pin per distinct id, `release` removes one. Pinned slots are never
  victims. An acquire whose misses exceed the scope's slots that it can take (unpinned, and not
  its own hits) raises before changing anything; `max_pinnable(layer)` tells how many distinct
  missing experts one acquire can take now.
- Prefetch: for each distinct id not resident, in order: take a slot as a miss would, but never
  one this prefetch call filled itself (no pin, use count 0, so under LFU an unused prefetch goes
  first), or stop when no slot is takeable. It does
  not touch resident experts. It counts as `prefetches`, not as a miss; a later acquire of a
  prefetched expert is a hit (and a `prefetch_hit`), even if its load is still in flight.
- A failed load (truncated or changed file, I/O error, a packed blob failing its CRC32C check)
  removes its expert from the residency (its slot becomes free, its pins go) and raises from the
  acquire or wait that waited on it, which also drops that call's other pins: after an exception
  the caller holds no pin from that call.

Counters (per layer, and summed): hits, misses, evictions (charged to the layer whose expert was
evicted), prefetches, prefetch_hits, bytes_read (from files, as the storage served them: with
O_DIRECT, a safetensors expert's 4 KiB-aligned superset; a compressed store's compressed bytes),
bytes_copied (host memory into slots: staging -> GPU, or host tier; for a compressed store the
compressed bytes a GPU pool copies before its kernel dequantizes them, the dequantized bytes a
CPU pool writes), stall_s (host time blocked in acquire/wait waiting for loads;
GPU-side waits on copy events are not host time and are not included), load_failures.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from remoe_engine import ops  # noqa: F401  (loads remoe_engine._C: registers the SlotPool class)
from remoe_engine.store import ExpertStore, SlotLayout
from remoe_engine.units import parse_bytes

__all__ = ["COUNTERS", "SLOT_FORMATS", "SlotPool", "check_pool_size"]

_DIRECT_IO = {True: "on", False: "off", "auto": "auto"}

# Column order of the C++ stats() rows (enum Counter in csrc/pool/slot_pool.h).
COUNTERS = ("hits", "misses", "evictions", "prefetches", "prefetch_hits", "bytes_read",
            "bytes_copied", "stall_ns", "load_failures")

IdsLike = torch.Tensor | Sequence[int]


POLICIES = ("lru", "lfu")
# What a slot of a compressed store holds: the expert dequantized into the compute dtype on
# every load, or its compressed blob (computed from by ops.moe_experts_compressed).
SLOT_FORMATS = ("dequantized", "compressed")

_PAGE = 4096  # pinned memory is locked in whole pages
# CUDA: staging buffers per reader thread (csrc/transfer/copy_engine_cuda.cu, kStagingPerReader):
# the disk read of the next expert fills one while the previous one is copied out of the other.
_STAGING_PER_READER = 2


def check_pool_size(slots_per_layer: int | None, memory_budget: int | str | None,
                    policy: str = "lru") -> tuple[int | None, int | None]:
    """The pool's size and policy arguments, checked once: what `SlotPool` runs, and what
    `patch()`/`load()` run before they touch the model (a bad budget must not cost a load).

    Args:
        slots_per_layer: slots per MoE layer (>= 1), or None.
        memory_budget: bytes, or a string like "6GiB", or None. Not both with slots_per_layer.
        policy: one of POLICIES.

    Returns:
        (slots_per_layer, memory_budget in bytes); None where not given.

    Raises:
        ValueError: naming the argument that is wrong.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if slots_per_layer is not None and memory_budget is not None:
        raise ValueError("give slots_per_layer or memory_budget, not both")
    if slots_per_layer is not None:
        if isinstance(slots_per_layer, bool) or not isinstance(slots_per_layer, int):
            raise ValueError(f"slots_per_layer must be an int, got {slots_per_layer!r}")
        if slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1, got {slots_per_layer}")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    return slots_per_layer, budget


class SlotPool:
    """Expert slots on one device under a hard memory budget (policy: see the module docstring).

    Args:
        store: where experts come from (disk or host tier).
        device: the compute device; the slot buffer lives there.
        slots_per_layer: per-layer scope with this many slots per MoE layer.
        memory_budget: one global scope of `memory_budget // slot_bytes` slots (bytes, or a
            string like "6GiB"). Exactly one of slots_per_layer and memory_budget.
        policy: "lru" or "lfu".
        num_threads: reader threads (concurrent storage reads). On CUDA each has two staging
            buffers of `slot_bytes` pinned host memory (one is read into while the other is
            copied to the GPU), not counted in the device budget (see `pinned_host_bytes`).
        o_direct: read files with O_DIRECT, bypassing the page cache: True (an error where the
            filesystem refuses it), False (buffered reads), or "auto" (O_DIRECT where supported,
            buffered elsewhere, e.g. tmpfs). Unaligned ranges (safetensors tensors) are read as
            their 4 KiB-aligned superset into a per-reader bounce buffer; adjacent tensors of one
            expert become one read. Buffered reads have readahead off (POSIX_FADV_RANDOM).
        dtype: the slots' dtype, the dtype the experts compute in (default: the store's). When
            it differs from the store's, each load converts once, in the reader thread. A
            compressed store's blobs (`store.compressed`) are dequantized into it on every load,
            in the reader thread: storage and host memory hold the compressed bytes.
        verify_checksums: check every blob of a packed store against its CRC32C in the reader
            thread before it reaches a slot. Only benchmarks turn it off, to measure its cost.
        slot_format: for a compressed store, what a slot holds: "dequantized" (the expert in
            `dtype`, dequantized on every load) or "compressed" (the blob itself, so a budget
            holds as many more experts as the compression ratio; the reader checks its CRC32C and
            that its scales are finite, and `ops.moe_experts_compressed` computes from it: on
            the CPU decoding the codes as it reads them, on CUDA dequantizing the routed blobs
            for each call). Ignored for a store that is not compressed (its slots hold its
            tensors).
    """

    def __init__(self, store: ExpertStore, device: str | torch.device = "cpu", *,
                 slots_per_layer: int | None = None, memory_budget: int | str | None = None,
                 policy: str = "lru", num_threads: int = 4, o_direct: bool | str = "auto",
                 dtype: torch.dtype | None = None, verify_checksums: bool = True,
                 slot_format: str = "dequantized"):
        if (slots_per_layer is None) == (memory_budget is None):
            raise ValueError("SlotPool: pass exactly one of slots_per_layer (per-layer scope) or "
                             f"memory_budget (global), got {slots_per_layer=}, {memory_budget=}")
        slots_per_layer, budget = check_pool_size(slots_per_layer, memory_budget, policy)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.store = store
        self.device = device
        self.policy = policy
        self.slots_per_layer = slots_per_layer  # None: global scope
        self.num_threads = num_threads
        direct_io = _DIRECT_IO.get(o_direct) if isinstance(o_direct, (bool, str)) else None
        if direct_io is None:
            raise ValueError(f"SlotPool: o_direct must be True, False or 'auto', got {o_direct!r}")
        if (device.type == "cuda" and store.tier == "host"
                and not store.host_blobs.is_pinned()):
            # A copy from pageable memory is staged by the driver and can wait for the compute
            # stream: every miss would stall. Pinned host blobs make the copies truly async.
            raise ValueError("SlotPool: a CUDA pool needs pinned host blobs; build the store "
                             "with ExpertStore.from_model(..., pin_memory=True) or "
                             "store.host_copy(pin_memory=True), which lock exactly the blobs' "
                             "bytes")
        dtype = dtype or store.layout.dtype
        if dtype != store.layout.dtype and store.tier == "host" and store.compressed is None:
            raise ValueError(f"SlotPool: the host tier holds {store.layout.dtype} blobs; convert "
                             f"the store (remoe_engine.offload) instead of asking for {dtype}")
        if slot_format not in SLOT_FORMATS:
            raise ValueError(f"SlotPool: slot_format must be one of {SLOT_FORMATS}, got "
                             f"{slot_format!r}")
        if store.compressed is None:
            slot_format = "dequantized"  # nothing to keep compressed
        self.slot_format = slot_format
        # The experts' tensors: the store's, or the same tensors in the compute dtype. A slot
        # holds them, or (compressed slots) the blob they are computed from.
        self.layout = store.layout.in_dtype(dtype)
        num_layers = len(store.layers)
        slot_bytes = store.blob_bytes if slot_format == "compressed" else self.layout.slot_bytes
        every_expert = num_layers * store.num_experts
        if slots_per_layer is not None:
            # More slots than experts can never be used.
            slots_per_layer = min(slots_per_layer, store.num_experts)
            self.slots_per_layer = slots_per_layer
            num_slots = slots_per_layer * num_layers
        else:
            # A budget beyond every expert buys nothing: allocate only what can be used.
            num_slots = min(budget // slot_bytes, every_expert)
            if num_slots < 1:
                raise ValueError(f"SlotPool: memory_budget {budget} bytes is less than one "
                                 f"{slot_bytes}-byte expert slot")
        try:
            self._pool = torch.classes.remoe.SlotPool(
                num_layers, store.num_experts, slot_bytes, num_slots, slots_per_layer or 0,
                policy, str(device), num_threads, direct_io)
        except RuntimeError as error:
            if "allocate" not in str(error) and "bad_alloc" not in str(error):
                raise
            raise MemoryError(f"SlotPool: cannot allocate {num_slots} slots of {slot_bytes} bytes "
                              f"({num_slots * slot_bytes / 2**30:.2f} GiB) on {device}: lower "
                              "memory_budget or slots_per_layer") from None
        self._pool.set_layer_ids(list(store.layers))
        # A compressed blob's dequantization into the compute dtype (None: not compressed).
        self._dequant_plan = (None if store.compressed is None
                              else store.compressed.plan(self.layout))
        if slot_format == "compressed":
            # Blobs land as they are; their scales are checked once, after the checksum.
            self._pool.set_scale_check(self._dequant_plan, self.layout.slot_bytes,
                                       _dtype_name(dtype))
        elif store.compressed is not None:
            # Compressed experts: every load (file or host row) is dequantized into its slot.
            self._pool.set_dequant(self._dequant_plan, store.blob_bytes, _dtype_name(dtype))
        if store.tier == "host":
            self._pool.set_host_sources(store.host_blobs)
        else:
            if self.layout is not store.layout and store.compressed is None:
                self._pool.set_conversion(_dtype_name(store.layout.dtype), _dtype_name(dtype),
                                          _conversion_plan(store.layout, self.layout),
                                          store.layout.slot_bytes)
            files, table, labels = store.source_table()
            for path in files:
                self._pool.add_file(path)
            # The reader checks each file after every read against what it saw when it opened
            # it; this closes the gap between reading the headers and opening the files.
            store.check_unchanged()
            self._pool.set_file_sources(table, labels)
            checks = store.blob_checksums()
            if checks is not None:
                self._pool.set_checksums(checks)
        self._pool.set_verify(bool(verify_checksums))
        # The slot buffer never moves: one tensor over it, made once.
        self._buffer = self._pool.buffer()
        # name -> [num_slots, *shape] views of the slot buffer (no copies); none when the slots
        # hold compressed blobs (`slot_tensors` dequantizes one, `compute_plan` computes on all).
        self.weights: dict[str, torch.Tensor] = (
            {} if slot_format == "compressed" else self.layout.views(self._buffer))
        self._compute_plans: dict[str, tuple[torch.Tensor, int]] = {}

    def __repr__(self) -> str:
        scope = (f"{self.scope_slots} slots/layer" if self.slots_per_layer
                 else f"{self.num_slots} global slots")
        return (f"SlotPool({self.policy}, {scope}, {self.slot_bytes} B/slot, "
                f"{self.allocated_bytes / 2**20:.1f} MiB on {self.device}, {self.store.tier} tier)")

    # --- sizes --------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The slots' dtype (the experts' compute dtype)."""
        return self.layout.dtype

    @property
    def direct_io(self) -> dict[str, bool]:
        """Per file of the disk tier: whether it is read with O_DIRECT (empty for the host tier)."""
        if self.store.tier != "disk":
            return {}
        return dict(zip(self.store.files, self._pool.direct_files(), strict=True))

    @property
    def num_slots(self) -> int:
        return self._pool.num_slots()

    @property
    def slot_bytes(self) -> int:
        return self._pool.slot_bytes()

    @property
    def scope_slots(self) -> int:
        """Slots one layer can use: slots_per_layer, or all slots for the global scope."""
        return self._pool.scope_slots()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the slot buffer: the pool's whole device footprint, <= the budget."""
        return self.num_slots * self.slot_bytes

    @property
    def buffer(self) -> torch.Tensor:
        """The slot buffer, uint8 [num_slots, slot_bytes] on `device`."""
        return self._buffer

    # --- the hot path -------------------------------------------------------------------------

    def acquire(self, layer: int, ids: IdsLike, *, wait: bool = True) -> torch.Tensor:
        """Pin the experts `ids` of `layer`, loading the missing ones.

        Args:
            layer: transformers layer index of an MoE layer.
            ids: expert ids [n] (duplicates allowed; each distinct id is pinned once).
            wait: block until usable: on CPU the bytes are in the slots; on CUDA the copies are
                enqueued and the current stream waits for them. False: call `wait` later.

        Returns:
            slots int64 [n] (CPU), the slot of each id.

        Raises:
            RuntimeError: more missing experts than takeable slots (nothing changed), or a load
                failed (the call's pins are dropped, the failed experts are not resident).
        """
        return self._pool.acquire(self.store.layer_position(layer), _ids(ids), wait)

    def wait(self, layer: int, ids: IdsLike) -> None:
        """Finish `acquire(layer, ids, wait=False)`: same semantics and errors as wait=True."""
        self._pool.wait(self.store.layer_position(layer), _ids(ids))

    def prefetch(self, layer: int, ids: IdsLike) -> int:
        """Start loading the experts of `ids` that are not resident, without pinning them.

        Returns:
            How many loads it started (it stops when no slot is takeable).
        """
        return self._pool.prefetch(self.store.layer_position(layer), _ids(ids))

    def release(self, layer: int, ids: IdsLike) -> None:
        """Drop one pin of each distinct id (acquired before). CUDA: the slot's next load waits
        for the work enqueued so far on the current stream, so release right after enqueueing
        the last kernel that reads the slot; no host sync is needed."""
        self._pool.release(self.store.layer_position(layer), _ids(ids))

    def max_pinnable(self, layer: int) -> int:
        """Distinct missing experts one acquire on `layer` can take now (unpinned scope slots)."""
        return self._pool.max_pinnable(self.store.layer_position(layer))

    @contextmanager
    def pinned(self, layer: int, ids: IdsLike) -> Iterator[torch.Tensor]:
        """`acquire` on entry, `release` on exit; yields the slots."""
        ids = _ids(ids)
        slots = self.acquire(layer, ids)
        try:
            yield slots
        finally:
            self.release(layer, ids)

    def waves(self, layer: int, ids: IdsLike) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Acquire the distinct experts of `ids` in waves that fit the pool.

        Each wave holds at most `max_pinnable(layer)` distinct experts (at least one) and is
        released when the loop asks for the next wave (or stops).

        Yields:
            (wave_ids int64 [w], slots int64 [w]): the wave's distinct ids and their slots.
        """
        distinct = _ids(list(dict.fromkeys(_ids(ids).tolist())))  # first-occurrence order
        start = 0
        while start < distinct.numel():
            size = max(1, self.max_pinnable(layer))
            wave = distinct[start : start + size]
            with self.pinned(layer, wave) as slots:
                yield wave, slots
            start += size

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot as the expert's tensors (e.g. gate_up_proj [2I, H], down_proj [H, I]): views
        of the slot, or for compressed slots a dequantized copy of its blob, valid only while
        the slot is pinned (the pool may load another expert into it after)."""
        if self.slot_format == "compressed":
            dense = ops.dequantize(self._buffer[slot], self._dequant_plan, self.dtype,
                                   self.layout.slot_bytes)
            return self.layout.views(dense)
        return {name: view[slot] for name, view in self.weights.items()}

    def compute_plan(self, up_name: str) -> tuple[torch.Tensor, int]:
        """`ops.moe_experts_compressed`'s plan for these compressed slots and the up
        projection's rows N (made once)."""
        if up_name not in self._compute_plans:
            layout = self.store.compressed
            self._compute_plans[up_name] = (layout.compute_plan(up_name),
                                            layout.matrix_rows(up_name))
        return self._compute_plans[up_name]

    # --- inspection -----------------------------------------------------------------------------

    def resident(self, layer: int) -> dict[int, int]:
        """expert -> slot for the experts of `layer` that are resident (or loading)."""
        slots = self._pool.residency(self.store.layer_position(layer)).tolist()
        return {e: s for e, s in enumerate(slots) if s >= 0}

    def resident_mask(self, layer: int) -> torch.Tensor:
        """bool [E] on the host: which experts of `layer` are resident (or loading). The
        cache-aware router asks this every layer, so it avoids building a dict."""
        return self._pool.residency(self.store.layer_position(layer)) >= 0

    def pins(self, layer: int) -> dict[int, int]:
        """expert -> pin count, for the pinned experts of `layer`."""
        pins = self._pool.pins(self.store.layer_position(layer)).tolist()
        return {e: n for e, n in enumerate(pins) if n > 0}

    def stats(self) -> dict:
        """Counters (module docstring), summed over layers, plus `hit_rate` and `per_layer`.
        Waits first for loads still in flight (at most a few reads), so the counters agree.

        Returns:
            {"hits": int, ..., "stall_s": float, "hit_rate": float,
             "per_layer": {layer: {same keys}}}
        """
        # Loads nobody waits for (a prefetch guessed wrong) may still be reading: let them
        # finish, so bytes_read and prefetches describe the same loads.
        self._pool.drain()
        table = self._pool.stats()  # [L, len(COUNTERS)] int64

        def row(values: list[int]) -> dict:
            d = dict(zip(COUNTERS, values, strict=True))
            d["stall_s"] = d.pop("stall_ns") / 1e9
            lookups = d["hits"] + d["misses"]
            d["hit_rate"] = d["hits"] / lookups if lookups else 0.0
            return d

        out = row(table.sum(0).tolist())
        out["per_layer"] = {layer: row(values) for layer, values in
                            zip(self.store.layers, table.tolist(), strict=True)}
        out["pinned_host_bytes"] = self.pinned_host_bytes
        out["slot_format"] = self.slot_format
        return out

    @property
    def pinned_host_bytes(self) -> int:
        """Page-locked host memory this pool uses: the host tier's blobs when pinned (their
        bytes rounded up to a page, exactly what `ExpertStore.from_model(pin_memory=True)` and
        `host_copy(pin_memory=True)` lock; blobs pinned with torch's own `pin_memory()` lock up
        to twice that, which torch does not report), and on CUDA two staging buffers of
        `slot_bytes` per reader thread (cudaHostAlloc)."""
        blobs = self.store.host_blobs
        pinned = 0
        if blobs is not None and blobs.is_pinned():
            pinned = -(-blobs.untyped_storage().nbytes() // _PAGE) * _PAGE
        if self.device.type == "cuda":
            pinned += _STAGING_PER_READER * self.num_threads * self.slot_bytes
        return pinned

    def reset_stats(self) -> None:
        """Zero the counters, after the loads still in flight (a prefetch) have landed: their
        bytes belong to the counts being cleared, not to the next ones."""
        self._pool.drain()
        self._pool.reset_stats()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _conversion_plan(src: SlotLayout, dst: SlotLayout) -> torch.Tensor:
    """int64 [n, 3] rows (src_offset, dst_offset, numel): each tensor from `src` into `dst`."""
    rows = [(t.offset, dst.tensor(t.name).offset, t.nbytes // src.dtype.itemsize)
            for t in src.tensors]
    return torch.tensor(rows, dtype=torch.int64)


def _ids(ids: IdsLike) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        if ids.device.type != "cpu":
            # Host sync: the residency table lives on the host, so expert ids must come back
            # (one sync per MoE layer at most; GPU-side slot resolution is a later step).
            ids = ids.cpu()
        return ids.reshape(-1).to(torch.int64)
    return torch.tensor(list(ids), dtype=torch.int64)
