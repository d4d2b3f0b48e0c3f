"""Compressed slots: remoe::moe_experts_compressed against the float64 reference on the
dequantized weights, its errors, the pool keeping blobs compressed (more experts per byte, a
corrupt scale still a load error), and load(slot_format=...) against transformers."""

from __future__ import annotations

import hf_tiny
import pytest
import quant_ckpt
import torch
from safetensors.torch import load_file, save_file

import remoe_engine
from remoe_engine import ops, reference
from remoe_engine.pool import SlotPool
from remoe_engine.quant import parse_scheme, quantize_expert
from remoe_engine.store import ExpertStore, SlotLayout

S, H, I, K = 6, 96, 64, 3
SCHEMES = ("bf16", "int8", "int8:g32", "int4:g32", "int4:g64+hqq", "fp8", "mxfp4", "int4:g8")
GATES = {
    "silu chunk": ops.ExpertsGate("chunk", "silu"),
    "gpt-oss": ops.ExpertsGate("interleave", "swish_alpha", "input", 7.0, 1.702, 1.0),
    "no gate relu2": ops.ExpertsGate("none", "relu2"),
}


def _blobs(scheme: str, gate: ops.ExpertsGate, bias: bool, seed: int = 0):
    """S experts quantized with `scheme`: (blobs uint8 [S, B], layout, dense fp32 tensors as the
    reference dequantization gives them, name -> [S, *shape])."""
    g = torch.Generator().manual_seed(seed)
    N = I if gate.layout == "none" else 2 * I
    up_name = "up_proj" if gate.layout == "none" else "gate_up_proj"
    shapes = {up_name: (N, H), "down_proj": (H, I)}
    if bias:
        shapes.update({f"{up_name}_bias": (N,), "down_proj_bias": (H,)})
    layout, blobs = None, []
    for _ in range(S):
        tensors = {name: torch.randn(shape, generator=g) * 0.2 for name, shape in shapes.items()}
        layout, blob = quantize_expert(tensors, parse_scheme(scheme), False, layout)
        blobs.append(blob)
    slot = SlotLayout.build(torch.float32, list(shapes.items()))
    dense = [layout.dequantize(b, slot) for b in blobs]
    weights = {name: torch.stack([d[name] for d in dense]) for name in shapes}
    return torch.stack(blobs), layout, weights, up_name


def _routing(T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    slots[0, -1] = -1  # a pair computed elsewhere (another wave)
    return slots, torch.rand(T, K, generator=g)


def _reference(x, slots, weights, gate, w, up_name):
    return reference.moe_experts(x, slots, weights, w[up_name], w["down_proj"], gate=gate,
                                 up_bias=w.get(f"{up_name}_bias"),
                                 down_bias=w.get("down_proj_bias"))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("gate_name", GATES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 40])  # <= 8: decoded in registers; else scratch
def test_fp32_matches_the_reference_on_the_dequantized_weights(scheme, gate_name, tokens):
    gate = GATES[gate_name]
    blobs, layout, w, up_name = _blobs(scheme, gate, bias=gate_name == "gpt-oss")
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2))
    slots, weights = _routing(tokens)
    got = ops.moe_experts_compressed(x, slots, weights, blobs, layout.compute_plan(up_name),
                                     w[up_name].shape[1], gate=gate)
    want = _reference(x, slots, weights, gate, w, up_name)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 40])
def test_half_precision_hidden(dtype, tokens):
    gate = GATES["silu chunk"]
    blobs, layout, w, up_name = _blobs("int4:g32", gate, bias=False)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    slots, weights = _routing(tokens)
    got = ops.moe_experts_compressed(x, slots, weights, blobs, layout.compute_plan(up_name),
                                     2 * I, gate=gate)
    want = _reference(x, slots, weights, gate, w, up_name)
    # Few tokens decode in fp32 from dtype inputs; many round the scratch weights to dtype.
    tolerance = 1e-5 if tokens <= 8 else 1e-2
    assert float((got - want).abs().max()) <= tolerance * float(want.abs().max())


def test_fp8_special_codes_decode_as_the_reference():
    """Every e4m3 byte (subnormals, both zeros, NaN) through the in-register decoder."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    row = codes.float().nan_to_num(0.0)  # the reference value of each byte, NaN aside
    tensors = {"up_proj": row.repeat(2, 1)[:, :H].clone(), "down_proj": torch.eye(H, 2)}
    layout, blob = quantize_expert(tensors, parse_scheme("fp8"), False)
    x = torch.zeros(1, H)
    gate = ops.ExpertsGate("none", "relu")
    for c in range(H):  # one input column at a time: the output is that column's decoded value
        x.zero_()
        x[0, c] = 1.0
        got = ops.moe_experts_compressed(x, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                                         blob[None], layout.compute_plan("up_proj"), 2, gate=gate)
        slot = SlotLayout.build(torch.float32, [("up_proj", (2, H)), ("down_proj", (H, 2))])
        dense = layout.dequantize(blob, slot)
        want = torch.relu(dense["up_proj"][:, c]) @ dense["down_proj"].T
        torch.testing.assert_close(got[0], want, atol=0, rtol=0)


def test_deterministic_across_thread_counts():
    gate = GATES["silu chunk"]
    blobs, layout, _, up_name = _blobs("int4:g32", gate, bias=False)
    x = torch.randn(5, H)
    slots, weights = _routing(5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe_experts_compressed(x, slots, weights, blobs, layout.compute_plan(up_name),
                                         2 * I, gate=gate)
        torch.set_num_threads(2)
        two = ops.moe_experts_compressed(x, slots, weights, blobs, layout.compute_plan(up_name),
                                         2 * I, gate=gate)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_opcheck():
    gate = GATES["gpt-oss"]
    blobs, layout, _, up_name = _blobs("int8", gate, bias=True)
    x = torch.randn(3, H)
    slots, weights = _routing(3)
    torch.library.opcheck(torch.ops.remoe.moe_experts_compressed.default,
                          (x, slots, weights, blobs, layout.compute_plan(up_name), 2 * I,
                           gate.layout, gate.activation, gate.clamp, gate.limit, gate.alpha,
                           gate.up_offset),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_inputs():
    gate = GATES["silu chunk"]
    blobs, layout, _, up_name = _blobs("int4:g32", gate, bias=False)
    plan = layout.compute_plan(up_name)
    x = torch.randn(2, H)
    slots, weights = _routing(2)
    shifted = plan.clone()
    shifted[0, 7] = blobs.shape[1]  # codes past the blob's end
    overlap = torch.cat([plan, plan[:1]])
    wrong_matrix = plan.clone()
    wrong_matrix[0, 0] = 7
    bad_slots = slots.clone()
    bad_slots[1, 0] = S
    base = dict(hidden=x, slots=slots, weights=weights, blobs=blobs, plan=plan, up_rows=2 * I)
    return [
        ({"plan": plan[:, :10]}, "plan must be a CPU int64"),
        ({"plan": plan[:1]}, "plan must be a CPU int64 \\[parts >= 2"),
        ({"plan": shifted}, "outside|past|beyond|exceed|blob"),
        ({"plan": overlap}, "both fill row 0 of up"),
        ({"plan": wrong_matrix}, "fills matrix 7"),
        ({"plan": torch.cat([plan[:1], plan[:1]])}, "both fill row 0 of up"),
        ({"up_rows": 2 * I + 2}, "does not fit down \\[96, 65\\]"),
        ({"up_rows": 2 * I - 1}, "a gated up projection has 2 \\* I rows"),
        ({"blobs": blobs.view(torch.int8)}, "blobs must be uint8"),
        ({"blobs": blobs[:, ::2]}, "blobs must be uint8"),
        ({"slots": bad_slots}, "is not a slot of a 6-slot pool"),
        ({"hidden": torch.randn(2, H + 1)}, "does not fit"),
    ], base, gate


def test_bad_inputs_are_clear_errors():
    cases, base, gate = _bad_inputs()
    for change, message in cases:
        a = {**base, **change}
        with pytest.raises(RuntimeError, match=message):
            ops.moe_experts_compressed(a["hidden"], a["slots"], a["weights"], a["blobs"],
                                       a["plan"], a["up_rows"], gate=gate)


def test_missing_down_projection_is_named():
    gate = GATES["silu chunk"]
    blobs, layout, _, up_name = _blobs("int8", gate, bias=False)
    plan = layout.compute_plan(up_name)
    only_up = plan[plan[:, 0] == 0]
    with pytest.raises(RuntimeError, match="parts >= 2|no down projection"):
        ops.moe_experts_compressed(torch.randn(1, H), torch.zeros(1, 1, dtype=torch.long),
                                   torch.ones(1, 1), blobs, only_up, 2 * I, gate=gate)
    twice_up = torch.cat([only_up, only_up])
    twice_up[1, 1] = 0
    with pytest.raises(RuntimeError, match="both fill row 0 of up"):
        ops.moe_experts_compressed(torch.randn(1, H), torch.zeros(1, 1, dtype=torch.long),
                                   torch.ones(1, 1), blobs, twice_up, 2 * I, gate=gate)


# ------------------------------------------------------------------------------- the pool


@pytest.fixture(scope="module")
def int4_pack(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint and its experts packed as int4:g32."""
    directory = tmp_path_factory.mktemp("int4")
    model = hf_tiny.build("qwen3_moe")
    model.save_pretrained(directory / "ckpt")
    out = ExpertStore.from_checkpoint(directory / "ckpt").pack(directory / "q.remoe",
                                                               progress=False, quantize="int4:g32")
    return model, directory / "ckpt", out


def test_a_budget_holds_more_compressed_experts(int4_pack):
    _, _, out = int4_pack
    store = ExpertStore.from_packed(out)
    budget = 8 * store.layout.in_dtype(torch.float32).slot_bytes
    dense = SlotPool(store, "cpu", memory_budget=budget, dtype=torch.float32)
    packed = SlotPool(store, "cpu", memory_budget=budget, dtype=torch.float32,
                      slot_format="compressed")
    assert dense.num_slots == 8 and dense.slot_format == "dequantized"
    assert packed.slot_bytes == store.blob_bytes and packed.slot_format == "compressed"
    assert packed.num_slots == min(budget // store.blob_bytes,
                                   len(store.layers) * store.num_experts)
    assert packed.num_slots > 2 * dense.num_slots
    # A slot's blob is the packed blob, byte for byte; slot_tensors dequantizes it.
    layer = store.layers[0]
    for pool in (dense, packed):
        slot = int(pool.acquire(layer, [3])[0])
        tensors = {k: v.clone() for k, v in pool.slot_tensors(slot).items()}
        pool.release(layer, [3])
        if pool is packed:
            assert torch.equal(pool.buffer[slot], store.read_checked(layer, 3))
            assert pool.stats()["bytes_read"] == store.blob_bytes  # read straight into the slot
        for name, t in store.expert_tensors(layer, 3, torch.float32).items():
            assert torch.equal(tensors[name], t), name
    assert packed.stats()["slot_format"] == "compressed"


def test_bad_slot_formats_are_refused(int4_pack):
    model, ckpt, out = int4_pack
    with pytest.raises(ValueError, match="slot_format must be one of"):
        SlotPool(ExpertStore.from_packed(out), "cpu", slots_per_layer=2, slot_format="packed")
    with pytest.raises(ValueError, match="not compressed"):
        remoe_engine.load(ckpt, slots_per_layer=2, slot_format="compressed")
    with pytest.raises(ValueError, match="slot_format must be one of"):
        remoe_engine.load(ckpt, slots_per_layer=2, packed=out, slot_format="int4")


def test_corrupt_scale_in_a_compressed_slot_fails_the_load(tmp_path):
    """A checkpoint (no checksum) whose FP8 scale is infinite: the blob would reach the slot
    untouched, so the reader checks its scales and the load fails, naming layer and expert."""
    directory = quant_ckpt.write_fp8(hf_tiny.build("qwen3_moe"), tmp_path / "ckpt",
                                     scale_fmt="float")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"][0, 0] = float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    store = ExpertStore.from_checkpoint(directory)
    for tier in (store, store.host_copy()):
        pool = SlotPool(tier, "cpu", slots_per_layer=2, dtype=torch.float32,
                        slot_format="compressed")
        pool.acquire(1, [1])  # a sound expert loads
        with pytest.raises(RuntimeError, match="layer 1 expert 2: .*not a finite number"):
            pool.acquire(1, [2])
        assert 2 not in pool.resident(1)


# ----------------------------------------------------------------------------- load()


def _logits_and_tokens(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    return logits, tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp8", "mxfp4", "int4:g32"])
def test_load_compressed_slots_equals_transformers_and_dequantized_slots(kind, tmp_path,
                                                                        int4_pack):
    """fp8 (Qwen3-MoE, fp32 block scales), mxfp4 (GPT-OSS: interleaved clamped gate, biases,
    transposed experts) and an int4 pack: compressed slots, dequantized slots and transformers'
    own dequantization give fp32 logits within 1e-5 and the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    packed = None
    if kind == "fp8":
        ckpt = quant_ckpt.write_fp8(hf_tiny.build("qwen3_moe"), tmp_path / "ckpt",
                                    scale_fmt="float")
    elif kind == "mxfp4":
        ckpt = quant_ckpt.write_mxfp4(hf_tiny.build("gpt_oss"), tmp_path / "ckpt")
    else:
        _, ckpt, packed = int4_pack
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for slot_format in ("compressed", "dequantized", "auto"):
        model = remoe_engine.load(ckpt, memory_budget="64KiB", dtype=torch.float32,
                                  packed=packed, slot_format=slot_format)
        stats = model.remoe.stats()
        assert stats["slot_format"] == ("compressed" if slot_format == "auto" else slot_format)
        assert stats["experts_kernel"] == "fused"
        results[slot_format] = _logits_and_tokens(model, ids)
        assert model.remoe.stats()["misses"] > 0
    if packed is None:
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    else:
        ref = quant_ckpt.with_dequantized_experts(int4_pack[0],
                                                  ExpertStore.from_packed(packed))
    want_logits, want_tokens = _logits_and_tokens(ref, ids)
    for slot_format, (logits, tokens) in results.items():
        assert (logits - want_logits).abs().max().item() <= 1e-5, slot_format
        assert torch.equal(tokens, want_tokens), slot_format


def test_per_expert_path_on_compressed_slots_dequantizes_on_use(int4_pack):
    """experts_kernel="loop" with compressed slots: each use dequantizes the pinned blob; the
    same logits as the fused op. "auto" picks dequantized slots for the loop."""
    _, ckpt, out = int4_pack
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    model = remoe_engine.load(ckpt, slots_per_layer=2, dtype=torch.float32, packed=out,
                              slot_format="compressed")
    with torch.no_grad():
        fused = model(ids).logits
        model.remoe.set_experts_kernel("loop")
        loop = model(ids).logits
    torch.testing.assert_close(loop, fused, atol=1e-5, rtol=1e-5)
    auto = remoe_engine.load(ckpt, slots_per_layer=2, dtype=torch.float32, packed=out,
                             experts_kernel="loop")
    assert auto.remoe.stats()["slot_format"] == "dequantized"


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["int8", "int4:g32", "fp8", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_cuda_op_equals_the_cpu_op(scheme, tokens):
    """The CUDA path (routed blobs dequantized on the device, then the dense op) against the CPU
    kernel on the same blobs, and the float64 reference."""
    gate = GATES["gpt-oss"]
    blobs, layout, w, up_name = _blobs(scheme, gate, bias=True)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2))
    slots, weights = _routing(tokens)
    plan = layout.compute_plan(up_name)
    cpu = ops.moe_experts_compressed(x, slots, weights, blobs, plan, 2 * I, gate=gate)
    cuda = ops.moe_experts_compressed(x.cuda(), slots.cuda(), weights.cuda(), blobs.cuda(), plan,
                                      2 * I, gate=gate)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cuda.cpu(), _reference(x, slots, weights, gate, w, up_name),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_load_with_compressed_slots_equals_the_cpu(int4_pack):
    """A compressed pool on the GPU holds the blobs (more slots than dequantized ones) and gives
    the CPU's logits and greedy tokens; "auto" stays dequantized on CUDA until validated."""
    _, ckpt, out = int4_pack
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    cpu = remoe_engine.load(ckpt, memory_budget="64KiB", dtype=torch.float32, packed=out,
                            slot_format="compressed")
    cuda = remoe_engine.load(ckpt, memory_budget="64KiB", dtype=torch.float32, packed=out,
                             slot_format="compressed", experts_kernel="fused", device="cuda")
    auto = remoe_engine.load(ckpt, memory_budget="64KiB", dtype=torch.float32, packed=out,
                             device="cuda")
    assert cuda.remoe.stats()["slot_format"] == "compressed"
    assert auto.remoe.stats()["slot_format"] == "dequantized"
    assert cuda.remoe.pool.num_slots > auto.remoe.pool.num_slots
    with torch.no_grad():
        want = cpu(ids).logits
        got = cuda(ids.cuda()).logits.cpu()
        loop = auto(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loop, want, atol=1e-4, rtol=1e-4)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(cuda.generate(ids.cuda(), **kwargs).cpu(), cpu.generate(ids, **kwargs))
    assert cuda.remoe.stats()["misses"] > 0
