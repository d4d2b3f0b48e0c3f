"""SlotPool: the policy against an independent Python model, pins, budgets (allocated bytes and
RSS), failed loads leaving the pool consistent, concurrency, prefetch, and the CUDA path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import remoe_engine
from remoe_engine import ops
from remoe_engine.pool import SlotPool, parse_bytes
from remoe_engine.store import ExpertStore, SlotLayout

H, I = 32, 16  # a synthetic expert: gate_up [2I, H] + down [H, I] fp16 = 3 KiB -> one 4 KiB slot


def synthetic_store(num_layers: int = 2, num_experts: int = 8, *, layers=None, seed: int = 0,
                    shape=(H, I)) -> ExpertStore:
    """A host-tier store of random expert bytes (every blob distinct)."""
    h, i = shape
    layout = SlotLayout.build(torch.float16, [("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))])
    gen = torch.Generator().manual_seed(seed)
    rows = num_layers * num_experts
    blobs = torch.randint(0, 256, (rows, layout.slot_bytes), generator=gen, dtype=torch.uint8)
    return ExpertStore(layout=layout, layers=layers or list(range(num_layers)),
                       num_experts=num_experts, model_type="synthetic", source="test",
                       host_blobs=blobs)


def _check_slots(pool: SlotPool, layer: int, ids, slots) -> None:
    """What sits in each returned slot is that expert's blob."""
    for e, s in zip(ids, slots.tolist(), strict=True):
        assert torch.equal(pool.buffer[s].cpu(), pool.store.read_expert(layer, e)), (layer, e, s)


# ------------------------------------------------------------------ the policy, independently


class PolicyModel:
    """The pool.py policy text as plain Python: residency by key, no slots, no threads."""

    def __init__(self, capacity: int, per_layer: bool, policy: str):
        self.capacity, self.per_layer, self.policy = capacity, per_layer, policy
        self.entries: dict[tuple[int, int], list[int]] = {}  # key -> [stamp, uses]
        self.clock = 0
        self.evictions = 0

    def acquire(self, layer: int, ids: list[int]) -> int:
        distinct = list(dict.fromkeys(ids))
        mine = {(layer, e) for e in distinct}
        hits = [k for k in mine if k in self.entries]
        for j, e in enumerate(distinct):
            if (layer, e) in self.entries:
                self.entries[(layer, e)] = [self.clock + j, self.entries[(layer, e)][1] + 1]
        for j, e in enumerate(distinct):
            key = (layer, e)
            if key in self.entries:
                continue
            scope = [k for k in self.entries if not self.per_layer or k[0] == layer]
            if len(scope) == self.capacity:
                candidates = [k for k in scope if k not in mine]
                if self.policy == "lru":
                    victim = min(candidates, key=lambda k: self.entries[k][0])
                else:
                    victim = min(candidates, key=lambda k: (self.entries[k][1], self.entries[k][0]))
                del self.entries[victim]
                self.evictions += 1
            self.entries[key] = [self.clock + j, 1]
        self.clock += len(distinct)
        return len(hits)


@st.composite
def traces(draw):
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(2, 12))
    per_layer = draw(st.booleans())
    k = draw(st.integers(1, min(4, num_experts)))
    capacity = draw(st.integers(k, num_experts * (1 if per_layer else num_layers)))
    steps = draw(st.lists(st.tuples(st.integers(0, num_layers - 1),
                                    st.lists(st.integers(0, num_experts - 1), min_size=1,
                                             max_size=k)),
                          min_size=1, max_size=60))
    return num_layers, num_experts, per_layer, capacity, steps


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=traces())
def test_policy_matches_independent_model(policy, trace):
    num_layers, num_experts, per_layer, capacity, steps = trace
    store = synthetic_store(num_layers, num_experts)
    if per_layer:
        pool = SlotPool(store, slots_per_layer=capacity, policy=policy, num_threads=2)
    else:
        pool = SlotPool(store, memory_budget=capacity * store.layout.slot_bytes, policy=policy,
                        num_threads=2)
    model = PolicyModel(capacity, per_layer, policy)
    hits_before = 0
    for layer, ids in steps:
        want_hits = model.acquire(layer, ids)
        slots = pool.acquire(layer, ids)
        hits = pool.stats()["hits"]
        assert hits - hits_before == want_hits, (layer, ids)
        hits_before = hits
        _check_slots(pool, layer, ids, slots)
        pool.release(layer, ids)
        for lay in range(num_layers):
            assert set(pool.resident(lay)) == {e for (m, e) in model.entries if m == lay}
    stats = pool.stats()
    assert stats["misses"] == sum(len(set(ids)) for _, ids in steps) - stats["hits"]
    assert stats["evictions"] == model.evictions
    assert pool.pins(0) == {}


def test_lru_and_lfu_differ_as_specified():
    # Capacity 3, one layer: 0 is used three times, then 1 and 2; 3 must evict one of them.
    # LRU evicts 0 (oldest stamp), so the final [0] misses and evicts 1. LFU evicts 1 (one use,
    # older than 2) and keeps 0 (three uses), so the final [0] hits.
    trace = [[0], [0], [0], [1], [2], [3], [0]]
    for policy, hits in [("lru", 2), ("lfu", 3)]:
        pool = SlotPool(synthetic_store(1, 8), slots_per_layer=3, policy=policy)
        for ids in trace:
            with pool.pinned(0, ids):
                pass
        stats = pool.stats()
        assert (stats["hits"], stats["misses"]) == (hits, 7 - hits), policy
        assert set(pool.resident(0)) == {0, 2, 3}, policy


# ---------------------------------------------------------------------------------- pins, waves


def test_pinned_experts_survive_pressure_and_overcommit_is_a_clear_error():
    store = synthetic_store(2, 16)
    pool = SlotPool(store, slots_per_layer=4)
    held = pool.acquire(0, [3, 7])  # pinned for the whole test
    for step in range(40):
        ids = [(step * 5 + j) % 16 for j in range(2) if (step * 5 + j) % 16 not in (3, 7)]
        with pool.pinned(0, ids) as slots:
            _check_slots(pool, 0, ids, slots)
        assert pool.resident(0)[3] == held[0] and pool.resident(0)[7] == held[1]
    _check_slots(pool, 0, [3, 7], held)
    assert pool.max_pinnable(0) == 2 and pool.max_pinnable(1) == 4
    before = (pool.resident(0), pool.stats())
    with pytest.raises(RuntimeError, match=r"layer 0 asks for 3 distinct experts, 3 of them not "
                       r"resident, but only 2 of the 4 slots in its scope can be taken now \(2 "
                       r"pinned, 0 hits of this call\).*max_pinnable"):
        pool.acquire(0, [10, 11, 12])
    assert (pool.resident(0), pool.stats()) == before  # nothing changed
    # Hits of the call do not need a slot: 3 and 7 pinned again plus 2 misses fit.
    slots = pool.acquire(0, [3, 10, 7, 11])
    _check_slots(pool, 0, [3, 10, 7, 11], slots)
    assert pool.pins(0) == {3: 2, 7: 2, 10: 1, 11: 1} and pool.max_pinnable(0) == 0
    pool.release(0, [3, 10, 7, 11])
    pool.release(0, [3, 7])
    assert pool.pins(0) == {}
    with pytest.raises(RuntimeError, match="layer 0 expert 3 is not pinned"):
        pool.release(0, [3])
    with pytest.raises(RuntimeError, match=r"expert id 16 at position 1 is outside \[0, 16\)"):
        pool.acquire(0, [1, 16])
    with pytest.raises(KeyError, match=r"layer 5 has no routed experts; MoE layers: \(0, 1\)"):
        pool.acquire(5, [1])


def test_waves_cover_a_layer_larger_than_the_pool():
    store = synthetic_store(1, 20)
    pool = SlotPool(store, slots_per_layer=6)
    pool.acquire(0, [0])  # one slot stays pinned: waves get 5
    seen = []
    for wave, slots in pool.waves(0, list(range(19, -1, -1)) * 2):
        assert wave.numel() <= 5
        _check_slots(pool, 0, wave.tolist(), slots)
        seen += wave.tolist()
    assert seen == list(range(19, -1, -1)) and pool.pins(0) == {0: 1}


def test_prefetch_counts_and_never_evicts_pinned():
    pool = SlotPool(synthetic_store(1, 8), slots_per_layer=4, policy="lfu")
    pool.acquire(0, [0, 1])
    assert pool.prefetch(0, [2, 3, 4, 5]) == 2  # only two slots are takeable
    assert set(pool.resident(0)) == {0, 1, 2, 3}
    slots = pool.acquire(0, [2, 3])
    _check_slots(pool, 0, [2, 3], slots)
    stats = pool.stats()
    assert (stats["prefetches"], stats["prefetch_hits"], stats["hits"], stats["misses"]) == (
        2, 2, 2, 2)
    pool.release(0, [0, 1, 2, 3])
    assert pool.prefetch(0, [0, 6]) == 1  # 0 is resident: untouched


def test_acquire_without_wait_then_wait():
    pool = SlotPool(synthetic_store(1, 8), slots_per_layer=4)
    slots = pool.acquire(0, [5, 6, 5], wait=False)
    pool.wait(0, [5, 6])
    assert slots[0] == slots[2]
    _check_slots(pool, 0, [5, 6, 5], slots)
    with pytest.raises(RuntimeError, match="layer 0 expert 7 is not pinned .acquire it first"):
        pool.wait(0, [7])


# --------------------------------------------------------------------------------- the budget


def test_memory_budget_is_never_exceeded():
    store = synthetic_store(3, 8)
    slot = store.layout.slot_bytes
    for budget in (slot, 5 * slot + 17, "20KiB", parse_bytes("0.05MB")):
        pool = SlotPool(store, memory_budget=budget)
        assert pool.allocated_bytes == pool.buffer.numel() <= parse_bytes(budget)
        assert pool.num_slots == parse_bytes(budget) // slot and pool.scope_slots == pool.num_slots
    with pytest.raises(ValueError, match=r"memory_budget 4095 bytes is less than one 4096-byte"):
        SlotPool(store, memory_budget=slot - 1)
    with pytest.raises(ValueError, match="exactly one of slots_per_layer"):
        SlotPool(store, slots_per_layer=2, memory_budget="1GiB")
    with pytest.raises(ValueError, match="cannot parse a byte size from '6 parsecs'"):
        parse_bytes("6 parsecs")


@pytest.mark.slow
def test_rss_stays_within_budget_in_a_subprocess(tmp_path):
    """Stream a 72 MiB packed file twice through a 6 MiB pool: RSS grows by about the budget."""
    script = textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pool import synthetic_store
        from remoe_engine.pool import SlotPool
        from remoe_engine.store import ExpertStore

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        big = synthetic_store(4, 24, shape=(512, 256))  # 4 x 24 experts of 768 KiB
        big.pack({str(tmp_path / "big.remoe")!r}, progress=False)
        del big
        store = ExpertStore.from_packed({str(tmp_path / "big.remoe")!r})
        torch.zeros(1)
        base = rss()
        pool = SlotPool(store, memory_budget="6MiB", num_threads=4)
        for rounds in range(2):
            for layer in store.layers:
                for e in range(0, store.num_experts, 2):
                    with pool.pinned(layer, [e, e + 1]):
                        pass
        print(json.dumps(dict(grew=rss() - base, allocated=pool.allocated_bytes,
                              read=pool.stats()["bytes_read"], slot=pool.slot_bytes)))
    """)
    # cwd: not the repository root, whose source tree (without the built _C) would shadow the
    # installed package; PYTHONPATH: the same remoe_engine this process imported.
    package_root = os.path.dirname(os.path.dirname(remoe_engine.__file__))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True, cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": package_root})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["allocated"] <= 6 * 2**20
    assert res["read"] == 2 * 96 * res["slot"] == 2 * 72 * 2**20  # every expert, twice
    # Slot memory plus thread stacks and allocator slack; the 96 MiB never became resident.
    assert res["grew"] <= res["allocated"] + 4 * 2**20, res


# ---------------------------------------------------------- failures leave the pool consistent


def test_truncated_packed_file_fails_cleanly_and_pool_stays_usable(tmp_path):
    store = synthetic_store(2, 8)
    path = store.pack(tmp_path / "t.remoe", progress=False)
    packed = ExpertStore.from_packed(path)
    pool = SlotPool(packed, slots_per_layer=4)
    with pool.pinned(0, [0, 1]) as slots:  # resident before the damage
        _check_slots(pool, 0, [0, 1], slots)
    os.truncate(path, packed.segments(1, 6)[0].offset + 100)  # layer 1 experts 6, 7 are gone
    # Expert 6 is cut off; 2 and 3 are still in the file, but the file changed since it was
    # opened, so their bytes are not trusted either.
    with pytest.raises(RuntimeError) as failure:
        pool.acquire(1, [2, 6, 3])
    assert re.search(rf"layer 1 expert 6: '{re.escape(str(path))}' is truncated: 'expert blob "
                     r"\(layer 1, expert 6\)' needs bytes \d+\.\.\d+ but the file ends at",
                     str(failure.value)), failure.value
    for expert in (2, 3):
        assert re.search(rf"layer 1 expert {expert}: .* changed on disk after the model was "
                         "loaded", str(failure.value)), failure.value
    # The failed experts are not resident, and the call left nothing pinned.
    assert pool.resident(1) == {} and pool.pins(1) == {} and pool.pins(0) == {}
    assert pool.stats()["load_failures"] == 3
    assert pool.max_pinnable(1) == 4
    # Still usable: what is resident stays a hit; every new read of the changed file fails.
    with pytest.raises(RuntimeError, match="layer 1 expert 7: .* is truncated"):
        pool.acquire(1, [7])
    with pytest.raises(RuntimeError, match="layer 0 expert 2: .* changed on disk"):
        pool.acquire(0, [0, 1, 2])
    with pool.pinned(0, [0, 1]) as slots:
        _check_slots(pool, 0, [0, 1], slots)
    assert pool.stats()["per_layer"][0]["hits"] == 4


def test_truncated_checkpoint_names_the_tensor_at_load_time(tmp_path):
    import hf_tiny

    model = hf_tiny.build("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    store = ExpertStore.from_checkpoint(tmp_path / "ckpt")
    pool = SlotPool(store, slots_per_layer=2)
    seg = store.segments(3, 1)[1]  # expert 1's w3 (up) range
    os.truncate(seg.file, seg.offset + 8)
    with pytest.raises(RuntimeError, match=r"layer 3 expert 1: .* is truncated: "
                       r"'model\.layers\.3\.block_sparse_moe\.experts\.1\.w3\.weight' needs"):
        pool.acquire(3, [0, 1])
    # Expert 0's bytes are still in the file, but the file changed: nothing of it is trusted.
    assert pool.pins(3) == {} and pool.resident(3) == {}
    with pytest.raises(RuntimeError, match=r"layer 0 expert 4: .* changed on disk after the "
                       "model was loaded"):
        pool.acquire(0, [4, 5])
    assert pool.pins(0) == {} and pool.resident(0) == {}


# ------------------------------------------------------------------------------- concurrency


def test_concurrent_acquire_from_two_threads():
    store = synthetic_store(2, 16)
    pool = SlotPool(store, memory_budget=10 * store.layout.slot_bytes, num_threads=3)
    errors, done = [], []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(300):
                layer = int(torch.randint(0, 2, (1,), generator=gen))
                ids = torch.randint(0, 16, (4,), generator=gen).tolist()  # <= 4 pins per thread
                slots = pool.acquire(layer, ids)
                _check_slots(pool, layer, ids, slots)  # stable while pinned
                pool.release(layer, ids)
                done.append(len(set(ids)))
        except Exception as error:  # surfaced by the main thread's assert
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = pool.stats()
    assert stats["hits"] + stats["misses"] == sum(done) and len(done) == 600
    assert pool.pins(0) == {} and pool.pins(1) == {}
    assert len(pool.resident(0)) + len(pool.resident(1)) == 10


# ------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("tier", ["host", "packed", "packed_o_direct"])
def test_cuda_pool_loads_exact_bytes(tier, tmp_path):
    if not ops.cuda_kernels_built():
        pytest.fail("CUDA is available but remoe_engine._C was built without CUDA kernels")
    store = synthetic_store(2, 12, shape=(256, 128))
    if tier != "host":
        store = ExpertStore.from_packed(store.pack(tmp_path / "c.remoe", progress=False))
    else:
        store.host_blobs = store.host_blobs.pin_memory()
    pool = SlotPool(store, "cuda", slots_per_layer=3, o_direct=tier == "packed_o_direct")
    assert pool.buffer.is_cuda
    for layer in store.layers:
        for e in range(0, 12, 2):
            with pool.pinned(layer, [e, e + 1]) as slots:
                _check_slots(pool, layer, [e, e + 1], slots)  # .cpu() syncs the current stream
    stats = pool.stats()
    assert stats["misses"] == 24 and stats["bytes_copied"] == 24 * store.layout.slot_bytes


@pytest.mark.cuda
def test_cuda_pool_refuses_pageable_host_blobs():
    """Copies from pageable memory can wait for the compute stream: every miss would stall."""
    store = synthetic_store(1, 4)
    with pytest.raises(ValueError, match="a CUDA pool needs pinned host blobs"):
        SlotPool(store, "cuda", slots_per_layer=2)
    store.host_blobs = store.host_blobs.pin_memory()
    pool = SlotPool(store, "cuda", slots_per_layer=2)
    # The blobs (pinned here with torch's pin_memory, so reported at their own size) and two
    # staging buffers per reader.
    assert pool.stats()["pinned_host_bytes"] == (store.host_blobs.numel()
                                                 + 2 * pool.num_threads * pool.slot_bytes)


@pytest.mark.cuda
def test_cuda_release_orders_reuse_after_pending_kernels():
    """A slot released while a long kernel still reads it is not overwritten under it."""
    store = synthetic_store(1, 4, shape=(1024, 512))
    store.host_blobs = store.host_blobs.pin_memory()
    pool = SlotPool(store, "cuda", slots_per_layer=1)
    expert0 = store.expert_tensors(0, 0)["down_proj"].float().cuda()
    want = torch.zeros_like(expert0)
    for _ in range(50):
        want += expert0  # the same additions as below, so the comparison is exact
    with pool.pinned(0, [0]) as slots:
        w = pool.slot_tensors(int(slots[0]))["down_proj"]
        acc = torch.zeros_like(expert0)
        torch.cuda._sleep(50_000_000)  # keep the stream busy, so the reads below are pending
        for _ in range(50):
            acc += w.float()
    # Released with the kernels still queued: the next load must wait for them.
    with pool.pinned(0, [1]) as slots:
        assert int(slots[0]) == 0  # the same slot was reused
        _check_slots(pool, 0, [1], slots)
    assert torch.equal(acc, want)


# ------------------------------------------------------- checksummed reads of large blobs


def _direct_io_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("damage", ["none", "flip_in_chunk_7", "truncate_mid_blob"])
def test_large_packed_blobs_are_checksummed_chunk_by_chunk(tmp_path, damage):
    """Blobs of several MiB on an O_DIRECT file are read as concurrent chunks and checksummed as
    they arrive (the path real experts take): exact bytes, and a flipped byte anywhere or a cut
    blob is an error naming the blob, with nothing left resident or pinned."""
    store = synthetic_store(2, 4, shape=(512, 1024))  # 3 MiB blobs: several 1 MiB chunks
    assert store.layout.slot_bytes >= 3 << 20
    path = store.pack(tmp_path / "big.remoe", progress=False)
    if not _direct_io_supported(path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    packed = ExpertStore.from_packed(path)
    blob = packed.segments(1, 2)[0]
    if damage == "flip_in_chunk_7":
        with open(path, "r+b") as f:
            f.seek(blob.offset + 7 * (blob.nbytes // 10) + 123)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
    pool = SlotPool(ExpertStore.from_packed(path), slots_per_layer=2, o_direct=True)
    assert all(pool.direct_io.values())
    slots = pool.acquire(0, [0, 3])
    _check_slots(pool, 0, [0, 3], slots)
    pool.release(0, [0, 3])
    if damage == "none":
        slots = pool.acquire(1, [2, 1])
        _check_slots(pool, 1, [2, 1], slots)
        return
    if damage == "truncate_mid_blob":  # after the pool opened the file: cut mid-chunk
        os.truncate(path, blob.offset + blob.nbytes // 2 + 5)
        match = r"layer 1 expert 2: .* is truncated: 'expert blob \(layer 1, expert 2\)'"
    else:
        match = r"expert blob \(layer 1, expert 2\) fails its CRC32C check"
    with pytest.raises(RuntimeError, match=match):
        pool.acquire(1, [2, 1])
    assert 2 not in pool.resident(1) and pool.pins(1) == {}


def test_large_packed_blobs_convert_chunk_by_chunk_into_float32_slots(tmp_path):
    """The chunked checksummed read also converts each chunk as it arrives (fp16 file, fp32
    slots): every tensor lands converted exactly as torch's .to(float32) does."""
    store = synthetic_store(1, 3, shape=(512, 1024))  # fp16, 3 MiB blobs
    path = store.pack(tmp_path / "big.remoe", progress=False)
    if not _direct_io_supported(path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    pool = SlotPool(ExpertStore.from_packed(path), slots_per_layer=3, o_direct=True,
                    dtype=torch.float32)
    assert pool.dtype == torch.float32
    with pool.pinned(0, [0, 1, 2]) as slots:
        for e, s in enumerate(slots.tolist()):
            got, want = pool.slot_tensors(s), store.expert_tensors(0, e)
            for name, tensor in want.items():
                # Bitwise (random bytes include NaNs, which torch.equal never calls equal).
                assert torch.equal(got[name].view(torch.int32),
                                   tensor.to(torch.float32).view(torch.int32)), (e, name)


def test_reset_stats_waits_for_loads_in_flight(tmp_path):
    """A prefetch still reading when the counters reset must not land its bytes in the new count
    (a flaky `remoe run --prefetch` row: bytes read one slot above misses + prefetches)."""
    store = synthetic_store(2, 8, shape=(256, 512))
    packed = ExpertStore.from_packed(store.pack(tmp_path / "r.remoe", progress=False))
    for _ in range(30):
        pool = SlotPool(packed, slots_per_layer=8, o_direct=False)
        pool.prefetch(packed.layers[0], list(range(8)))
        pool.reset_stats()
        stats = pool.stats()
        assert stats["bytes_read"] == (stats["misses"] + stats["prefetches"]) * pool.slot_bytes
