"""Scale: a Qwen3-30B-A3B-shaped checkpoint whose experts exceed this machine's RAM, decoded by
`remoe_engine.load()` under a memory budget, from its safetensors shards and from a packed file.

The checkpoint (written once, then reused): Qwen3-30B-A3B's shape (`Qwen3MoeConfig`: hidden 2048,
128 experts, top-8, expert FFN 768, 32 query / 4 KV heads of 128, norm_topk_prob, bf16, every
layer MoE) with random weights, N(0, 0.02) and norms at 1, as transformers initializes them. The
vocabulary is 32000 (the real model has 151936) to keep the non-expert weights small. The layer
count is chosen so the experts hold 1.1x MemTotal (each layer's 128 experts are 1.125 GiB; the
real model has 48 layers) unless --layers says otherwise. The shards (~4 GiB each, with
`model.safetensors.index.json`) store one tensor per expert projection, as a real Qwen3-MoE
checkpoint does (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`); they are written
tensor by tensor from a seeded generator, never the whole model in memory. The packed copy
(`ExpertStore.pack`) is written next to them. `SCALE_SPEC.json` is written last and marks the
directory complete; a directory with a matching one is reused.

Each configuration, budget x source (safetensors, packed) x variant (narrow, spread), runs in a
fresh subprocess, so its peak RSS (VmHWM) is that run's own, and reports:
  load_s         `remoe_engine.load()` wall time, page cache dropped before.
  ttft_ms        prefill of a PROMPT-token random prompt plus the first greedy token (cold pool).
  tpot_ms        p50 and mean over TOKENS greedy decode steps (batch 1, KV cache).
  hit rate, bytes read per token, distinct experts per layer: pool counters and router outputs
                 over the decode steps only.
  B              storage read bandwidth measured in the same run, page cache dropped before:
                 random whole experts of the same source (a packed blob; the three tensors of a
                 safetensors expert, adjacent ones merged into one read), as many in flight as
                 the pool has reader threads, in the pool's mode: O_DIRECT (4 KiB-aligned ranges)
                 or buffered, as `pool.direct_io` reports it (else as observed: after the decode,
                 `mincore` tells whether the experts read went through the page cache).
  t_compute_ms   one decode step with every expert resident: one more step replayed 8 times on
                 copies of the same KV cache (same routing, zero misses, checked); the fastest.
  floors         io floor M / B (M = bytes read per decoded token), floor max(t_compute, M / B)
                 and the no-overlap estimate t_compute + M / B; TPOT over each.
  peak_rss       VmHWM of the run, next to the RSS right after the imports; the peak is also
                 split into load and serving (VmHWM is restarted after the load through
                 /proc/self/clear_refs). The target is peak RSS <= 1.1 x (non-expert weights +
                 budget), given with and without the imports' baseline.
The targets (TPOT within 1.2x of the floor when reads dominate; the RSS bound) are reported as
ratios, whatever they are.

Variants: random weights route narrowly ("narrow", the checkpoint as written): attention
outputs dominate the residual stream and average over the context, so consecutive tokens pick
nearly the same experts and greedy decoding soon repeats one token (checked in memory at 24
layers: 13 distinct experts per layer over 16 decode steps, 94% of a step's experts reused by the
next; with --quick's 2 layers it is much less narrow). "spread" multiplies, after loading, the
token embeddings by 50 and every attention output projection (o_proj) by 0.1, touching no expert
and no router, so each token's own embedding dominates its hidden state and consecutive tokens
route almost independently (same check: 83 distinct experts per layer, 6% reused, as random
choices would give): misses dominate. The rows report distinct experts per layer over the decode
and the hit rate to show it. One variant must decode the same tokens under every budget and
source (residency never changes outputs); `tokens_match_other_runs` says whether it did.

Run:
  python bench/bench_scale.py [--dir D] [--layers N] [--budgets 4GiB,8GiB] [--tokens 16]
      [--prompt 8] [--threads 4] [--o-direct default|on|off|auto] [--sources safetensors,packed]
      [--variants narrow,spread] [--bw-experts N] [--seed 0] [--out FILE] [--rebuild] [--quick]
  --dir        checkpoint directory (env REMOE_SCALE_DIR, default /work/scale-ckpt; with --quick
               /tmp/remoe-scale-quick). Keep it outside the repository.
  --layers     layer count (default: experts = 1.1x MemTotal, or the layers of the checkpoint
               already in --dir if its experts exceed MemTotal); refuses when the disk cannot
               hold the checkpoint, its packed copy and a margin.
  --rebuild    replace a complete checkpoint of another spec in --dir (else: refuse).
  --budgets    expert pool budgets, comma-separated (default 4GiB,8GiB; --quick 256MiB,512MiB).
  --tokens, --prompt   decode steps (16) and prompt tokens (8, random ids) per run.
  --sources, --variants   which rows to run (default: all: safetensors,packed x narrow,spread).
  --seed       seeds the weights, the prompt and B's choice of experts (default 0).
  --o-direct   passed to load() only when not "default" (load's own default otherwise).
  --threads    the pool's reader threads (load's num_threads), also used for B.
  --bw-experts experts read to measure B, each way (default 256; --quick 32).
  --out        results file (default bench/results/scale-cpu-<date>.json; with --quick,
               <dir>/scale-cpu-quick-<date>.json, so a test run never lands in the README).
  --quick      2 layers, small budgets: the whole harness end to end in a few minutes
               (~2.4 GB of experts, ~5 GB of disk); its experts do not exceed RAM.
  pytest bench/bench_scale.py      the quick mode as a pytest-benchmark suite (one benchmark per
               configuration, the figures in extra_info); REMOE_BENCH_SCALE_FULL=1 for the full
               size (then REMOE_SCALE_DIR as --dir), REMOE_BENCH_SCALE_BUDGETS /
               REMOE_BENCH_SCALE_TOKENS as the options above, REMOE_BENCH_SCALE_OUT: write the
               results file there. A first test checks, where memory allows (--quick), that
               plain transformers loads the shards and computes the same logits as load().

Cost of the full size on a 2-core VM with 24 GiB of RAM and ~1 GB/s storage (ext4): 24 layers,
29.0 GB (27 GiB) of experts and 1.2 GB of other weights; the shards (30.2 GB) and the packed copy
(29.0 GB) need 61.3 GB of free disk with the 2 GB margin. Writing both takes ~5-10 minutes, once;
the 8 runs then take ~1 minute each (a spread run reads ~25-30 GB), ~10-20 minutes in all.
Timings are only meaningful on an otherwise idle machine: every run drops the whole page cache,
and any other process competes for the cores.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

# Qwen3-30B-A3B, but a 32000-token vocabulary (non-expert weights stay small).
SHAPE = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000,
             intermediate_size=6144, norm_topk_prob=True, rms_norm_eps=1e-6,
             max_position_embeddings=4096, tie_word_embeddings=False)
ROPE_THETA = 1e6
INIT_STD = 0.02  # transformers' initializer_range
SPREAD = dict(embed_scale=50.0, o_proj_scale=0.1)
GENERATOR_VERSION = 1  # bump when the generated bytes change: cached checkpoints are redone
SPEC_FILE = "SCALE_SPEC.json"
PACK_FILE = "experts.remoe"
SHARD_BYTES = 4 << 30
DISK_MARGIN = 2 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = "/work/scale-ckpt"
QUICK_DIR = "/tmp/remoe-scale-quick"
ALIGN = 4096


# ------------------------------------------------------------------------------ the checkpoint


def expert_tensor_bytes() -> int:
    """One projection of one expert (gate, up or down): H x I bf16."""
    return SHAPE["hidden_size"] * SHAPE["moe_intermediate_size"] * 2


def layer_expert_bytes() -> int:
    return SHAPE["num_experts"] * 3 * expert_tensor_bytes()


def _proc_bytes(path: str, key: str) -> int:
    """A "Key:  N kB" line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{key} in {path}")


def meminfo(key: str) -> int:
    return _proc_bytes("/proc/meminfo", key)


def make_config(layers: int):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(num_hidden_layers=layers, rope_parameters={
        "rope_type": "default", "rope_theta": ROPE_THETA}, **SHAPE)
    config.dtype = torch.bfloat16
    return config


def tensor_plan(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every checkpoint tensor (key, shape) in file order: layer by layer, as transformers' own
    non-expert keys (from a meta-device model) plus one key per expert projection."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config(layers))
    plain = [(k, tuple(v.shape)) for k, v in model.state_dict().items()
             if ".mlp.experts." not in k]
    H, I, E = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"]
    by_layer: dict[int | None, list] = {}
    for key, shape in plain:
        parts = key.split(".")
        layer = int(parts[2]) if parts[:2] == ["model", "layers"] else None
        by_layer.setdefault(layer, []).append((key, shape))
    head = [t for t in by_layer.get(None, []) if "embed_tokens" in t[0]]
    tail = [t for t in by_layer.get(None, []) if "embed_tokens" not in t[0]]
    plan = list(head)
    for layer in range(layers):
        plan += by_layer.get(layer, [])
        for e in range(E):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            plan += [(prefix + "gate_proj.weight", (I, H)), (prefix + "up_proj.weight", (I, H)),
                     (prefix + "down_proj.weight", (H, I))]
    return plan + tail


def generate_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The tensor `key`, bf16: norms 1, everything else N(0, INIT_STD) from a generator seeded by
    the key, so any tensor can be regenerated alone."""
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=gen)


def write_shard(path: str, tensors: list[tuple[str, tuple[int, ...]]], seed: int, bar) -> None:
    """A safetensors file written by hand: u64 header length, JSON header (padded to 8 bytes),
    then the raw bytes, keys in sorted order as the safetensors library writes them."""
    tensors = sorted(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in tensors:
        n = math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in tensors:
            t = generate_tensor(key, shape, seed)
            f.write(t.view(torch.uint8).numpy())
            bar.update(t.numel() * 2)
        f.flush()
        os.fsync(f.fileno())  # durable before the spec marks it complete; lets fadvise drop it


def checkpoint_spec(layers: int, seed: int) -> dict:
    plan = tensor_plan(layers)
    expert = sum(math.prod(s) * 2 for k, s in plan if ".mlp.experts." in k)
    total = sum(math.prod(s) * 2 for _, s in plan)
    return dict(generator_version=GENERATOR_VERSION, family="qwen3_moe", layers=layers,
                seed=seed, dtype="bfloat16", init_std=INIT_STD, rope_theta=ROPE_THETA, **SHAPE,
                expert_bytes=expert, non_expert_bytes=total - expert, shard_bytes=SHARD_BYTES,
                vocab_note="vocab 32000 instead of Qwen3-30B-A3B's 151936, to keep the "
                           "non-expert weights small")


def _read_marker(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, SPEC_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _clean(directory: str) -> None:
    """Remove what this script writes (and nothing else) from an incomplete directory."""
    for name in os.listdir(directory):
        ours = (name.startswith("model") and name.endswith((".safetensors", ".json"))
                or name in ("config.json", PACK_FILE, SPEC_FILE)
                or name.startswith(f".{PACK_FILE}"))
        if ours:
            os.remove(os.path.join(directory, name))


def prepare(directory: str, layers: int, seed: int, *, rebuild: bool = False, log=print) -> dict:
    """The checkpoint and its packed copy in `directory`, written unless already complete.

    A complete checkpoint of another spec is replaced only with `rebuild` (it took minutes).

    Returns:
        the spec (as in SCALE_SPEC.json) plus `path` and `packed`.
    """
    from tqdm import tqdm

    from remoe_engine.store import PACK_VERSION, ExpertStore

    spec = checkpoint_spec(layers, seed)
    marker = _read_marker(directory)
    packed = os.path.join(directory, PACK_FILE)
    have_ckpt = marker is not None and marker.get("spec") == spec
    # A pack of an older format version (the engine moved on) is written again.
    have_pack = have_ckpt and marker.get("pack_version") == PACK_VERSION and os.path.exists(packed)
    if marker is not None and not have_ckpt and not rebuild:
        changed = sorted(k for k in {*spec, *marker.get("spec", {})}
                         if spec.get(k) != marker.get("spec", {}).get(k))
        raise SystemExit(f"bench_scale: {directory} holds a complete checkpoint of another spec "
                         f"(differs in {', '.join(changed)}); pass --rebuild to replace it or "
                         "--dir for another directory")
    need = (0 if have_ckpt else spec["expert_bytes"] + spec["non_expert_bytes"]) + \
        (0 if have_pack else spec["expert_bytes"])
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if need and not have_ckpt and os.path.isdir(directory):
        free += sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
                    if n.endswith((".safetensors", ".remoe")))  # what _clean will remove
    if need + DISK_MARGIN > free:
        raise SystemExit(
            f"bench_scale: {directory} has {free / 1e9:.1f} GB free but needs "
            f"{(need + DISK_MARGIN) / 1e9:.1f} GB ({layers} layers: "
            f"{spec['expert_bytes'] / 1e9:.1f} GB of experts in the shards, as much again packed, "
            f"{spec['non_expert_bytes'] / 1e9:.2f} GB of other weights, "
            f"{DISK_MARGIN / 1e9:.1f} GB margin). Free space, pass --dir on a larger disk, or "
            "--layers fewer (the experts must stay larger than RAM for a scale run).")
    os.makedirs(directory, exist_ok=True)
    if have_ckpt:
        log(f"reusing the checkpoint in {directory} ({layers} layers)")
    else:
        log(f"writing a {layers}-layer checkpoint to {directory}: "
            f"{spec['expert_bytes'] / 1e9:.1f} GB of experts, "
            f"{spec['non_expert_bytes'] / 1e9:.2f} GB of other weights ({spec['vocab_note']})")
        _clean(directory)
        plan = tensor_plan(layers)
        shards, current, size = [], [], 0
        for key, shape in plan:
            n = math.prod(shape) * 2
            if current and size + n > SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append((key, shape))
            size += n
        shards.append(current)
        weight_map = {}
        with tqdm(total=sum(math.prod(s) * 2 for _, s in plan), unit="B", unit_scale=True,
                  desc="checkpoint") as bar:
            for i, tensors in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_shard(os.path.join(directory, name), tensors, seed, bar)
                weight_map.update({key: name for key, _ in tensors})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": spec["expert_bytes"] + spec["non_expert_bytes"]},
                       "weight_map": weight_map}, f, indent=1)
        make_config(layers).save_pretrained(directory)
        _write_marker(directory, dict(spec=spec, pack_version=None, shards=len(shards)))
    if not have_pack:
        log(f"packing the experts into {packed} (format version {PACK_VERSION})")
        ExpertStore.from_checkpoint(directory).pack(packed, progress=True)
        _write_marker(directory, {**_read_marker(directory), "pack_version": PACK_VERSION})
    return dict(spec, path=directory, packed=packed, shards=_read_marker(directory)["shards"])


def _write_marker(directory: str, content: dict) -> None:
    tmp = os.path.join(directory, f".{SPEC_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, SPEC_FILE))


def choose_layers(directory: str, ram_factor: float = 1.1) -> int:
    """Layers whose experts hold `ram_factor` x MemTotal, or those of the complete checkpoint
    already in `directory` if its experts exceed MemTotal (RAM sizes drift a little)."""
    marker = _read_marker(directory)
    if marker is not None:
        layers = marker["spec"]["layers"]
        if layers * layer_expert_bytes() > meminfo("MemTotal"):
            return layers
    return math.ceil(ram_factor * meminfo("MemTotal") / layer_expert_bytes())


# -------------------------------------------------------------------- page cache and storage


def drop_page_cache(files: list[str]) -> str:
    """Empty the page cache: the whole of it as root (`/proc/sys/vm/drop_caches`), else the
    clean pages of `files` (posix_fadvise DONTNEED). Returns which one worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed"


def cached_bytes(ranges: dict[str, list[tuple[int, int]]]) -> int:
    """Bytes of the given file ranges that are in the page cache (mincore), in whole pages."""
    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    total = 0
    for path, spans in ranges.items():
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            # A shared read-only mapping touches nothing and is not charged against the
            # commit limit (a private one of a 29 GB file is refused on a 24 GiB machine).
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap({path})")
        try:
            vec = np.zeros((size + page - 1) // page, dtype=np.uint8)
            if libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore({path})")
            cum = np.concatenate([[0], np.cumsum(vec & 1, dtype=np.int64)])
            for offset, n in spans:
                total += int(cum[(offset + n + page - 1) // page] - cum[offset // page]) * page
        finally:
            libc.munmap(addr, size)
    return total


def expert_reads(store, layer: int, expert: int, direct: bool) -> list[tuple[str, int, int, int]]:
    """The reads one expert takes, as the pool issues them: its segments, adjacent ones of a file
    merged into one read, widened to 4 KiB-aligned ranges for O_DIRECT.

    Returns:
        (file, offset, length, payload bytes) per read.
    """
    reads: list[list] = []
    for seg in sorted(store.segments(layer, expert), key=lambda s: (s.file, s.offset)):
        if reads and reads[-1][0] == seg.file and reads[-1][1] + reads[-1][2] == seg.offset:
            reads[-1][2] += seg.nbytes
        else:
            reads.append([seg.file, seg.offset, seg.nbytes])
    out = []
    for file, offset, n in reads:
        begin, end = offset, offset + n
        if direct:
            begin, end = begin // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        out.append((file, begin, end - begin, n))
    return out


def random_read_bandwidth(store, direct: bool, threads: int, count: int, seed: int) -> dict:
    """Storage read bandwidth B as the pool sees it: `count` random experts of `store`, each read
    whole (`expert_reads`), `threads` experts in flight at once, O_DIRECT or buffered.

    Returns:
        gbps (payload bytes / wall time), the bytes, seconds, experts, threads and mode used.
    """
    keys = [(layer, e) for layer in store.layers for e in range(store.num_experts)]
    picks = random.Random(seed).sample(keys, min(count, len(keys)))
    plans = [expert_reads(store, layer, e, direct) for layer, e in picks]
    fds: dict[str, int] = {}
    try:
        for path in store.files:
            fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:  # e.g. tmpfs refuses O_DIRECT; the pool ("auto") reads it buffered too
        for fd in fds.values():
            os.close(fd)
        if not direct:
            raise
        return random_read_bandwidth(store, False, threads, count, seed)
    local = threading.local()
    span = max(length for plan in plans for _, _, length, _ in plan)

    def read(plan) -> int:
        if not hasattr(local, "view"):
            local.view = memoryview(mmap.mmap(-1, span))  # page-aligned, as O_DIRECT needs
        for file, offset, length, payload in plan:
            got = os.preadv(fds[file], [local.view[:length]], offset)
            if got < payload:  # an aligned superset may run past the end of the file
                raise OSError(f"short read in {file} at {offset}: {got} of {payload} bytes")
        return sum(payload for *_, payload in plan)

    try:
        with ThreadPoolExecutor(threads) as ex:
            start = time.perf_counter()
            nbytes = sum(ex.map(read, plans))
            seconds = time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)
    return dict(gbps=nbytes / seconds / 1e9, bytes=nbytes, seconds=seconds, experts=len(picks),
                threads=threads, mode="direct" if direct else "buffered",
                reads_per_expert=len(plans[0]))


def pool_read_bandwidth(store, budget: str, threads: int, count: int, seed: int,
                        o_direct) -> dict:
    """B as the engine's own reader achieves it: a fresh SlotPool of the run's budget (the same
    slot memory a decode reads into) takes `count` random experts, the layers in order and 8
    distinct experts per acquire as a decode step asks for them, every one a miss.

    On this project's VMs, reads into a fresh multi-GiB slot buffer ran 1.4-2x faster than
    reads into one reused buffer per thread (`random_read_bandwidth`), so a floor from the
    latter alone was not a floor: TPOT came out below it. The floor takes the larger of the two.

    Returns:
        gbps (bytes read / wall time), bytes, seconds, experts, threads.
    """
    from remoe_engine.pool import SlotPool

    kwargs = {} if o_direct is None else {"o_direct": o_direct}
    pool = SlotPool(store, memory_budget=budget, num_threads=threads, **kwargs)
    rng = random.Random(seed + 1)
    per_acquire = min(8, store.num_experts, pool.scope_slots)
    start, done = time.perf_counter(), 0
    while done < count:
        for layer in store.layers:
            ids = rng.sample(range(store.num_experts), per_acquire)
            pool.acquire(layer, ids)
            pool.release(layer, ids)
            done += per_acquire
            if done >= count:
                break
    seconds = time.perf_counter() - start
    stats = pool.stats()
    del pool
    return dict(gbps=stats["bytes_read"] / seconds / 1e9, bytes=stats["bytes_read"],
                seconds=seconds, experts=stats["misses"], threads=threads)


def _status(key: str) -> int:
    return _proc_bytes("/proc/self/status", key)


def _rss_parts() -> dict:
    """RSS split into anonymous memory and mapped file pages (bytes)."""
    return {k: _status(k) for k in ("VmRSS", "RssAnon", "RssFile")}


# ------------------------------------------------------------------------------ one run (child)


def spread_routing(model) -> None:
    """Make consecutive tokens route differently: each token's own embedding dominates its
    hidden state (embeddings x50), attention's context average shrinks (o_proj x0.1). Experts
    and routers are untouched."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(SPREAD["embed_scale"])
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(SPREAD["o_proj_scale"])


def _reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process, wall clock): their deltas over
    a measurement say how much CPU other processes took meanwhile."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy / hz, (int(own[11]) + int(own[12])) / hz, time.perf_counter()


def _others_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's cores other processes kept busy since `start` (0: idle)."""
    busy, own, wall = (b - a for a, b in zip(start, _cpu_seconds(), strict=True))
    return max(0.0, busy - own) / (wall * os.cpu_count())


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _read_mode(pool, observed: bool | None, requested) -> tuple[bool, str]:
    """Whether the pool reads with O_DIRECT: what it reports (`direct_io`, per file), else what
    the page cache showed, else what was asked for."""
    reported = getattr(pool, "direct_io", None)
    if isinstance(reported, dict) and reported:
        modes = set(reported.values())
        return all(modes), "pool.direct_io" + ("" if len(modes) == 1 else " (mixed; some files "
                                                                          "buffered)")
    if observed is not None:
        return observed, "page cache after the decode (mincore)"
    return requested is True, "requested (too few bytes read to observe)"


def run_one(cfg: dict) -> dict:
    """Load, prefill, decode and measure one configuration (meant for a fresh process)."""
    import remoe_engine
    from remoe_engine.hf_compat import cache_kwargs
    from remoe_engine.store import ExpertStore
    from remoe_engine.trace import RouterTap

    baseline_rss = _status("VmRSS")
    rss_parts = dict(after_imports=_rss_parts())
    load_before = _loadavg()
    source = (ExpertStore.from_packed(cfg["packed"]) if cfg["source"] == "packed"
              else ExpertStore.from_checkpoint(cfg["path"]))
    files = sorted({*source.files, *(os.path.join(cfg["path"], n) for n in os.listdir(cfg["path"])
                                     if n.endswith(".safetensors"))})
    dropped = drop_page_cache(files)
    kwargs = dict(memory_budget=cfg["budget"], device="cpu", num_threads=cfg["threads"])
    if cfg["source"] == "packed":
        kwargs["packed"] = cfg["packed"]
    if cfg["o_direct"] != "default":
        kwargs["o_direct"] = {"on": True, "off": False, "auto": "auto"}[cfg["o_direct"]]
    start = time.perf_counter()
    model = remoe_engine.load(cfg["path"], **kwargs)
    load_s = time.perf_counter() - start
    rss_after_load, peak_load = _status("VmRSS"), _status("VmHWM")
    rss_parts["after_load"] = _rss_parts()
    peak_reset = _reset_peak_rss()  # from here VmHWM is the serving peak
    non_expert = sum(t.numel() * t.element_size()
                     for t in [*model.parameters(), *model.buffers()])
    if cfg["variant"] == "spread":
        spread_routing(model)
    handle, pool = model.remoe, model.remoe.pool
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, cfg["prompt"]),
                           generator=torch.Generator().manual_seed(cfg["seed"]))

    cpu_start = _cpu_seconds()
    with torch.no_grad(), RouterTap(model) as tap:
        handle.reset_stats()
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - start
        before = handle.stats()
        tokens, steps = [int(token)], []
        for _ in range(cfg["tokens"]):
            start = time.perf_counter()
            out = model(token, use_cache=True, **cache_kwargs(model, out))
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
            tokens.append(int(token))
        after = handle.stats()
        finite = bool(torch.isfinite(out.logits).all())
    distinct = [len(set(torch.cat(calls[1:]).flatten().tolist())) for calls in tap.ids]
    # The read mode as observed: experts read through the page cache are still in it (it was
    # dropped before the load); O_DIRECT reads leave nothing there.
    ranges: dict[str, list] = {}
    for layer in source.layers:
        for e in range(source.num_experts):
            for seg in source.segments(layer, e):
                ranges.setdefault(seg.file, []).append((seg.offset, seg.nbytes))
    in_cache = cached_bytes(ranges)
    read_all = after["bytes_read"]
    observed = in_cache < 0.2 * min(read_all, 8 << 30) if read_all >= 64 << 20 else None

    # Compute time at a 100% hit rate: one more decode step, replayed on fresh copies of the
    # same KV cache. The first replay loads its experts; the next ones see the same input, so
    # the same routing, and nothing misses (counted, to be sure).
    name, cache = next(iter(cache_kwargs(model, out).items()))
    replays, replay_misses = [], 0
    with torch.no_grad():
        for rep in range(cfg["compute_reps"] + 1):
            kw = {name: copy.deepcopy(cache)}
            misses = handle.stats()["misses"]
            start = time.perf_counter()
            model(token, use_cache=True, **kw).logits[:, -1:].argmax(-1)
            if rep:
                replays.append(time.perf_counter() - start)
                replay_misses += handle.stats()["misses"] - misses
    others = _others_share(cpu_start)
    peak_serve = _status("VmHWM")  # before the bandwidth measurement's buffers
    rss_parts["after_decode"] = _rss_parts()

    direct, basis = _read_mode(pool, observed, kwargs.get("o_direct"))
    drop_page_cache(files)
    bw = random_read_bandwidth(source, direct, cfg["threads"], cfg["bw_experts"], cfg["seed"])
    sizes = dict(budget_bytes=pool.num_slots * pool.slot_bytes, slots=pool.num_slots,
                 slot_bytes=pool.slot_bytes)
    # The model and its pool go first: the reader's own B needs a fresh pool of the same size.
    del model, handle, pool, out, cache
    gc.collect()
    drop_page_cache(files)
    bw_pool = pool_read_bandwidth(source, cfg["budget"], cfg["threads"], cfg["bw_experts"],
                                  cfg["seed"], kwargs.get("o_direct"))

    decoded = len(steps)
    delta = {k: after[k] - before[k] for k in ("hits", "misses", "bytes_read", "stall_s")}
    lookups = delta["hits"] + delta["misses"]
    return dict(
        source=cfg["source"], variant=cfg["variant"], budget=cfg["budget"],
        **sizes, o_direct_requested=cfg["o_direct"],
        read_mode="direct" if direct else "buffered", read_mode_basis=basis,
        read_mode_observed=None if observed is None else ("direct" if observed else "buffered"),
        expert_bytes_in_page_cache=in_cache, page_cache_drop=dropped,
        load_s=load_s, ttft_ms=ttft * 1e3,
        tpot_ms_p50=statistics.median(steps) * 1e3, tpot_ms_mean=statistics.fmean(steps) * 1e3,
        tpot_ms_max=max(steps) * 1e3, tokens_per_s=decoded / sum(steps),
        hit_rate=delta["hits"] / lookups if lookups else 0.0,
        misses_per_token=delta["misses"] / decoded,
        bytes_read_per_token=delta["bytes_read"] / decoded,
        stall_ms_per_token=delta["stall_s"] / decoded * 1e3,
        prefill_bytes_read=before["bytes_read"], waves=after["waves"],
        distinct_experts_per_layer=dict(min=min(distinct), mean=statistics.fmean(distinct),
                                        max=max(distinct)),
        tokens=tokens, distinct_tokens=len(set(tokens)), logits_finite=finite,
        # The fastest replay: a floor, and on a shared machine noise only adds time.
        t_compute_ms=min(replays) * 1e3, t_compute_ms_p50=statistics.median(replays) * 1e3,
        t_compute_replay_misses=replay_misses,
        read=bw, read_pool=bw_pool, read_gbps=max(bw["gbps"], bw_pool["gbps"]),
        read_gbps_raw=bw["gbps"], read_gbps_pool=bw_pool["gbps"],
        steps_ms=[round(x * 1e3, 2) for x in steps],
        t_compute_reps_ms=[round(x * 1e3, 2) for x in replays],
        rss_baseline_bytes=baseline_rss, rss_after_load_bytes=rss_after_load,
        peak_rss_load_bytes=peak_load,
        peak_rss_serve_bytes=peak_serve if peak_reset else None,
        peak_rss_bytes=max(peak_load, peak_serve), non_expert_bytes=non_expert,
        rss_parts=rss_parts,
        loadavg_1min=dict(before=load_before, after=_loadavg()),
        # CPU other processes used during prefill, decode and replays, as a share of all cores:
        # above ~0.1 the timings of this row are disturbed.
        other_processes_cpu_share=others)


# --------------------------------------------------------------------------- runs (parent)


def derive(row: dict) -> dict:
    """Floors and target ratios of one row."""
    io_ms = row["bytes_read_per_token"] / (row["read_gbps"] * 1e9) * 1e3 if row["read_gbps"] else 0
    t_c = row["t_compute_ms"]
    row.update(io_floor_ms=io_ms, floor_ms=max(t_c, io_ms), no_overlap_ms=t_c + io_ms,
               reads_dominate=io_ms > t_c)
    row["tpot_over_floor"] = row["tpot_ms_p50"] / row["floor_ms"]
    row["tpot_over_io_floor"] = row["tpot_ms_p50"] / io_ms if io_ms else None
    row["tpot_over_no_overlap"] = row["tpot_ms_p50"] / row["no_overlap_ms"]
    # The read rate the engine sustained over the decode (all bytes / all step time). Above B,
    # the floor is not one: this VM's disk varies by 2x between back-to-back measurements.
    row["decode_read_gbps"] = row["bytes_read_per_token"] / (row["tpot_ms_mean"] * 1e6)
    row["floor_holds"] = row["tpot_over_floor"] >= 1.0
    bound = row["non_expert_bytes"] + row["budget_bytes"]
    row["rss_bound_bytes"] = bound  # target: peak RSS <= 1.1 x this
    row["peak_rss_over_bound"] = row["peak_rss_bytes"] / bound
    row["peak_rss_less_baseline_over_bound"] = (
        (row["peak_rss_bytes"] - row["rss_baseline_bytes"]) / bound)
    serve = row["peak_rss_serve_bytes"]
    row["peak_rss_serve_over_bound"] = serve / bound if serve else None
    row["peak_rss_serve_less_baseline_over_bound"] = (
        (serve - row["rss_baseline_bytes"]) / bound if serve else None)
    row["targets"] = dict(
        rss_within_1_1x=row["peak_rss_over_bound"] <= 1.1,
        rss_less_baseline_within_1_1x=row["peak_rss_less_baseline_over_bound"] <= 1.1,
        # None where reads do not dominate, or where TPOT fell below the floor (B too low:
        # the target cannot be judged from this run).
        tpot_within_1_2x_floor=(row["tpot_over_floor"] <= 1.2)
        if row["reads_dominate"] and row["floor_holds"] else None)
    return row


def run_config(ckpt: dict, *, source: str, variant: str, budget: str, settings: dict) -> dict:
    """One configuration in a fresh Python process; returns its row (with floors)."""
    cfg = dict(path=ckpt["path"], packed=ckpt["packed"], source=source, variant=variant,
               budget=budget, **settings)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cfg["out"] = out.name
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                       check=True)
        row = json.load(out)
    row["name"] = f"{source}-{budget}-{variant}"
    return derive(row)


def check_consistency(rows: list[dict]) -> None:
    """Residency never changes outputs: one variant decodes the same tokens in every row."""
    for row in rows:
        same = [r for r in rows if r["variant"] == row["variant"]]
        row["tokens_match_other_runs"] = all(r["tokens"] == row["tokens"] for r in same)


def filesystem_of(path: str) -> str:
    path, best, fstype = os.path.realpath(path), "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype


def machine_info(directory: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return dict(node=platform.node(), cpu=cpu, cores=os.cpu_count(),
                mem_total_bytes=meminfo("MemTotal"), mem_available_bytes=meminfo("MemAvailable"),
                disk_free_bytes=shutil.disk_usage(directory).free, checkpoint_dir=directory,
                filesystem=filesystem_of(directory), python=platform.python_version())


def results(ckpt: dict, settings: dict, rows: list[dict], quick: bool) -> dict:
    import transformers

    import remoe_engine

    spec = {k: v for k, v in ckpt.items() if k not in ("path", "packed")}
    spec.update(quick=quick, budgets=settings["budgets"], tokens=settings["tokens"],
                prompt=settings["prompt"], threads=settings["threads"],
                o_direct=settings["o_direct"], bw_experts=settings["bw_experts"],
                experts_over_mem_total=ckpt["expert_bytes"] / meminfo("MemTotal"),
                spread=dict(SPREAD, note="applied after loading: embeddings and attention "
                            "o_proj scaled; experts and routers untouched"),
                packed_bytes=os.path.getsize(ckpt["packed"]))
    return dict(date=datetime.date.today().isoformat(), machine=machine_info(ckpt["path"]),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              remoe_engine=remoe_engine.__version__),
                spec=spec, rows=rows)


def format_rows(rows: list[dict]) -> str:
    head = (f"{'run':<27}{'mode':>9}{'load s':>7}{'TTFT ms':>8}{'TPOT p50':>9}{'mean':>7}"
            f"{'t_comp':>7}{'M/B':>7}{'x floor':>8}{'B GB/s':>7}{'hit':>6}{'MB/tok':>7}"
            f"{'experts':>8}{'RSS GiB':>8}{'x bound':>8}{'serve':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        serve = r["peak_rss_serve_over_bound"]
        lines.append(
            f"{r['name']:<27}{r['read_mode']:>9}{r['load_s']:>7.1f}{r['ttft_ms']:>8.0f}"
            f"{r['tpot_ms_p50']:>9.1f}{r['tpot_ms_mean']:>7.1f}{r['t_compute_ms']:>7.1f}"
            f"{r['io_floor_ms']:>7.1f}{r['tpot_over_floor']:>8.2f}{r['read_gbps']:>7.2f}"
            f"{r['hit_rate']:>6.2f}{r['bytes_read_per_token'] / 1e6:>7.1f}"
            f"{r['distinct_experts_per_layer']['mean']:>8.1f}{r['peak_rss_bytes'] / 2**30:>8.2f}"
            f"{r['peak_rss_over_bound']:>8.2f}{serve if serve is not None else float('nan'):>6.2f}")
    lines.append("(ms; M/B: io floor; x floor: TPOT p50 / max(t_comp, M/B); experts: distinct per "
                 "layer over the decode; x bound: peak RSS / (non-expert + budget), target <= 1.1;"
                 " serve: the same for the peak after load)")
    return "\n".join(lines)


def settings_from(args) -> dict:
    return dict(budgets=args.budgets, tokens=args.tokens, prompt=args.prompt,
                threads=args.threads, o_direct=args.o_direct, bw_experts=args.bw_experts,
                seed=args.seed, compute_reps=8)


def configs(settings: dict, sources: list[str], variants: list[str]) -> list[tuple[str, str, str]]:
    return [(budget, source, variant) for budget in settings["budgets"] for source in sources
            for variant in variants]


def parse_args(argv=None, quick_env: bool = False):
    parser = argparse.ArgumentParser(
        description="Scale benchmark: a Qwen3-30B-A3B-shaped checkpoint whose experts exceed RAM, "
                    "decoded by remoe_engine.load() under memory budgets (see the module "
                    "docstring).")
    parser.add_argument("--quick", action="store_true", default=quick_env,
                        help="2 layers, small budgets: the harness end to end")
    parser.add_argument("--dir", default=None, help="checkpoint directory (env REMOE_SCALE_DIR)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layer count (default: experts = 1.1x MemTotal)")
    parser.add_argument("--budgets", default=None, help="comma-separated, e.g. 4GiB,8GiB")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per run")
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    parser.add_argument("--threads", type=int, default=4, help="pool reader threads (and B)")
    parser.add_argument("--o-direct", default="default", choices=["default", "on", "off", "auto"],
                        help="load()'s o_direct; 'default' passes nothing")
    parser.add_argument("--sources", default="safetensors,packed")
    parser.add_argument("--variants", default="narrow,spread")
    parser.add_argument("--bw-experts", type=int, default=None,
                        help="experts read to measure B, each way (default 256, --quick 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results file")
    parser.add_argument("--rebuild", action="store_true",
                        help="replace a complete checkpoint of another spec in --dir")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    if args.dir is None:
        args.dir = QUICK_DIR if args.quick else os.environ.get("REMOE_SCALE_DIR", DEFAULT_DIR)
    args.dir = os.path.abspath(args.dir)
    if args.layers is None:
        args.layers = 2 if args.quick else choose_layers(args.dir)
    args.budgets = (args.budgets or ("256MiB,512MiB" if args.quick else "4GiB,8GiB")).split(",")
    if args.bw_experts is None:
        args.bw_experts = 32 if args.quick else 256
    if args.out is None:
        date = datetime.date.today().isoformat()
        args.out = (os.path.join(args.dir, f"scale-cpu-quick-{date}.json") if args.quick else
                    os.path.join(ROOT, "bench", "results", f"scale-cpu-{date}.json"))
    return args


def check_budgets(ckpt: dict, budgets: list[str], log=print) -> None:
    from remoe_engine.pool import parse_bytes

    ram = meminfo("MemTotal")
    for budget in budgets:
        need = parse_bytes(budget) + ckpt["non_expert_bytes"]
        if need > 0.5 * ram:
            log(f"warning: budget {budget} + {ckpt['non_expert_bytes'] / 2**30:.1f} GiB of other "
                f"weights is over half of RAM ({ram / 2**30:.1f} GiB)")
    if ckpt["expert_bytes"] <= ram:
        log(f"note: the experts ({ckpt['expert_bytes'] / 2**30:.1f} GiB) fit in RAM "
            f"({ram / 2**30:.1f} GiB): not a scale run (fine for --quick)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        cfg = json.loads(args.worker)
        row = run_one(cfg)
        with open(cfg["out"], "w") as f:
            json.dump(row, f)
        return 0
    started = time.perf_counter()
    ckpt = prepare(args.dir, args.layers, args.seed, rebuild=args.rebuild)
    check_budgets(ckpt, args.budgets)
    settings = settings_from(args)
    rows = []
    for budget, source, variant in configs(settings, args.sources.split(","),
                                           args.variants.split(",")):
        print(f"run: {source}, {budget}, {variant}", flush=True)
        rows.append(run_config(ckpt, source=source, variant=variant, budget=budget,
                               settings=settings))
    check_consistency(rows)
    payload = results(ckpt, settings, rows, args.quick)
    payload["wall_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print(format_rows(rows))
    busy = [r["name"] for r in rows if r["other_processes_cpu_share"] > 0.1]
    if busy:
        print(f"warning: other processes used over 10% of the cores during {', '.join(busy)}: "
              "their timings are disturbed (other_processes_cpu_share in the results)")
    print(f"wrote {args.out} ({payload['wall_s']:.0f} s)")
    return 0


# ------------------------------------------------------------------------- pytest-benchmark

_FULL = os.environ.get("REMOE_BENCH_SCALE_FULL") == "1"
_ENV_ARGS = [*(["--budgets", os.environ["REMOE_BENCH_SCALE_BUDGETS"]]
               if "REMOE_BENCH_SCALE_BUDGETS" in os.environ else []),
             *(["--tokens", os.environ["REMOE_BENCH_SCALE_TOKENS"]]
               if "REMOE_BENCH_SCALE_TOKENS" in os.environ else [])]
_RESULTS: list[dict] = []

if "pytest" in sys.modules:
    import pytest

    _ARGS = parse_args(_ENV_ARGS, quick_env=not _FULL)
    _SETTINGS = settings_from(_ARGS)

    @pytest.fixture(scope="module")
    def scale_checkpoint():
        ckpt = prepare(_ARGS.dir, _ARGS.layers, _ARGS.seed)
        yield ckpt
        check_consistency(_RESULTS)
        out = os.environ.get("REMOE_BENCH_SCALE_OUT")
        if out and _RESULTS:
            with open(out, "w") as f:
                json.dump(results(ckpt, _SETTINGS, _RESULTS, _ARGS.quick), f, indent=1)

    def test_checkpoint_matches_transformers(scale_checkpoint):
        """Correctness once, before timing: the hand-written shards load in plain transformers
        (per-expert keys converted), and load() computes the same logits from them."""
        from transformers import AutoModelForCausalLM

        import remoe_engine

        if scale_checkpoint["expert_bytes"] > meminfo("MemAvailable") // 3:
            pytest.skip("the experts do not fit in memory next to a copy: full size")
        ids = torch.randint(0, SHAPE["vocab_size"], (1, 8),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = AutoModelForCausalLM.from_pretrained(scale_checkpoint["path"]).eval()
            expected = reference(ids).logits
            del reference
            model = remoe_engine.load(scale_checkpoint["path"], memory_budget=_SETTINGS[
                "budgets"][0], device="cpu")
            got = model(ids).logits
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    @pytest.mark.parametrize(("budget", "source", "variant"),
                             configs(_SETTINGS, ["safetensors", "packed"], ["narrow", "spread"]))
    def test_scale(benchmark, scale_checkpoint, budget, source, variant):
        rows = []
        benchmark.group = f"scale {budget}"
        benchmark.pedantic(lambda: rows.append(run_config(
            scale_checkpoint, source=source, variant=variant, budget=budget,
            settings=_SETTINGS)), rounds=1, iterations=1)
        row = rows[0]
        _RESULTS.append(row)
        assert row["logits_finite"]
        assert row["t_compute_replay_misses"] == 0  # the compute floor really had no misses
        earlier = [r for r in _RESULTS if r["variant"] == variant and r is not row]
        if earlier:  # residency never changes outputs
            assert row["tokens"] == earlier[0]["tokens"]
        benchmark.extra_info.update(
            provider=f"remoe_{source}", **{k: v for k, v in row.items()
                                           if isinstance(v, (int, float, str, bool))},
            distinct_experts_per_layer=row["distinct_experts_per_layer"]["mean"])


if __name__ == "__main__":
    sys.exit(main())
