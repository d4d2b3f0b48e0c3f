"""patch() and load(): the patched / loaded model gives the unpatched transformers model's logits
and greedy tokens, for every family, at a full cache and at slots_per_layer = top_k."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import hf_tiny
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import remoe_engine
from remoe_engine import reference as ref
from remoe_engine.families import find_moe_blocks, routing_spec
from remoe_engine.hf_compat import cache_kwargs

ATOL = 1e-5


def _inputs(model, batch: int, seq: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _generate(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                              pad_token_id=0)


def _decode_logits(model, ids, n=8):
    """Prefill, then n greedy decode steps with the KV cache; logits of every step [B, n, V]."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        steps = []
        for _ in range(n):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, **cache_kwargs(model, out), use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


def _top_k(model) -> int:
    return routing_spec(model).top_k


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", hf_tiny.ALL_VARIANTS, ids=hf_tiny.variant_id)
@pytest.mark.parametrize("cache", ["full", "top_k"])
def test_patch_matches_transformers(variant, cache):
    model_type, extra = variant
    model = hf_tiny.build(model_type, **extra)
    for batch in (1, 4):
        ids = _inputs(model, batch)
        want_logits, want_tokens = _logits(model, ids), _generate(model, ids)
        before = _state(model)
        slots = None if cache == "full" else _top_k(model)
        handle = remoe_engine.patch(model, slots_per_layer=slots)
        # The experts really left the model (meta placeholders keep the module's shape).
        assert all(p.is_meta for b in handle.blocks for p in b.experts.parameters())
        got_logits, got_tokens = _logits(model, ids), _generate(model, ids)
        stats = handle.stats()
        handle.unpatch()
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)
        assert torch.equal(got_tokens, want_tokens)
        assert stats["hits"] + stats["misses"] > 0
        if cache == "top_k":
            assert stats["misses"] > 0
        after = model.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{key} changed across patch/unpatch"


def test_router_logits_capture_still_works():
    model = hf_tiny.build("qwen3_moe")
    ids = _inputs(model, 2)
    with torch.no_grad():
        want = model(ids, output_router_logits=True)
    handle = remoe_engine.patch(model, slots_per_layer=4)
    with torch.no_grad():
        got = model(ids, output_router_logits=True)
    handle.unpatch()
    assert len(got.router_logits) == len(want.router_logits) > 0
    # Layer 0 sees the same hidden states, so its logits are bit-identical; later layers see
    # expert outputs summed in another order (fp32 rounding).
    torch.testing.assert_close(got.router_logits[0], want.router_logits[0], atol=0, rtol=0)
    for a, b in zip(got.router_logits, want.router_logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=0)


def test_waves_when_a_layer_needs_more_experts_than_the_pool_holds():
    model = hf_tiny.build("qwen3_moe", num_experts=16, num_experts_per_tok=4)
    ids = _inputs(model, 4, seq=32)
    want = _logits(model, ids)
    handle = remoe_engine.patch(model, slots_per_layer=4)  # 16 experts, 4 slots
    got = _logits(model, ids)
    stats = handle.stats()
    handle.unpatch()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    layers = len(handle.blocks)
    assert stats["waves"] >= 4 * layers  # every layer needed all 16 experts: >= 4 waves each


def test_global_memory_budget():
    model = hf_tiny.build("olmoe")
    ids = _inputs(model, 2)
    want = _logits(model, ids)
    block = find_moe_blocks(model)[0]
    expert_bytes = sum(p[0].numel() * p.element_size() for p in block.experts.parameters())
    handle = remoe_engine.patch(model, memory_budget=3 * expert_bytes + 17)  # 3 slots in all
    got = _logits(model, ids)
    assert handle.pool.num_slots == 3
    handle.unpatch()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_unsupported_model_is_a_clear_error():
    config = AutoConfig.for_model("llama", **{**hf_tiny.COMMON, "intermediate_size": 32})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match=r"'llama'.*LlamaConfig.*ExpertsInterface"):
        remoe_engine.patch(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="fifo"), "policy must be one of"),
    (dict(bias_source="future"), "bias_source must be one of"),
    (dict(reuse_bias=-1.0), "reuse_bias must be a finite number"),
    (dict(slots_per_layer=2, memory_budget="1MiB"), "not both"),
    (dict(slots_per_layer=0), "slots_per_layer must be >= 1"),
    (dict(memory_budget="lots"), "cannot parse a byte size from 'lots'"),
    (dict(memory_budget=10), "less than one"),
    (dict(prefetch="yes"), "prefetch must be True or False"),
])
def test_bad_arguments_are_clear_errors_and_leave_the_model_alone(kwargs, match):
    model = hf_tiny.build("qwen3_moe")
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        remoe_engine.patch(model, **kwargs)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------ reuse bias: routing only


def _reference_previous_bias_hooks(model, reuse_bias):
    """Forward hooks making the unpatched routers route like bias_source='previous', with the
    pure-PyTorch reference (token s of each sequence prefers token s-1's experts)."""
    spec = routing_spec(model)
    hooks = []
    shapes = {}
    last = {}  # block -> ids [B, K] of each sequence's last token (kept across decode steps)
    for block in find_moe_blocks(model):
        def pre(mod, args, key=block.name):
            shapes[key] = args[0].shape[:2]

        def post(mod, args, output, key=block.name):
            logits = output[0]
            B, S = shapes[key]
            per_seq = logits.view(B, S, -1)
            weights, ids = [], []
            previous = last.get(key) if S == 1 else None  # a prompt starts new sequences
            for s in range(S):
                prefer = None
                if previous is not None:
                    prefer = torch.zeros_like(per_seq[:, s], dtype=torch.bool)
                    prefer.scatter_(1, previous, True)
                w, i = ref.route_topk(per_seq[:, s], spec.top_k, prefer=prefer,
                                      reuse_bias=reuse_bias, **spec.op_kwargs(mod))
                weights.append(w)
                ids.append(i)
                previous = i
            last[key] = previous
            w = torch.stack(weights, 1).reshape(B * S, -1)
            i = torch.stack(ids, 1).reshape(B * S, -1)
            return logits, (w.to(logits.dtype) if spec.weights_in_logits_dtype else w), i

        hooks.append(block.block.register_forward_pre_hook(pre))
        hooks.append(block.router.register_forward_hook(post))
    return hooks


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_reuse_bias_changes_outputs_only_through_routing(model_type):
    model = hf_tiny.build(model_type)
    ids = _inputs(model, 2, seq=10)
    bias = 0.3 if model_type == "gpt_oss" else 0.05  # logit units for GPT-OSS
    hooks = _reference_previous_bias_hooks(model, bias)
    want, want_steps = _logits(model, ids), _decode_logits(model, ids)
    for hook in hooks:
        hook.remove()
    plain = _logits(model, ids)
    handle = remoe_engine.patch(model, slots_per_layer=4, reuse_bias=bias, bias_source="previous")
    got, got_steps = _logits(model, ids), _decode_logits(model, ids)
    stats = handle.stats()
    handle.unpatch()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Decode: the bias follows each sequence across steps exactly as the reference does.
    torch.testing.assert_close(got_steps, want_steps, atol=ATOL, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3)  # the bias did change the routing
    assert 0.0 < stats["topk_agreement"] < 1.0


def test_resident_bias_prefers_pool_experts_and_reports_agreement():
    model = hf_tiny.build("qwen3_moe", num_experts=16, num_experts_per_tok=2)
    ids = _inputs(model, 1, seq=24)
    handle = remoe_engine.patch(model, slots_per_layer=4, reuse_bias=10.0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    handle.reset_stats()
    with torch.no_grad():
        model.generate(ids[:, -1:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    stats = handle.stats()
    handle.unpatch()
    # With an overwhelming bias every decode token stays inside the resident set: no misses
    # beyond the first token of the new sequence.
    assert stats["misses"] <= 2 * len(handle.blocks)
    assert stats["topk_agreement"] < 1.0


# ------------------------------------------------------------------ load()


@pytest.mark.parametrize("variant", hf_tiny.ALL_VARIANTS, ids=hf_tiny.variant_id)
def test_load_matches_transformers(variant, tmp_path):
    model_type, extra = variant
    model = hf_tiny.build(model_type, **extra)
    model.save_pretrained(tmp_path, max_shard_size="60KB")  # sharded, with an index
    ids = _inputs(model, 4)
    want_logits, want_tokens = _logits(model, ids), _generate(model, ids)
    loaded = remoe_engine.load(tmp_path, slots_per_layer=_top_k(model), dtype=torch.float32)
    # No expert parameter was ever materialized.
    assert all(not any(True for _ in b.experts.parameters()) for b in find_moe_blocks(loaded))
    torch.testing.assert_close(_logits(loaded, ids), want_logits, atol=ATOL, rtol=0)
    assert torch.equal(_generate(loaded, ids), want_tokens)
    assert loaded.remoe.stats()["bytes_read"] > 0


def test_load_from_packed_file(tmp_path):
    from remoe_engine.store import ExpertStore

    model = hf_tiny.build("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    ExpertStore.from_checkpoint(tmp_path / "ckpt").pack(tmp_path / "experts.remoe")
    ids = _inputs(model, 2)
    loaded = remoe_engine.load(tmp_path / "ckpt", slots_per_layer=2, dtype=torch.float32,
                               packed=str(tmp_path / "experts.remoe"))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="never in memory"):
        loaded.remoe.unpatch()


@pytest.mark.slow
def test_load_peak_rss_stays_under_non_experts_plus_budget(tmp_path):
    """In a fresh process: the checkpoint's experts are >= 4x the budget, and peak RSS of load +
    generate stays under (process baseline + non-expert weights + budget + margin)."""
    model = hf_tiny.build("qwen3_moe", hidden_size=256, moe_intermediate_size=256, num_experts=32,
                          num_experts_per_tok=2, vocab_size=512)
    model.save_pretrained(tmp_path)
    blocks = find_moe_blocks(model)
    expert_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.experts.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    non_expert = total_bytes - expert_bytes
    budget = expert_bytes // 5
    script = textwrap.dedent(f"""
        import json, torch
        import remoe_engine.offload, remoe_engine.pool, remoe_engine.store
        import transformers.models.qwen3_moe.modeling_qwen3_moe
        from transformers import AutoConfig, AutoModelForCausalLM
        AutoConfig.from_pretrained({str(tmp_path)!r})
        torch.randn(64, 64) @ torch.randn(64, 64)  # imports and lazy init done: measure from here

        def status(field):
            with open("/proc/self/status") as f:
                line = next(l for l in f if l.startswith(field + ":"))
            return int(line.split()[1]) * 1024

        # Reset the peak-RSS mark (VmHWM), so the peak below is of load + generate alone, not of
        # the imports before them.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
        model = remoe_engine.load({str(tmp_path)!r}, memory_budget={budget}, dtype=torch.float32)
        ids = torch.randint(0, 512, (1, 32))
        with torch.no_grad():
            model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        peak = status("VmHWM")
        print(json.dumps(dict(base=base, peak=peak, stats=model.remoe.stats())))
    """)
    # The child imports the same remoe_engine as this process (installed or a source tree).
    package_root = os.path.dirname(os.path.dirname(remoe_engine.__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": package_root}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         check=True, cwd=str(tmp_path))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert expert_bytes >= 4 * budget
    margin = 64 * 2**20  # allocator slack, activations, the KV cache, safetensors headers
    growth = result["peak"] - result["base"]
    assert growth > budget // 2  # the measurement sees the pool's own allocation
    assert growth <= non_expert + budget + margin, (
        f"RSS grew {growth / 2**20:.1f} MiB; allowed {(non_expert + budget + margin) / 2**20:.1f} "
        f"MiB (experts {expert_bytes / 2**20:.1f} MiB)")
    assert growth < expert_bytes  # the experts were never all in memory


def test_prefill_waves_leave_the_last_tokens_experts_resident():
    """After a prefill that needed waves, each layer's pool holds the experts of the prompt's
    last token: the decode working set is what the prefill leaves behind."""
    model = hf_tiny.build("qwen3_moe", num_experts=16, num_experts_per_tok=2)
    ids = _inputs(model, 1, seq=32)
    handle = remoe_engine.patch(model, slots_per_layer=4)
    last_ids = {}
    hooks = [b.router.register_forward_hook(
        lambda mod, args, out, layer=b.layer_idx: last_ids.__setitem__(layer, out[2][-1].tolist()))
        for b in handle.blocks]
    _logits(model, ids)
    for hook in hooks:
        hook.remove()
    stats = handle.stats()
    resident = {b.layer_idx: set(handle.pool.resident(b.layer_idx)) for b in handle.blocks}
    handle.unpatch()
    assert stats["waves"] > len(handle.blocks)  # the prefill did need waves
    for layer, experts in last_ids.items():
        assert set(experts) <= resident[layer], f"layer {layer}: {experts} not in {resident[layer]}"


# ------------------------------------------------------------------ prefetch: residency only


@pytest.mark.parametrize("variant", hf_tiny.ALL_VARIANTS, ids=hf_tiny.variant_id)
def test_prefetch_changes_no_output(variant):
    """Decode with the next layer's guesses prefetched: same logits and tokens, counted loads."""
    model_type, extra = variant
    model = hf_tiny.build(model_type, **extra)
    ids = _inputs(model, 1)
    want_steps, want_tokens = _decode_logits(model, ids), _generate(model, ids)
    handle = remoe_engine.patch(model, slots_per_layer=_top_k(model) + 1, prefetch=True)
    got_steps, got_tokens = _decode_logits(model, ids), _generate(model, ids)
    stats = handle.stats()
    handle.unpatch()
    torch.testing.assert_close(got_steps, want_steps, atol=ATOL, rtol=0)
    assert torch.equal(got_tokens, want_tokens)
    assert stats["prefetch"] is True
    assert stats["prefetches"] > 0  # decode steps guessed and loaded experts early
    assert 0 <= stats["prefetch_hits"] <= stats["prefetches"]


def test_prefetch_from_disk_with_reader_threads(tmp_path):
    from remoe_engine.store import ExpertStore

    model = hf_tiny.build("qwen3_moe")
    model.save_pretrained(tmp_path / "ckpt")
    ExpertStore.from_checkpoint(tmp_path / "ckpt").pack(tmp_path / "experts.remoe")
    ids = _inputs(model, 1)
    want = _decode_logits(model, ids, n=12)
    counts = {}
    for prefetch in (False, True):
        loaded = remoe_engine.load(tmp_path / "ckpt", slots_per_layer=_top_k(model) + 1,
                                   dtype=torch.float32, packed=str(tmp_path / "experts.remoe"),
                                   num_threads=2, prefetch=prefetch)
        torch.testing.assert_close(_decode_logits(loaded, ids, n=12), want, atol=ATOL, rtol=0)
        counts[prefetch] = loaded.remoe.stats()
    assert counts[False]["prefetches"] == 0
    assert counts[True]["prefetches"] > 0
    # A prefetch is a read of one expert blob, like a miss.
    blob = counts[False]["bytes_read"] // counts[False]["misses"]
    assert counts[False]["bytes_read"] == counts[False]["misses"] * blob
    on = counts[True]
    assert on["bytes_read"] == (on["misses"] + on["prefetches"]) * blob


def test_a_cpu_pool_pins_no_host_memory_even_where_cuda_exists(monkeypatch):
    """Was: patch() pinned the host tier whenever CUDA was available, also for a CPU model
    (pinned memory cannot be paged out, and torch rounds each pinned block up to a power of 2)."""
    model = hf_tiny.build("qwen3_moe")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU
    handle = remoe_engine.patch(model, slots_per_layer=4)
    assert not handle.store.host_blobs.is_pinned()
    assert handle.stats()["pinned_host_bytes"] == 0


def test_experts_on_several_devices_are_refused_before_anything_moves():
    """A model split across devices (device_map="auto" over GPUs) is refused with a clear error
    and left intact. On CPU the split is simulated with the meta device."""
    model = hf_tiny.build("qwen3_moe")
    experts = model.model.layers[3].mlp.experts
    experts.to("meta")
    before = {k: v.device for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=r"experts are on several devices \(cpu: "
                       r"layers \[0, 1, 2\]; meta: layers \[3\]\)"):
        remoe_engine.patch(model, slots_per_layer=4)
    assert {k: v.device for k, v in model.state_dict().items()} == before
    assert not hasattr(model, "_remoe_patched")
