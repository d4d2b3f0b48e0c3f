"""Compressed experts: transformers' FP8 and MXFP4 checkpoint layouts read exactly (against
transformers' own dequantization), `remoe pack --quantize` int8 / int4, the C++ dequantization
against the plain-PyTorch reference, and clear errors for broken scales and files."""

from __future__ import annotations

import copy
import json
import struct

import hf_tiny
import pytest
import quant_ckpt
import torch
from safetensors.torch import load_file, save_file

from remoe_engine import cli, ops
from remoe_engine.pool import SlotPool
from remoe_engine.quant import QuantLayout, QuantPart, parse_scheme, quantize_expert
from remoe_engine.store import ExpertStore, SlotLayout, StoreError

SLOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dequantize(blob: torch.Tensor, layout: QuantLayout, slot: SlotLayout) -> torch.Tensor:
    return ops.dequantize(blob, layout.plan(slot), slot.dtype, slot.slot_bytes)


def _pool_tensors(store: ExpertStore, dtype: torch.dtype, **kwargs) -> dict:
    """Every expert as the pool's reader threads put it into a slot: (layer, e) -> tensors."""
    pool = SlotPool(store, "cpu", slots_per_layer=store.num_experts, dtype=dtype, **kwargs)
    out = {}
    for layer in store.layers:
        slots = pool.acquire(layer, list(range(store.num_experts)))
        for e, slot in enumerate(slots.tolist()):
            out[(layer, e)] = {k: v.clone() for k, v in pool.slot_tensors(slot).items()}
        pool.release(layer, list(range(store.num_experts)))
    return out


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert got[name].dtype == want[name].dtype, (what, name)
        assert torch.equal(got[name], want[name]), (
            what, name, (got[name].float() - want[name].float()).abs().max().item())


# ------------------------------------------------------------------------- element decoders


def test_fp8_and_ue8m0_decoders_match_torch_for_every_byte():
    codes = torch.arange(256, dtype=torch.uint8)
    # One 16 x 16 part of fp8 codes with a unit scale, then one of raw e8m0 scales applied to 1.
    slot = SlotLayout.build(torch.float32, [("w", (16, 16))])
    scale = torch.tensor([1.0], dtype=torch.float32).view(torch.uint8)
    blob = torch.zeros(4096, dtype=torch.uint8)
    blob[:256], blob[256:260] = codes, scale
    layout = QuantLayout("fp8", (QuantPart("w", 0, 16, 16, False, "fp8_e4m3", 0, (16, 16), "f32",
                                           256),), 4096)
    got = _dequantize(blob, layout, slot)[:1024].view(torch.float32)
    want = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])

    # e8m0: 255 scales (254 finite exponents and 0) applied to int8 code 1 each.
    slot = SlotLayout.build(torch.float32, [("w", (1, 255))])
    blob = torch.zeros(4096, dtype=torch.uint8)
    blob[:255] = 1
    blob[256:511] = torch.arange(255, dtype=torch.uint8)
    layout = QuantLayout("x", (QuantPart("w", 0, 1, 255, False, "int8", 0, (1, 1), "e8m0", 256),),
                         4096)
    got = _dequantize(blob, layout, slot)[: 255 * 4].view(torch.float32)
    want = torch.arange(255, dtype=torch.uint8).view(torch.float8_e8m0fnu).float()
    assert torch.equal(got, want)


BOUNDS = {"bf16": 0.01, "int8": 0.01, "fp8": 0.07, "int4": 0.25, "mxfp4": 0.35}


@pytest.mark.parametrize("dtype", SLOT_DTYPES)
@pytest.mark.parametrize("scheme", ["int8", "int8:g16", "int4:g16", "int4:g32+hqq", "fp8",
                                    "mxfp4", "bf16"])
@pytest.mark.parametrize("transposed", [False, True])
def test_cpp_dequantize_equals_the_reference(dtype, scheme, transposed):
    g = torch.Generator().manual_seed(0)
    # Ragged last groups and blocks (40 % 16, 48 % 128) except for MXFP4's fixed 32 columns.
    gate_up, down = ((64, 64), (64, 32)) if scheme == "mxfp4" else ((48, 40), (40, 24))
    tensors = {"gate_up_proj": torch.randn(*gate_up, generator=g),
               "gate_up_proj_bias": torch.randn(gate_up[1 if transposed else 0], generator=g),
               "down_proj": torch.randn(*down, generator=g)}
    layout, blob = quantize_expert(tensors, parse_scheme(scheme), transposed)
    slot = SlotLayout.build(dtype, [(k, tuple(v.shape)) for k, v in tensors.items()])
    want = layout.dequantize(blob, slot)
    got = slot.views(_dequantize(blob, layout, slot))
    _assert_equal(got, want, scheme)
    # And it is a quantization of the input: the error is a fraction of the values' spread.
    bound = BOUNDS[parse_scheme(scheme).kind]
    for name, t in tensors.items():
        err = (want[name].float() - t).abs().max().item()
        assert err <= bound * t.abs().max().item(), (name, err)


def test_pack_fp8_is_transformers_fp8_quantization():
    """`--quantize fp8` writes what transformers' own Fp8Quantize writes (codes and
    weight_scale_inv), on shapes that tile into 128 x 128 blocks."""
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1))
    config = FineGrainedFP8Config(weight_block_size=[128, 128])
    want = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("x.weight", w)
    layout, blob = quantize_expert({"w": w}, parse_scheme("fp8"), False)
    part = layout.parts[0]
    codes = blob[part.code_offset : part.code_offset + part.code_bytes]
    scales = blob[part.scale_offset : part.scale_offset + part.scale_bytes].view(torch.float32)
    assert torch.equal(codes, want["x.weight"].view(torch.uint8).flatten())
    assert torch.equal(scales, want["x.weight_scale_inv"].flatten())


def test_nonfinite_scale_is_an_error_not_weights():
    tensors = {"w": torch.randn(8, 32)}
    layout, blob = quantize_expert(tensors, parse_scheme("int8"), False)
    part = layout.parts[0]
    blob[part.scale_offset : part.scale_offset + 4] = torch.tensor(
        [float("nan")]).view(torch.uint8)
    slot = SlotLayout.build(torch.float32, [("w", (8, 32))])
    with pytest.raises(RuntimeError, match="not a finite number"):
        _dequantize(blob, layout, slot)
    with pytest.raises(ValueError, match="not finite"):
        layout.dequantize(blob, slot)


def test_plan_outside_the_blob_or_slot_is_refused():
    slot = SlotLayout.build(torch.float32, [("w", (8, 32))])
    layout, blob = quantize_expert({"w": torch.randn(8, 32)}, parse_scheme("int8"), False)
    plan = layout.plan(slot)
    plan[0, 5] = 4090  # codes past the end of the 4096-byte blob
    with pytest.raises(RuntimeError, match="outside the 4096-byte blob"):
        ops.dequantize(blob, plan, torch.float32, slot.slot_bytes)
    with pytest.raises(RuntimeError, match="writes up to byte"):
        ops.dequantize(blob, layout.plan(slot), torch.float32, 512)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_dequantize_opcheck(device):
    tensors = {"w": torch.randn(16, 64), "b": torch.randn(16)}
    layout, blob = quantize_expert(tensors, parse_scheme("int4:g32"), False)
    slot = SlotLayout.build(torch.bfloat16, [("w", (16, 64)), ("b", (16,))])
    torch.library.opcheck(torch.ops.remoe.dequantize.default,
                          (blob.to(device), layout.plan(slot), torch.bfloat16, slot.slot_bytes))


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["int8:g16", "int4:g16", "fp8", "mxfp4", "bf16"])
@pytest.mark.parametrize("dtype", SLOT_DTYPES)
def test_cuda_dequantize_equals_the_host(scheme, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"gate_up_proj": torch.randn(64, 96, generator=g),
               "down_proj": torch.randn(96, 32, generator=g)}
    layout, blob = quantize_expert(tensors, parse_scheme(scheme), True)
    slot = SlotLayout.build(dtype, [(k, tuple(v.shape)) for k, v in tensors.items()])
    want = _dequantize(blob, layout, slot)
    got = _dequantize(blob.cuda(), layout, slot)
    assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("tier", ["disk", "host"])
def test_cuda_pool_dequantizes_compressed_blobs_on_the_device(fp8_ckpt, tmp_path, tier):
    """Compressed bytes cross the bus (bytes_copied = blob bytes) and the slots hold exactly
    the host reference's dequantization."""
    _, directory = fp8_ckpt
    out = ExpertStore.from_checkpoint(directory).pack(tmp_path / "q.remoe", progress=False,
                                                      quantize="int4:g32")
    store = ExpertStore.from_packed(out)
    if tier == "host":
        store = store.host_copy(pin_memory=True)
    pool = SlotPool(store, "cuda", slots_per_layer=3, dtype=torch.bfloat16)
    for layer in store.layers:
        for e in range(store.num_experts):
            with pool.pinned(layer, [e]) as slots:
                got = {k: v.cpu() for k, v in pool.slot_tensors(int(slots[0])).items()}
                _assert_equal(got, store.expert_tensors(layer, e, torch.bfloat16), f"{layer} {e}")
    stats = pool.stats()
    assert stats["bytes_copied"] == stats["misses"] * store.blob_bytes


def test_parse_scheme():
    assert parse_scheme("int4").group == 64 and parse_scheme("int4").bits == 4
    assert parse_scheme("INT8:g128").group == 128
    assert parse_scheme("int8").group is None
    assert parse_scheme("int4:g32+hqq").refine
    assert parse_scheme("fp8").kind == "fp8" and parse_scheme("mxfp4").group == 32
    for bad in ("int3", "int4:g7", "int8+hqq", "fp8:g32", "int4:g", "mxfp4:g64"):
        with pytest.raises(ValueError, match="--quantize"):
            parse_scheme(bad)


# ------------------------------------------------------------------ FP8 / MXFP4 checkpoints


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    model = hf_tiny.build("qwen3_moe")
    return model, quant_ckpt.write_fp8(model, tmp_path_factory.mktemp("fp8") / "ckpt")


def _transformers_dequantized_experts(directory, dtype=torch.float32) -> dict:
    """(layer, e) -> tensors from transformers' own loading of the checkpoint (on a CPU it
    dequantizes FP8 and MXFP4 itself), the reference every compressed read must equal."""
    from transformers import AutoModelForCausalLM

    from remoe_engine.families import find_moe_blocks

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    out = {}
    for block in find_moe_blocks(model):
        params = dict(block.experts.named_parameters(recurse=False))
        for e in range(block.experts.num_experts):
            out[(block.layer_idx, e)] = {k: v[e].detach().clone() for k, v in params.items()}
    return out


def test_fp8_checkpoint_experts_equal_transformers_dequantization(fp8_ckpt):
    _, directory = fp8_ckpt
    store = ExpertStore.from_checkpoint(directory)
    assert store.compressed.scheme == "fp8"
    assert {p.block for p in store.compressed.parts} == {(16, 32)}
    want = _transformers_dequantized_experts(directory)
    got = _pool_tensors(store, torch.float32)
    for key, tensors in want.items():
        _assert_equal(got[key], tensors, f"expert {key}")
        _assert_equal(store.expert_tensors(*key, torch.float32), tensors, f"expert {key} (py)")
    # A miss reads the compressed bytes: 1 byte per weight plus the scales, not 4.
    stats = SlotPool(store, "cpu", slots_per_layer=2, dtype=torch.float32, o_direct=False)
    stats.acquire(store.layers[0], [0])
    assert stats.stats()["bytes_read"] == store.compressed.payload_bytes


@pytest.mark.slow
@pytest.mark.parametrize("model_type,scale_fmt", [("qwen3_moe", "ue8m0"),
                                                   ("deepseek_v3", "float")])
def test_fp8_checkpoint_loads_exactly(tmp_path, model_type, scale_fmt):
    directory = quant_ckpt.write_fp8(hf_tiny.build(model_type), tmp_path / "ckpt",
                                     scale_fmt=scale_fmt)
    _assert_load_matches_transformers(directory)


@pytest.mark.slow
def test_mxfp4_checkpoint_loads_exactly(tmp_path):
    directory = quant_ckpt.write_mxfp4(hf_tiny.build("gpt_oss"), tmp_path / "ckpt")
    store = ExpertStore.from_checkpoint(directory)
    assert store.compressed.scheme == "mxfp4" and store.transposed
    want = _transformers_dequantized_experts(directory)
    got = _pool_tensors(store, torch.float32)
    for key, tensors in want.items():
        _assert_equal(got[key], tensors, f"expert {key}")
    _assert_load_matches_transformers(directory)


def _assert_load_matches_transformers(directory, packed=None):
    """load() (compressed experts dequantized by the pool) against transformers' own loading:
    fp32 logits within 1e-5 and the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    import remoe_engine

    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = remoe_engine.load(directory, memory_budget="64KiB", dtype=torch.float32,
                              packed=packed)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert (want - got).abs().max().item() <= 1e-5
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ref.generate(ids[:1], **kwargs), model.generate(ids[:1], **kwargs))
    assert model.remoe.stats()["misses"] > 0


@pytest.mark.slow
def test_fp8_checkpoint_packs_compressed_and_loads_exactly(fp8_ckpt, tmp_path):
    _, directory = fp8_ckpt
    out = ExpertStore.from_checkpoint(directory).pack(tmp_path / "fp8.remoe", progress=False)
    packed = ExpertStore.from_packed(out)
    packed.verify()
    assert packed.compressed.scheme == "fp8" and out.read_bytes()[8:12] == struct.pack("<I", 3)
    _assert_load_matches_transformers(directory, packed=out)


def _rewrite(directory, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def fp8_copy(fp8_ckpt, tmp_path):
    import shutil

    return shutil.copytree(fp8_ckpt[1], tmp_path / "ckpt")


def test_fp8_missing_scales_are_named(fp8_copy):
    key = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"
    _rewrite(fp8_copy, lambda t: t.pop(key))
    with pytest.raises(StoreError, match="has no scales: expected '" + key.replace(".", r"\."),):
        ExpertStore.from_checkpoint(fp8_copy)


@pytest.mark.parametrize("layer,message", [(0, r"4 x 4 grid.*needs 2 x 2"),
                                           (1, r"scale mismatch: .*\[4, 4\] but .*\[2, 2\]")])
def test_fp8_scale_grid_not_matching_the_block_is_an_error(fp8_copy, layer, message):
    key = f"model.layers.{layer}.mlp.experts.0.gate_proj.weight_scale_inv"

    def edit(t):
        t[key] = torch.ones(4, 4)
    _rewrite(fp8_copy, edit)
    with pytest.raises(StoreError, match=message):
        ExpertStore.from_checkpoint(fp8_copy)


def test_fp8_scales_in_another_dtype_are_refused(fp8_copy):
    key = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"

    def edit(t):
        t[key] = t[key].to(torch.float16)
    _rewrite(fp8_copy, edit)
    with pytest.raises(StoreError, match="F16; transformers reads F32 or UE8M0"):
        ExpertStore.from_checkpoint(fp8_copy)


def test_fp8_corrupt_scale_fails_the_load(fp8_copy):
    key = "model.layers.3.mlp.experts.6.down_proj.weight_scale_inv"

    def edit(t):
        t[key][0, 0] = float("inf")
    _rewrite(fp8_copy, edit)
    store = ExpertStore.from_checkpoint(fp8_copy)
    pool = SlotPool(store, "cpu", slots_per_layer=2, dtype=torch.float32)
    pool.acquire(3, [5])  # a sound expert loads
    with pytest.raises(RuntimeError, match="layer 3 expert 6: .*not a finite number"):
        pool.acquire(3, [6])


def test_mxfp4_scales_of_the_wrong_shape_are_named(tmp_path):
    model = hf_tiny.build("gpt_oss")
    directory = quant_ckpt.write_mxfp4(model, tmp_path / "ckpt")
    key = "model.layers.0.mlp.experts.down_proj_scales"

    def edit(t):
        t[key] = t[key][:, :-1].contiguous()
    _rewrite(directory, edit)
    with pytest.raises(StoreError, match="MXFP4 scales '" + key.replace(".", r"\.")):
        ExpertStore.from_checkpoint(directory)


# ------------------------------------------------------------------------ remoe pack --quantize


@pytest.mark.parametrize("scheme", ["int8", "int4:g32"])
def test_pack_quantize_round_trip(fp8_ckpt, tmp_path, scheme):
    model, _ = fp8_ckpt
    source = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(source)
    store = ExpertStore.from_checkpoint(source)
    out = store.pack(tmp_path / "q.remoe", progress=False, quantize=scheme)
    packed = ExpertStore.from_packed(out)
    packed.verify()
    assert packed.compressed.scheme == scheme
    assert packed.blob_bytes < store.layout.slot_bytes
    # The pool's dequantization equals the reference, in every slot dtype, disk and host tier.
    for dtype in SLOT_DTYPES:
        got = _pool_tensors(packed, dtype)
        for key, tensors in got.items():
            _assert_equal(tensors, packed.expert_tensors(*key, dtype), f"{dtype} {key}")
    host = packed.host_copy()
    assert host.host_blobs.shape[1] == packed.blob_bytes  # the host tier holds compressed bytes
    for key, tensors in _pool_tensors(host, torch.bfloat16).items():
        _assert_equal(tensors, packed.expert_tensors(*key, torch.bfloat16), f"host {key}")


def test_compressed_packed_file_errors(fp8_ckpt, tmp_path):
    _, directory = fp8_ckpt
    out = ExpertStore.from_checkpoint(directory).pack(tmp_path / "q.remoe", progress=False,
                                                      quantize="int4:g16")
    raw = bytearray(out.read_bytes())
    packed = ExpertStore.from_packed(out)
    seg = packed.segments(2, 3)[0]
    raw[seg.offset + packed.compressed.parts[0].scale_offset] ^= 0x40  # one scale byte
    out.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"layer 2, expert 3\).*CRC32C"):
        ExpertStore.from_packed(out).verify()
    pool = SlotPool(ExpertStore.from_packed(out), "cpu", slots_per_layer=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="fails its CRC32C check"):
        pool.acquire(2, [3])
    raw[8:12] = struct.pack("<I", 4)
    out.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="version 4; this remoe-engine reads versions 2 and 3"):
        ExpertStore.from_packed(out)


def test_compressed_header_is_checked(fp8_ckpt, tmp_path):
    _, directory = fp8_ckpt
    out = ExpertStore.from_checkpoint(directory).pack(tmp_path / "q.remoe", progress=False,
                                                      quantize="int8")
    raw = out.read_bytes()
    (n,) = struct.unpack_from("<I", raw, 12)
    header = json.loads(raw[20 : 20 + n])
    header["compressed"]["parts"][0]["code_offset"] = header["compressed"]["blob_bytes"]
    text = json.dumps(header).encode()
    crc = ops.crc32c(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    prefix = raw[:12] + struct.pack("<II", len(text), crc)  # the header's checksum is right
    out.write_bytes(prefix + text + raw[20 + len(text) :])
    with pytest.raises(StoreError, match="corrupt header: part of 'gate_up_proj': bytes"):
        ExpertStore.from_packed(out)


def test_pack_cli_quantize(fp8_ckpt, tmp_path, capsys):
    model, _ = fp8_ckpt
    source = tmp_path / "ckpt"
    model.save_pretrained(source)
    assert cli.main(["pack", str(source), str(tmp_path / "q.remoe"), "--quantize", "int4:g32",
                     "--no-progress", "--verify"]) == 0
    assert "int4:g32 compressed" in capsys.readouterr().out
    assert cli.main(["pack", str(source), str(tmp_path / "x.remoe"), "--quantize",
                     "int5"]) != 0
    assert "--quantize 'int5'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4:g32"])
def test_load_packed_quantized_matches_its_dequantized_model(fp8_ckpt, tmp_path, scheme):
    """load(path, packed=OUT) of a quantized pack equals the same model with its experts set to
    the reference dequantization of the packed blobs (fp32 logits <= 1e-5, same greedy
    tokens), and stays near the unquantized model."""
    import remoe_engine

    model, _ = fp8_ckpt
    source = tmp_path / "ckpt"
    model.save_pretrained(source)
    out = ExpertStore.from_checkpoint(source).pack(tmp_path / "q.remoe", progress=False,
                                                   quantize=scheme)
    ref = quant_ckpt.with_dequantized_experts(model, ExpertStore.from_packed(out))
    loaded = remoe_engine.load(source, memory_budget="64KiB", dtype=torch.float32, packed=out)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, exact = ref(ids).logits, loaded(ids).logits, model(ids).logits
    assert (want - got).abs().max().item() <= 1e-5
    assert (got - exact).abs().max().item() <= {"int8": 0.01, "int4:g32": 0.1}[scheme]
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ref.generate(ids[:1], **kwargs), loaded.generate(ids[:1], **kwargs))
