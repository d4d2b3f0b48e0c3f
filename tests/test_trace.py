"""Routing traces: recording leaves the model's outputs alone and captures what the experts
really computed with, token order for forward and generate, metadata, files and bad files."""

from __future__ import annotations

import json
import struct

import hf_tiny
import numpy as np
import pytest
import torch

from remoe_engine import trace
from remoe_engine.families import find_moe_blocks
from remoe_engine.trace import RouterTap, RoutingTrace, TraceFileError, TraceMeta

# One of each routing flavour: softmax, shared experts, sigmoid + groups + correction bias,
# top-k-then-softmax, hybrid attention.
FAMILIES = [("qwen3_moe", {}), ("qwen2_moe", {}), ("deepseek_v3", {}), ("gpt_oss", {}),
            ("mixtral", {}), ("qwen3_next", {})]


def _no_hooks(model) -> bool:
    return all(not b.router._forward_hooks for b in find_moe_blocks(model))


@pytest.mark.parametrize("variant", FAMILIES, ids=hf_tiny.variant_id)
def test_recording_leaves_logits_unchanged_and_sees_what_the_experts_see(variant):
    model_type, extra = variant
    model = hf_tiny.build(model_type, **extra)
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
    # What the experts actually receive, seen from the experts' side (not the router's).
    expert_ids: list[list[torch.Tensor]] = [[] for _ in find_moe_blocks(model)]
    handles = [b.experts.register_forward_hook(
        lambda m, args, out, i=i: expert_ids[i].append(args[1].reshape(-1, args[1].shape[-1])))
        for i, b in enumerate(find_moe_blocks(model))]
    try:
        with torch.no_grad(), RouterTap(model) as tap:
            got = model(x).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(got, want)
    assert _no_hooks(model)
    for layer, calls in enumerate(tap.ids):
        assert torch.equal(calls[0].long(), expert_ids[layer][0])

    recorded = trace.record(model, x)
    assert recorded.ids.shape == (len(expert_ids), 18, model.config.num_experts_per_tok)
    assert torch.equal(recorded.ids[:, :9], torch.stack([c[0][:9] for c in expert_ids]).int())
    assert recorded.meta.model_type == model_type and _no_hooks(model)


def test_hooks_are_removed_when_the_model_raises():
    model = hf_tiny.build("qwen3_moe")
    with pytest.raises(IndexError):
        trace.record(model, torch.tensor([[1, 2, 10_000]]))  # out of the vocabulary
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="inside"), RouterTap(model):
        raise RuntimeError("inside")
    assert _no_hooks(model)


def test_padding_is_dropped_and_batching_does_not_change_routing():
    model = hf_tiny.build("olmoe")
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 256, (7,), generator=gen), torch.randint(0, 256, (4,), generator=gen)
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :4], mask[1, :4] = b, 1  # right padding
    batched = trace.record(model, ids, attention_mask=mask, probs=True)
    assert batched.offsets.tolist() == [0, 7, 11]
    alone = trace.concatenate([trace.record(model, a, probs=True), trace.record(model, b,
                                                                                probs=True)])
    assert torch.equal(batched.ids, alone.ids)
    assert torch.equal(batched.token_ids, torch.cat([a, b]))
    torch.testing.assert_close(batched.probs, alone.probs, atol=1e-5, rtol=0)
    assert torch.allclose(batched.probs.sum(-1), torch.ones(4, 11))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v2"])
def test_generate_records_prefill_then_decode_per_sequence(model_type):
    model = hf_tiny.build(model_type)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in (6, 3)]
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding, as generate() wants
        ids[row, 6 - len(p):], mask[row, 6 - len(p):] = p, 1
    batched = trace.record(model, ids, attention_mask=mask, generate_kwargs=kwargs)
    assert _no_hooks(model) and batched.meta.mode == "generate"
    for s, p in enumerate(prompts):
        # Outputs unchanged: the fed tokens are the prompt and generate()'s own tokens (the
        # last generated token is never fed back).
        with torch.no_grad():
            plain = model.generate(p[None], **kwargs)[0]
        lo, hi = batched.offsets[s], batched.offsets[s + 1]
        assert torch.equal(batched.token_ids[lo:hi], plain[:-1])
        # Prefill + decode steps, batched and padded, route each token as one forward over the
        # sequence alone does.
        full = trace.record(model, plain[:-1])
        assert torch.equal(batched.ids[:, lo:hi], full.ids)


def test_generate_stops_recording_a_sequence_at_its_end_token():
    model = hf_tiny.build("qwen3_moe")
    prompt = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(3))
    free = trace.record(model, prompt, generate_kwargs={"max_new_tokens": 6, "do_sample": False})
    generated = free.token_ids[4:].tolist()  # tokens fed back after the prompt
    eos = generated[1]  # pretend the second generated token ends the sequence
    stopped = trace.record(model, prompt, generate_kwargs={
        "max_new_tokens": 6, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0})
    assert stopped.token_ids.tolist() == free.token_ids[:5].tolist()


def test_generate_rejects_beams():
    model = hf_tiny.build("qwen3_moe")
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        trace.record(model, torch.tensor([1, 2]), generate_kwargs={"num_beams": 2})


def test_metadata():
    model = hf_tiny.build("deepseek_v3")
    t = trace.record(model, torch.tensor([1, 2, 3]), source="three tokens")
    assert t.meta.layers == [1, 2, 3]  # first_k_dense_replace=1: layer 0 is dense
    assert (t.meta.top_k, t.meta.num_experts) == (4, 16)
    assert t.meta.expert_bytes == 3 * 64 * 32 * 4 and t.meta.source == "three tokens"
    before = t.meta.router_hash
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj.mul_(2.0)
    assert trace.router_hash(model) == before  # expert weights are not the router
    with torch.no_grad():
        model.model.layers[2].mlp.gate.e_score_correction_bias[0] += 1.0
    assert trace.router_hash(model) != before  # a router buffer is part of the router
    assert t.meta.config_hash == trace.config_hash(model.config)


def test_config_hash_survives_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = hf_tiny.build("qwen3_moe")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert trace.config_hash(reloaded.config) == trace.config_hash(model.config)
    assert trace.router_hash(reloaded) == trace.router_hash(model)
    other = hf_tiny.build("qwen3_moe", num_experts_per_tok=3)
    assert trace.config_hash(other.config) != trace.config_hash(model.config)


# ------------------------------------------------------------------ files


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model = hf_tiny.build("qwen3_moe")
    t = trace.record(model, torch.randint(0, 256, (2, 5)), probs=True, source="x")
    path = tmp_path / f"t{suffix}"
    t.save(path)
    assert not list(tmp_path.glob("*.partial"))
    back = trace.load(path)
    assert back.meta == t.meta
    for name in ("ids", "offsets", "token_ids", "probs"):
        assert torch.equal(getattr(back, name), getattr(t, name))


def _write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None):
    header = {"__metadata__": metadata} if metadata is not None else {}
    offset, blobs = 0, []
    for name, array in tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": {"int32": "I32", "int64": "I64"}[array.dtype.name],
                        "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    good = trace.synthetic(50, layers=2, experts=8, top_k=2)
    good.save(tmp_path / "good.safetensors")
    good.save(tmp_path / "good.npz")
    data = (tmp_path / "good.safetensors").read_bytes()
    meta = {"remoe_trace": json.dumps({"format_version": trace.FORMAT_VERSION,
                                       **good.meta.to_dict()})}
    ids = good.ids.numpy()
    offsets = good.offsets.numpy()

    cases = {
        "missing.safetensors": (None, "no such trace file"),
        "truncated.safetensors": (data[: len(data) - 40], "truncated or corrupt"),
        "garbage.safetensors": (b"hello, world, not a trace", "truncated or corrupt"),
        "truncated.npz": ((tmp_path / "good.npz").read_bytes()[:300], "truncated or corrupt"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(TraceFileError, match=message) as info:
            trace.load(path)
        assert str(path) in str(info.value)

    def written(name, tensors, metadata):
        _write_safetensors(tmp_path / name, tensors, metadata)
        return tmp_path / name

    with pytest.raises(TraceFileError, match="not a remoe trace"):
        trace.load(written("plain.safetensors", {"ids": ids}, None))
    with pytest.raises(TraceFileError, match=r"lacks the tensor\(s\) \['offsets'\]"):
        trace.load(written("no_offsets.safetensors", {"ids": ids}, meta))
    future = {"remoe_trace": json.dumps({**json.loads(meta["remoe_trace"]),
                                         "format_version": 99})}
    with pytest.raises(TraceFileError, match="format version 99 is not supported"):
        trace.load(written("future.safetensors", {"ids": ids, "offsets": offsets}, future))
    with pytest.raises(TraceFileError, match=r"expert ids must be in \[0, 8\)"):
        trace.load(written("range.safetensors", {"ids": ids + 5, "offsets": offsets}, meta))
    with pytest.raises(TraceFileError, match="offsets must rise from 0 to the token count 50"):
        trace.load(written("offsets.safetensors", {"ids": ids, "offsets": offsets[::-1].copy()},
                           meta))
    with pytest.raises(TraceFileError, match="metadata is malformed"):
        trace.load(written("meta.safetensors", {"ids": ids, "offsets": offsets},
                           {"remoe_trace": "{broken"}))


def test_trace_rules():
    meta = TraceMeta(top_k=2, num_experts=4, layers=[0])
    offsets = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"token 1 of layer 0 lists an expert twice: \[3, 3\]"):
        RoutingTrace(ids=torch.tensor([[[0, 1], [3, 3]]]), offsets=offsets, meta=meta)
    with pytest.raises(ValueError, match="metadata says top_k 2"):
        RoutingTrace(ids=torch.tensor([[[0], [1]]]), offsets=offsets, meta=meta)
    with pytest.raises(ValueError, match="probs must be"):
        RoutingTrace(ids=torch.tensor([[[0, 1], [2, 3]]]), offsets=offsets, meta=meta,
                     probs=torch.zeros(1, 2, 3))


def test_concatenate_refuses_different_routers():
    a = trace.synthetic(10, layers=1, experts=8, top_k=2)
    b = trace.synthetic(10, layers=1, experts=8, top_k=2)
    b.meta = TraceMeta(**{**b.meta.to_dict(), "router_hash": "other"})
    with pytest.raises(ValueError, match="different router_hash"):
        trace.concatenate([a, b])
    joined = trace.concatenate([a, a])
    assert joined.offsets.tolist() == [0, 10, 20] and joined.num_sequences == 2
