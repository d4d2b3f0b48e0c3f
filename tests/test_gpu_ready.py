"""The GPU path, ready for its first run (issue 19): exact-size pinned host memory, the copy
engine's pipeline (double-buffered staging, per-reader streams, a busy slot delaying no other
copy), a non-default current stream, prefetch with wait=False, more misses than reader threads,
patch() and load(store="disk") on CUDA against CPU, and the host syncs of one decode step.

The CPU tests check what a machine without a GPU can: the clear refusal to pin without CUDA, the
bytes a CPU pool pins (none), and the host transfers and pool calls of one decode step. The rest
is marked `cuda` and runs in bench/gpu_check.sh.
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings

import hf_tiny
import pytest
import torch
from test_pool import _check_slots, synthetic_store
from torch.overrides import TorchFunctionMode

import remoe_engine
from remoe_engine import ops
from remoe_engine.families import find_moe_blocks, routing_spec
from remoe_engine.hf_compat import cache_kwargs
from remoe_engine.pool import SlotPool
from remoe_engine.store import ExpertStore

PAGE = 4096


def _prefill_then_step(model, batch: int = 1):
    """Prefill a prompt, then return (next token, forward kwargs) for one decode step."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 6),
                        generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return out.logits[:, -1:].argmax(-1), cache_kwargs(model, out)


class _HostTransfers(TorchFunctionMode):
    """Records every tensor transfer to the host (`.to("cpu")`, `.cpu()`), and every non_blocking
    host-to-device copy from pageable memory the engine asks for, with the file that asked."""

    def __init__(self):
        super().__init__()
        self.to_host: list[str] = []
        self.pageable_async: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu) and isinstance(args[0], torch.Tensor):
            target = _target_device(args[1:], kwargs) if func is torch.Tensor.to else "cpu"
            where = _caller()
            if target == "cpu" and args[0].device.type != "cpu":
                self.to_host.append(where)
            elif target == "cpu" and args[0].device.type == "cpu" and where.startswith("remoe"):
                self.to_host.append(where)  # on a CPU run: what would be a transfer on a GPU
            if (target not in (None, "cpu") and args[0].device.type == "cpu"
                    and kwargs.get("non_blocking") and not args[0].is_pinned()
                    and where.startswith("remoe")):
                self.pageable_async.append(where)
        return func(*args, **kwargs)


def _target_device(args, kwargs) -> str | None:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a).type
    return None


def _caller() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):  # not _caller, __torch_function__
        if "remoe_engine" in frame.filename or "/tests/" in frame.filename:
            package = "remoe_engine/" if "remoe_engine" in frame.filename else "tests/"
            return f"{package}{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


# ------------------------------------------------------------------------------- CPU side


def test_pinning_without_cuda_is_refused_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CUDA tests below cover pinning")
    with pytest.raises(RuntimeError, match="no CUDA support|no CUDA device is available"):
        ops.pinned_host_empty(2, PAGE)
    model = hf_tiny.build("qwen3_moe")
    with pytest.raises(RuntimeError, match="no CUDA support|no CUDA device is available"):
        ExpertStore.from_model(model, pin_memory=True)
    assert ops.pinned_host_bytes() == 0


def test_a_cpu_pool_reports_no_pinned_bytes():
    pool = SlotPool(synthetic_store(1, 4), "cpu", slots_per_layer=2)
    assert pool.stats()["pinned_host_bytes"] == 0


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
def test_one_decode_step_transfers_ids_once_per_moe_layer(prefetch):
    """Issue 19, item 4, on CPU: the host transfers and pool calls of one decode step. Each
    `.to("cpu")` here would be a device-to-host sync on a GPU: one per MoE layer (the ids the
    pool must resolve), plus one per prefetched layer (the guess). Nothing else in the engine
    brings a tensor to the host at decode."""
    model = hf_tiny.build("qwen3_moe")
    handle = remoe_engine.patch(model, slots_per_layer=4, prefetch=prefetch)
    layers = len(handle.blocks)
    token, kwargs = _prefill_then_step(model)
    calls = {"acquire": 0, "prefetch": 0}
    pool = handle.pool
    for name in calls:
        original = getattr(pool, name)

        def counted(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)
        setattr(pool, name, counted)
    with _HostTransfers() as seen, torch.no_grad():
        model(token, **kwargs, use_cache=True)
    want = layers + (layers - 1 if prefetch else 0)
    assert len(seen.to_host) == want, seen.to_host
    assert all(w.startswith("remoe_engine/experts.py") for w in seen.to_host), seen.to_host
    assert calls == {"acquire": layers, "prefetch": layers - 1 if prefetch else 0}


# ------------------------------------------------------------------------------ CUDA side


def _pinned_store(num_layers=2, num_experts=8, shape=(256, 128)) -> ExpertStore:
    """synthetic_store's blobs, in exact-size pinned memory."""
    store = synthetic_store(num_layers, num_experts, shape=shape)
    store.host_blobs = ops.pinned_host_empty(*store.host_blobs.shape).copy_(store.host_blobs)
    return store


@pytest.mark.cuda
def test_pinned_host_tier_locks_exactly_its_bytes():
    """Was: torch's pinned allocator rounded every request up to a power of two (54 GiB of
    experts pinned 64 GiB). Now the store locks its bytes (page-rounded) and frees them."""
    gc.collect()  # earlier tests' pinned blobs must not be freed in the middle of this one
    before = ops.pinned_host_bytes()
    rows, cols = 5, 3 * PAGE  # 60 KiB: torch would pin a 64 KiB block
    blobs = ops.pinned_host_empty(rows, cols)
    assert blobs.is_pinned() and blobs.shape == (rows, cols) and blobs.data_ptr() % PAGE == 0
    assert ops.pinned_host_bytes() - before == rows * cols
    del blobs
    assert ops.pinned_host_bytes() == before

    model = hf_tiny.build("qwen3_moe").cuda()
    handle = remoe_engine.patch(model, slots_per_layer=4)
    blobs = handle.store.host_blobs
    assert blobs.is_pinned()
    exact = -(-blobs.numel() // PAGE) * PAGE
    assert ops.pinned_host_bytes() - before == exact
    stats = handle.stats()
    staging = 2 * handle.pool.num_threads * handle.pool.slot_bytes
    assert stats["pinned_host_bytes"] == exact + staging
    # host_copy(pin_memory=True) locks exactly its bytes too.
    copy = handle.store.host_copy(pin_memory=True)
    assert copy.host_blobs.is_pinned()
    assert ops.pinned_host_bytes() - before == 2 * exact


@pytest.mark.cuda
def test_pinned_and_pageable_host_tiers():
    """Pageable blobs are refused for a CUDA pool (a copy from them may wait for the compute
    stream); exact-size pinned blobs serve every expert byte for byte."""
    store = synthetic_store(2, 8, shape=(256, 128))
    with pytest.raises(ValueError, match="a CUDA pool needs pinned host blobs"):
        SlotPool(store, "cuda", slots_per_layer=3)
    pool = SlotPool(_pinned_store(), "cuda", slots_per_layer=3)
    for layer in (0, 1):
        for e in range(0, 8, 2):
            with pool.pinned(layer, [e, e + 1]) as slots:
                _check_slots(pool, layer, [e, e + 1], slots)


@pytest.mark.cuda
def test_disk_tier_slot_reuse_waits_for_the_kernel_still_reading_it(tmp_path):
    """A disk-tier load into a slot whose last reader is still queued on the GPU lands only
    after that kernel (the release event), through a reader thread's staging buffer."""
    store = synthetic_store(1, 4, shape=(1024, 512))
    packed = ExpertStore.from_packed(store.pack(tmp_path / "e.remoe", progress=False))
    pool = SlotPool(packed, "cuda", slots_per_layer=1)
    expert0 = store.expert_tensors(0, 0)["down_proj"].float().cuda()
    want = torch.zeros_like(expert0)
    for _ in range(50):
        want += expert0
    with pool.pinned(0, [0]) as slots:
        w = pool.slot_tensors(int(slots[0]))["down_proj"]
        acc = torch.zeros_like(expert0)
        torch.cuda._sleep(50_000_000)  # the reads below stay queued behind this
        for _ in range(50):
            acc += w.float()
    with pool.pinned(0, [1]) as slots:
        assert int(slots[0]) == 0
        _check_slots(pool, 0, [1], slots)
    assert torch.equal(acc, want)


@pytest.mark.cuda
def test_a_busy_slot_does_not_delay_copies_into_other_slots():
    """Was: every copy went onto one stream and first waited for its slot's release, so a copy
    into a slot still read by a long kernel held up every later copy. Now it waits on its own
    lane: a later copy into an idle slot lands while the long kernel still runs."""
    pool = SlotPool(_pinned_store(1, 8), "cuda", slots_per_layer=2)
    pool.acquire(0, [0, 1])  # slots 0 and 1
    pool.release(0, [1])
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s on the current stream
    sleeping = torch.cuda.Event()
    sleeping.record()
    pool.release(0, [0])  # slot 0's next load must wait for the sleep
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        pool.acquire(0, [2])  # LRU: slot 0 (busy)
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        (slot,) = pool.acquire(0, [3]).tolist()  # slot 1 (idle)
        assert slot == 1
        landed_copy = pool.buffer[slot].clone()
        landed = torch.cuda.Event()
        landed.record()
    deadline = time.monotonic() + 0.5
    while not landed.query() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert landed.query(), "the copy into the idle slot waited for the busy one"
    assert not sleeping.query(), "the sleep finished too early for this test to mean anything"
    torch.cuda.synchronize()
    assert torch.equal(landed_copy.cpu(), pool.store.read_expert(0, 3))
    _check_slots(pool, 0, [2], torch.tensor([0]))
    pool.release(0, [2, 3])


@pytest.mark.cuda
def test_a_non_default_current_stream(tmp_path):
    """acquire() orders the caller's current stream (not the default one) after the loads, and
    release() fences on it."""
    store = synthetic_store(2, 8, shape=(256, 128))
    packed = ExpertStore.from_packed(store.pack(tmp_path / "e.remoe", progress=False))
    for source in (packed, _pinned_store()):
        pool = SlotPool(source, "cuda", slots_per_layer=2)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for layer in (0, 1):
                for e in range(0, 8, 2):
                    with pool.pinned(layer, [e, e + 1]) as slots:
                        got = [pool.buffer[s].clone() for s in slots.tolist()]
                    stream.synchronize()
                    for blob, expert in zip(got, (e, e + 1), strict=True):
                        assert torch.equal(blob.cpu(), store.read_expert(layer, expert))


@pytest.mark.cuda
def test_prefetch_then_acquire_without_wait_then_wait(tmp_path):
    store = synthetic_store(2, 8, shape=(256, 128))
    packed = ExpertStore.from_packed(store.pack(tmp_path / "e.remoe", progress=False))
    pool = SlotPool(packed, "cuda", slots_per_layer=4, num_threads=2)
    assert pool.prefetch(1, [5, 6, 7]) == 3
    slots = pool.acquire(1, [6, 2, 5], wait=False)
    pool.wait(1, [6, 2, 5])
    _check_slots(pool, 1, [6, 2, 5], slots)
    pool.release(1, [6, 2, 5])
    stats = pool.stats()
    assert stats["prefetch_hits"] == 2 and stats["misses"] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("threads", [1, 3])
def test_more_misses_than_reader_threads(tmp_path, threads):
    """Each reader alternates its two staging buffers: 12 misses on 1 or 3 readers all land,
    byte for byte, with every staging buffer reused several times."""
    store = synthetic_store(1, 24, shape=(512, 256))
    packed = ExpertStore.from_packed(store.pack(tmp_path / "e.remoe", progress=False))
    pool = SlotPool(packed, "cuda", slots_per_layer=12, num_threads=threads)
    for wave in (list(range(12)), list(range(12, 24))):
        with pool.pinned(0, wave) as slots:
            _check_slots(pool, 0, wave, slots)
    assert pool.stats()["misses"] == 24


@pytest.mark.cuda
@pytest.mark.slow
def test_route_topk_at_scale_in_bf16():
    """E=512, K=22, T=32k in bf16 (issue 19, item 9): the CUDA kernel agrees with the CPU one
    (ids exactly wherever no two scores are within the exp approximation's last bits)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32768, 512, generator=gen).to(torch.bfloat16)
    w_cpu, i_cpu = ops.route_topk(logits, 22)
    w_gpu, i_gpu = ops.route_topk(logits.cuda(), 22)
    same = (i_gpu.cpu() == i_cpu).all(-1)
    assert same.float().mean() > 0.999
    torch.testing.assert_close(w_gpu.cpu()[same], w_cpu[same], rtol=1e-5, atol=1e-6)


def _greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.cuda
def test_patch_decodes_on_cuda_like_the_model_on_cpu():
    reference = hf_tiny.build("qwen3_moe")
    ids = torch.randint(0, reference.config.vocab_size, (2, 10),
                        generator=torch.Generator().manual_seed(1))
    want = _greedy(reference, ids)
    model = hf_tiny.build("qwen3_moe").cuda()
    handle = remoe_engine.patch(model, slots_per_layer=routing_spec(model).top_k)
    assert handle.pool.buffer.is_cuda
    assert torch.equal(_greedy(model, ids.cuda()).cpu(), want)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).logits.cpu(), reference(ids).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.cuda
def test_load_from_disk_decodes_on_cuda_like_the_model_on_cpu(tmp_path):
    reference = hf_tiny.build("mixtral")
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, reference.config.vocab_size, (2, 10),
                        generator=torch.Generator().manual_seed(2))
    want = _greedy(reference, ids)
    loaded = remoe_engine.load(tmp_path, store="disk", device="cuda", dtype=torch.float32,
                               slots_per_layer=routing_spec(reference).top_k)
    assert loaded.remoe.pool.buffer.is_cuda
    assert not any(True for b in find_moe_blocks(loaded) for _ in b.experts.parameters())
    assert torch.equal(_greedy(loaded, ids.cuda()).cpu(), want)
    assert loaded.remoe.stats()["bytes_read"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch,bias_source", [(False, "resident"), (True, "previous")])
def test_one_decode_step_syncs_once_per_moe_layer_on_cuda(prefetch, bias_source):
    """Issue 19, item 4, on a GPU: torch's sync debug mode reports each synchronizing call; the
    engine's are the ids transfer of each MoE layer (and the guess of each prefetched layer),
    and no non_blocking copy reads pageable memory (that would sync the stream too)."""
    model = hf_tiny.build("qwen3_moe").cuda()
    handle = remoe_engine.patch(model, slots_per_layer=4, prefetch=prefetch, reuse_bias=0.05,
                                bias_source=bias_source)
    layers = len(handle.blocks)
    token, kwargs = _prefill_then_step(model)
    torch.cuda.synchronize()
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        seen = stack.enter_context(_HostTransfers())
        torch.cuda.set_sync_debug_mode("warn")
        stack.callback(torch.cuda.set_sync_debug_mode, "default")
        with torch.no_grad():
            model(token, **kwargs, use_cache=True)
    engine_syncs = [w for w in caught if "synchroniz" in str(w.message)
                    and "remoe_engine" in w.filename]
    want = layers + (layers - 1 if prefetch else 0)
    assert len(engine_syncs) == want, [(w.filename, w.lineno) for w in engine_syncs]
    assert seen.pageable_async == []
