"""Expert streaming: the slot pool's reader against raw reads of the same packed file, the latency
of one miss, and (CUDA) slot loads from pinned memory against a plain `copy_(non_blocking=True)`.

Providers:
  raw_direct    sequential O_DIRECT read of the whole packed file, 8 MiB requests, one thread:
                what the storage gives with the page cache bypassed (the baseline).
  raw_buffered  the same with buffered reads after dropping the file's cached pages.
  pool          SlotPool (CPU, global scope) acquiring every expert of the file in batches of 8
                misses, buffered or O_DIRECT, 1-8 reader threads; the page cache is dropped
                (posix_fadvise DONTNEED) before every round, so every miss hits storage.
  miss          one acquire of one non-resident expert (O_DIRECT), next to one raw O_DIRECT
                pread of the same blob.
  integrity     the pool (O_DIRECT, 4 threads), every expert once in a random order (a layer at
                a time, 8 per acquire, as decode asks), with its per-blob CRC32C check on (the
                default), off, and on with a bf16 -> fp32 conversion into the slots
                (load(dtype=float32) on a bf16 checkpoint), rounds interleaved (on, off,
                convert, off, convert, on, ...) so the machine's noise hits all three alike:
                the check's cost as a fraction of read throughput (target: at most 3%), paired
                round by round, and what the conversion costs.
  cuda          host tier (pinned) slot loads of every expert vs `dst.copy_(src, non_blocking=True)`
                of the same bytes into a device buffer of the same size.

Experts have Qwen3-30B-A3B's shape (H=2048, I=768, bf16: 9 MiB each); the file holds 56 of them
(504 MiB; REMOE_BENCH_POOL_EXPERTS changes the count), on the filesystem of $TMPDIR.

Run (CPU part):
  pytest bench/bench_pool.py -m "not cuda" --benchmark-json=/tmp/pool.json
  REMOE_BENCH_POOL_OUT=bench/results/pool-cpu-$(date +%F).json \
      pytest bench/bench_pool.py -m "not cuda"
The results file (machine, versions, date, GB/s with the raw baselines and their ratio) is written
when REMOE_BENCH_POOL_OUT is set.
"""

from __future__ import annotations

import datetime
import json
import mmap
import os
import platform
import random
import statistics
import time

import pytest
import torch

from remoe_engine import ops
from remoe_engine.pool import SlotPool
from remoe_engine.store import ExpertStore, SlotLayout

H, I = 2048, 768  # Qwen3-30B-A3B
NUM_EXPERTS = int(os.environ.get("REMOE_BENCH_POOL_EXPERTS", "56"))
LAYERS = 4
BATCH = 8  # misses per acquire: enough concurrent reads for 8 threads
ROUNDS = int(os.environ.get("REMOE_BENCH_POOL_ROUNDS", "5"))
CHUNK = 8 << 20

RESULTS: list[dict] = []


def _store() -> ExpertStore:
    layout = SlotLayout.build(torch.bfloat16, [("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))])
    per_layer = NUM_EXPERTS // LAYERS
    # Cheap distinct content (no RNG over 500 MB): byte i of blob r is (i * 7 + r) mod 251.
    blobs = torch.empty(LAYERS * per_layer, layout.slot_bytes, dtype=torch.uint8)
    pattern = torch.arange(layout.slot_bytes, dtype=torch.int64) * 7
    for r in range(blobs.shape[0]):
        blobs[r] = ((pattern + r) % 251).to(torch.uint8)
    return ExpertStore(layout=layout, layers=range(LAYERS), num_experts=per_layer,
                       model_type="qwen3_moe", source="bench", host_blobs=blobs)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    host = _store()
    path = host.pack(tmp_path_factory.mktemp("pool") / "bench.remoe", progress=False)
    yield ExpertStore.from_packed(path), host
    path.unlink()


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped; the file is written once, so this is cheap
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _raw_read(path: str, direct: bool) -> int:
    """Sequential read of the whole file in CHUNK requests; returns bytes read."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    done = 0
    try:
        while done < size:
            n = min(CHUNK, size - done)
            got = os.preadv(fd, [view[:n]], done)
            assert got == n, (got, n)
            done += got
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return done


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _record(benchmark, row: dict) -> None:
    benchmark.extra_info.update(row)
    RESULTS.append(row)


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("REMOE_BENCH_POOL_OUT")
    if not out or not RESULTS:
        return
    raw = {r["mode"]: r["gbps"] for r in RESULTS if r["provider"] in ("raw_direct", "raw_buffered")}
    for r in RESULTS:
        if r["provider"] == "pool":
            r["raw_direct_gbps"] = raw.get("direct")
            r["fraction_of_raw_direct"] = (round(r["gbps"] / raw["direct"], 3) if "direct" in raw
                                           else None)
            r["raw_same_mode_gbps"] = raw.get(r["mode"])
            r["fraction_of_raw_same_mode"] = (round(r["gbps"] / raw[r["mode"]], 3)
                                              if r["mode"] in raw else None)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    import transformers

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "filesystem_dir": os.environ.get("TMPDIR", "/tmp"),
                    "note": "shared machine (a pretraining job and compiles ran alongside)"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "setup": {"expert_bytes": 3 * H * I * 2, "experts": NUM_EXPERTS, "batch": BATCH,
                  "rounds": ROUNDS, "raw_chunk_bytes": CHUNK},
        "rows": RESULTS,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


# ------------------------------------------------------------------------- reader throughput


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_raw_sequential_read(benchmark, packed, direct):
    store, _ = packed
    path = store.source
    nbytes = os.path.getsize(path)
    times = []

    def run():
        t0 = time.perf_counter()
        assert _raw_read(path, direct) == nbytes
        times.append(time.perf_counter() - t0)

    benchmark.group = "packed file read"
    benchmark.pedantic(run, setup=lambda: _drop_cache(path), rounds=ROUNDS, iterations=1)
    _record(benchmark, dict(provider=f"raw_{'direct' if direct else 'buffered'}",
                            mode="direct" if direct else "buffered", threads=1,
                            gbps=_gbps(nbytes, statistics.median(times))))


@pytest.mark.parametrize("threads", [1, 2, 4, 8])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_pool_reader_throughput(benchmark, packed, direct, threads):
    store, host = packed
    pool = SlotPool(store, memory_budget=2 * BATCH * store.layout.slot_bytes, num_threads=threads,
                    o_direct=direct)
    order = [(layer, e) for layer in store.layers for e in range(store.num_experts)]
    # Correctness once before timing: a batch lands byte-exact.
    with pool.pinned(0, range(BATCH)) as slots:
        for e, s in enumerate(slots.tolist()):
            assert torch.equal(pool.buffer[s], host.read_expert(0, e))
    times = []

    def run():
        pool.reset_stats()
        t0 = time.perf_counter()
        for layer in store.layers:  # every expert once; more experts than slots: all miss
            for start in range(0, store.num_experts, BATCH):
                ids = list(range(start, min(start + BATCH, store.num_experts)))
                pool.acquire(layer, ids)
                pool.release(layer, ids)
        times.append(time.perf_counter() - t0)

    benchmark.group = "packed file read"
    benchmark.pedantic(run, setup=lambda: _drop_cache(store.source), rounds=ROUNDS, iterations=1)
    stats = pool.stats()
    assert stats["misses"] == len(order) and stats["bytes_read"] == len(order) * pool.slot_bytes
    _record(benchmark, dict(provider="pool", mode="direct" if direct else "buffered",
                            threads=threads,
                            gbps=_gbps(stats["bytes_read"], statistics.median(times)),
                            stall_s_last_round=round(stats["stall_s"], 4)))


# ------------------------------------------------------------- checksum and conversion cost


def test_pool_integrity_and_conversion_cost(benchmark, packed):
    store, host = packed
    budget = 2 * BATCH * store.layout.slot_bytes
    pools = {
        "verify": SlotPool(store, memory_budget=budget, num_threads=4, o_direct=True),
        "no_verify": SlotPool(store, memory_budget=budget, num_threads=4, o_direct=True,
                              verify_checksums=False),
        # Same slot count as the others: the fp32 slots take twice the bytes.
        "verify_convert_fp32": SlotPool(store, memory_budget=2 * budget, num_threads=4,
                                        o_direct=True, dtype=torch.float32),
    }
    # Correctness once: the checked and the converted slots hold the right values.
    for name, pool in pools.items():
        with pool.pinned(0, range(BATCH)) as slots:
            for e, s in enumerate(slots.tolist()):
                want = host.expert_tensors(0, e)
                got = pool.slot_tensors(s)
                for t in want:
                    assert torch.equal(got[t], want[t].to(pool.dtype)), (name, t)
    times = {name: [] for name in pools}

    rng = random.Random(0)

    def one_round(pool, order) -> float:
        pool.reset_stats()
        t0 = time.perf_counter()
        for layer, ids in order:
            pool.acquire(layer, ids)
            pool.release(layer, ids)
        return time.perf_counter() - t0

    def run():
        # Every expert once, in a random order as decode asks for them (a layer at a time, up
        # to 8 distinct experts per acquire); the same order for the three pools of a round.
        order = []
        for layer in rng.sample(list(store.layers), len(store.layers)):
            experts = rng.sample(range(store.num_experts), store.num_experts)
            order += [(layer, experts[i : i + BATCH]) for i in range(0, len(experts), BATCH)]
        # Interleaved, and the one going first rotates: the first read after a cache drop was
        # seen to be slower, which would otherwise always charge the same pool.
        names = list(pools)
        first = len(times[names[0]]) % len(names)
        for name in names[first:] + names[:first]:
            _drop_cache(store.source)
            times[name].append(one_round(pools[name], order))

    benchmark.group = "integrity"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    # A few experts of a round can still be resident from the round before (the same ones for
    # every pool: same order, same slot count): count the bytes read (of the last round).
    nbytes = pools["no_verify"].stats()["bytes_read"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    # The check's own CPU time, which the noise of whole-file rounds can hide: CRC32C of one
    # blob (as the reader computes it), fastest of 20, against reading that blob at the rate
    # the check-off pool reached.
    blob = store.read_expert(store.layers[0], 0)
    crc_s = min(_timed(lambda: ops.crc32c(blob)) for _ in range(20))
    crc_fraction = crc_s / (blob.numel() / (nbytes / medians["no_verify"]))
    for name, pool in pools.items():
        stats = pool.stats()
        assert stats["load_failures"] == 0 and stats["bytes_read"] == nbytes
        assert stats["bytes_read"] == stats["misses"] * store.layout.slot_bytes
        _record(benchmark, dict(
            provider=f"integrity_{name}", mode="direct", threads=4,
            gbps=_gbps(nbytes, medians[name]),
            time_vs_no_verify=round(medians[name] / medians["no_verify"], 4),
            # Paired: each round against the check-off round right beside it, then the median.
            paired_time_vs_no_verify=round(statistics.median(
                a / b for a, b in zip(times[name], times["no_verify"], strict=True)), 4),
            rounds_s=[round(t, 4) for t in times[name]],
            crc32c_gbps=_gbps(blob.numel(), crc_s), crc32c_impl=ops.crc32c_impl(),
            crc32c_time_vs_blob_read=round(crc_fraction, 4)))


# -------------------------------------------------------------------------- one miss latency


@pytest.mark.parametrize("provider", ["raw_pread_direct", "pool_miss_direct"])
def test_one_miss_latency(benchmark, packed, provider):
    store, _ = packed
    pool = SlotPool(store, slots_per_layer=1, num_threads=1, o_direct=True)
    state = {"e": 0}
    # The raw side gets the same advantages as the pool: an open descriptor and a destination
    # buffer allocated and faulted in once.
    fd = os.open(store.source, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, store.layout.slot_bytes)
    buf.write(bytes(store.layout.slot_bytes))

    def pool_miss():
        e = state["e"] = (state["e"] + 1) % store.num_experts  # 1 slot: always a miss
        pool.acquire(0, [e])
        pool.release(0, [e])

    def raw_pread():
        e = state["e"] = (state["e"] + 1) % store.num_experts
        seg = store.segments(0, e)[0]
        assert os.preadv(fd, [buf], seg.offset) == seg.nbytes

    benchmark.group = "one miss"
    fn = pool_miss if provider.startswith("pool") else raw_pread
    benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=2)
    os.close(fd)
    buf.close()
    _record(benchmark, dict(provider=provider, mode="direct", threads=1,
                            median_ms=round(benchmark.stats.stats.median * 1e3, 3),
                            bytes=store.layout.slot_bytes))


# ------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["torch_copy", "pool"])
def test_cuda_slot_load_throughput(benchmark, provider):
    host = _store()
    host.host_blobs = host.host_blobs.pin_memory()
    n = host.host_blobs.shape[0]
    # Global scope, 16 slots, 56 experts acquired cyclically: every acquire misses (checked).
    pool = SlotPool(host, "cuda", memory_budget=2 * BATCH * host.layout.slot_bytes, num_threads=2)
    dst = torch.empty_like(pool.buffer)  # same bytes, same layout of destination
    order = [(layer, e) for layer in host.layers for e in range(host.num_experts)]

    def torch_copy():
        for i in range(0, n, BATCH):
            rows = slice(i, min(i + BATCH, n))
            for r in range(rows.start, rows.stop):
                dst[r - rows.start].copy_(host.host_blobs[r], non_blocking=True)
        torch.cuda.synchronize()

    def pool_load():
        pool.reset_stats()
        for layer in host.layers:
            for start in range(0, host.num_experts, BATCH):
                ids = list(range(start, min(start + BATCH, host.num_experts)))
                pool.acquire(layer, ids)
                pool.release(layer, ids)
        torch.cuda.synchronize()

    fn = pool_load if provider == "pool" else torch_copy
    fn()  # warm-up and correctness once
    if provider == "pool":
        layer, e = order[-1]
        with pool.pinned(layer, [e]) as slots:  # still resident from the run above
            assert torch.equal(pool.buffer[int(slots[0])].cpu(), host.read_expert(layer, e))
    benchmark.group = "cuda slot load"
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
    nbytes = n * host.layout.slot_bytes
    if provider == "pool":
        assert pool.stats()["bytes_copied"] == nbytes  # the last round: all misses
    _record(benchmark, dict(provider=provider, mode="pinned_h2d", threads=2,
                            gbps=_gbps(nbytes, benchmark.stats.stats.median)))
