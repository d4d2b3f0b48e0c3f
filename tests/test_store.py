"""ExpertStore: byte-exact expert ranges for every on-disk layout, packed files, host tier, and
clear errors for broken checkpoints and packed files."""

from __future__ import annotations

import json
import os
import struct

import hf_tiny
import pytest
import torch
from safetensors.torch import load_file, save_file

from remoe_engine import cli, ops
from remoe_engine.families import find_moe_blocks
from remoe_engine.pool import SlotPool
from remoe_engine.store import (
    ALIGN,
    PACK_MAGIC,
    ExpertStore,
    StoreError,
    blob_checksum,
    blob_seed,
    read_safetensors_header,
)

# --------------------------------------------------------------------------- CRC32C, golden


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_ref(data: bytes, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing `crc`: the plain byte-at-a-time definition."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF



def test_crc32c_definition():
    assert crc32c_ref(b"123456789") == 0xE3069283  # the standard CRC32C check value
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    assert ops.crc32c(data) == crc32c_ref(data.numpy().tobytes())
    assert ops.crc32c(data[300:], ops.crc32c(data[:300])) == ops.crc32c(data)  # continuation


def test_blob_checksum_is_keyed_by_layer_and_expert():
    blob = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    key = struct.pack("<qq", 3, 5)  # int64 LE transformers layer index, int64 LE expert id
    assert blob_seed(3, 5) == crc32c_ref(key)
    assert blob_checksum(3, 5, blob) == crc32c_ref(key + blob.numpy().tobytes())
    # The same bytes under another identity do not check out: relabelling is caught.
    assert len({blob_checksum(3, 5, blob), blob_checksum(5, 3, blob), blob_checksum(3, 6, blob),
                blob_checksum(4, 5, blob)}) == 4


# One family per on-disk layout variant: per-expert keys (with shared experts, dense first
# layers, plain), Mixtral w1/w3/w2, and GPT-OSS fused with biases. dtypes vary on purpose.
LAYOUTS = [
    ("qwen3_moe", torch.bfloat16),
    ("qwen2_moe", torch.float32),
    ("olmoe", torch.float16),
    ("deepseek_v3", torch.bfloat16),
    ("mixtral", torch.float32),
    ("gpt_oss", torch.bfloat16),
]


def _expected(model) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(layer, expert) -> name -> what transformers holds for that expert."""
    out = {}
    for block in find_moe_blocks(model):
        for e in range(block.experts.num_experts):
            out[(block.layer_idx, e)] = {
                name: getattr(block.experts, name)[e].detach().contiguous()
                for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
                if hasattr(block.experts, name)
            }
    return out


def _assert_bytes_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str):
    assert list(got) == list(want), where
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, (where, name)
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), (where, name)


def _assert_pool_bytes_equal(store: ExpertStore, want, **pool_kwargs):
    """Load every expert through the C++ pool and compare what lands in the slot."""
    pool = SlotPool(store, "cpu", slots_per_layer=3, num_threads=2, **pool_kwargs)
    for layer in store.layers:
        for e in range(store.num_experts):
            with pool.pinned(layer, [e]) as slots:
                _assert_bytes_equal(pool.slot_tensors(int(slots[0])), want[(layer, e)],
                                    f"pool layer {layer} expert {e}")
    stats = pool.stats()
    assert stats["misses"] == len(store.layers) * store.num_experts
    if store.tier == "host":  # a host-tier miss is one copy of the blob row, no read
        assert stats["bytes_read"] == 0
        assert stats["bytes_copied"] == stats["misses"] * store.layout.slot_bytes
    elif store.source.endswith(".remoe"):  # a packed miss reads the whole blob
        assert stats["bytes_read"] == stats["misses"] * store.layout.slot_bytes
    elif not any(pool.direct_io.values()):  # buffered: exactly the tensors' bytes
        assert stats["bytes_read"] == stats["misses"] * store.layout.payload_bytes
    else:  # O_DIRECT: the 4 KiB-aligned superset of each run of adjacent tensors, no more
        aligned = 0
        for layer in store.layers:
            for e in range(store.num_experts):
                for s in store.segments(layer, e):
                    aligned += (-(-(s.offset + s.nbytes) // 4096) - s.offset // 4096) * 4096
        assert (stats["misses"] * store.layout.payload_bytes <= stats["bytes_read"] <= aligned)


@pytest.fixture(scope="module", params=LAYOUTS, ids=[mt for mt, _ in LAYOUTS])
def saved(request, tmp_path_factory):
    model_type, dtype = request.param
    model = hf_tiny.build(model_type).to(dtype)
    root = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    return model, root


@pytest.mark.parametrize("variant", ["single", "sharded"])
def test_checkpoint_round_trip_is_byte_exact(saved, variant):
    model, root = saved
    want = _expected(model)
    store = ExpertStore.from_checkpoint(root / variant)
    assert store.model_type == model.config.model_type
    assert store.layers == tuple(b.layer_idx for b in find_moe_blocks(model))
    if variant == "sharded":
        assert len(store.files) > 1
    for (layer, e), tensors in want.items():
        _assert_bytes_equal(store.expert_tensors(layer, e), tensors, f"layer {layer} expert {e}")
    _assert_pool_bytes_equal(store, want)


def test_packed_round_trip_is_byte_exact(saved):
    model, root = saved
    want = _expected(model)
    out = ExpertStore.from_checkpoint(root / "sharded").pack(root / "experts.remoe",
                                                             progress=False)
    packed = ExpertStore.from_packed(out)
    packed.verify()
    raw = out.read_bytes()
    assert raw[:8] == PACK_MAGIC
    for (layer, e), tensors in want.items():
        seg = packed.segments(layer, e)[0]
        assert seg.offset % ALIGN == 0 and seg.nbytes == packed.layout.slot_bytes
        _assert_bytes_equal(packed.expert_tensors(layer, e), tensors, f"layer {layer} expert {e}")
    _assert_pool_bytes_equal(packed, want)
    _assert_pool_bytes_equal(packed, want, o_direct=True)  # tmp_path is on a disk filesystem


def test_host_tier_from_model_and_take(saved):
    model, _ = saved
    want = _expected(model)
    store = ExpertStore.from_model(model)
    assert store.tier == "host" and store.host_blobs.shape == (
        len(store.layers) * store.num_experts, store.layout.slot_bytes)
    for (layer, e), tensors in want.items():
        _assert_bytes_equal(store.expert_tensors(layer, e), tensors, f"layer {layer} expert {e}")
    _assert_pool_bytes_equal(store, want)

    copy = hf_tiny.build(model.config.model_type).to(model.dtype)
    taken = ExpertStore.from_model(copy, take=True)
    assert torch.equal(taken.host_blobs, ExpertStore.from_model(model).host_blobs)
    for block in find_moe_blocks(copy):
        assert block.experts.gate_up_proj.is_meta and block.experts.down_proj.is_meta
    with pytest.raises(ValueError, match="meta device"):
        ExpertStore.from_model(copy)


def test_slot_layout_offsets_and_views():
    model = hf_tiny.build("gpt_oss").to(torch.bfloat16)
    layout = ExpertStore.from_model(model).layout
    names = [t.name for t in layout.tensors]
    assert names == ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]
    H, I2 = model.config.hidden_size, 2 * model.config.intermediate_size
    assert [t.shape for t in layout.tensors] == [(H, I2), (I2,), (I2 // 2, H), (H,)]
    assert all(t.offset % 256 == 0 for t in layout.tensors) and layout.slot_bytes % ALIGN == 0
    buf = torch.zeros(2, layout.slot_bytes, dtype=torch.uint8)
    views = layout.views(buf)  # batched views share memory with the buffer
    views["down_proj_bias"][1].fill_(1.0)
    assert buf[0].sum() == 0 and buf[1].sum() > 0


def test_header_offsets_match_safetensors(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3),
               "b": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "x.safetensors")
    header = read_safetensors_header(tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    for key, tensor in tensors.items():
        info = header[key]
        assert info.shape == tuple(tensor.shape)
        assert raw[info.offset : info.offset + info.nbytes] == tensor.numpy().tobytes()


# ------------------------------------------------------------------------------------- errors


@pytest.fixture()
def qwen_ckpt(tmp_path):
    model = hf_tiny.build("qwen3_moe")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")
    return tmp_path / "ckpt"


def _expert_shard(ckpt, key_part="layers.2.mlp.experts.5.up_proj"):
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in weight_map if key_part in k)
    return key, ckpt / weight_map[key]


def test_missing_shard_names_the_shard(qwen_ckpt):
    key, shard = _expert_shard(qwen_ckpt)
    shard.unlink()
    with pytest.raises(StoreError, match=rf"shard '{shard}' is missing.*'model\.layers\."):
        ExpertStore.from_checkpoint(qwen_ckpt)


def test_truncated_shard_names_file_and_tensor(qwen_ckpt):
    key, shard = _expert_shard(qwen_ckpt)
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(StoreError, match=rf"'{shard}' is truncated: tensor '.*' ends at byte"):
        ExpertStore.from_checkpoint(qwen_ckpt)


def test_corrupt_header_names_file(qwen_ckpt):
    _, shard = _expert_shard(qwen_ckpt)
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"\xff\xfe{]"
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"'{shard}' has a corrupt safetensors header"):
        ExpertStore.from_checkpoint(qwen_ckpt)


def test_dtype_mismatch_names_tensor_and_file(qwen_ckpt):
    key, shard = _expert_shard(qwen_ckpt)
    tensors = load_file(shard)
    tensors[key] = tensors[key].half()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(StoreError, match=rf"dtype mismatch: tensor '{key}' in '{shard}' is F16"):
        ExpertStore.from_checkpoint(qwen_ckpt)


def test_missing_expert_tensor_is_named(qwen_ckpt):
    key, shard = _expert_shard(qwen_ckpt)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = qwen_ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(StoreError, match=r"layer 2 expert 5: missing tensor .*up_proj"):
        ExpertStore.from_checkpoint(qwen_ckpt)


def test_unsupported_family_and_missing_config(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(StoreError, match="config.json' does not exist"):
        ExpertStore.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotImplementedError, match="'llama'.*ExpertsInterface"):
        ExpertStore.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(StoreError, match="no routed expert tensors of the 'qwen3_moe' layout"):
        ExpertStore.from_checkpoint(tmp_path)


@pytest.fixture()
def packed_file(qwen_ckpt):
    return ExpertStore.from_checkpoint(qwen_ckpt).pack(qwen_ckpt.parent / "x.remoe",
                                                       progress=False)


def test_packed_file_errors_name_the_file(packed_file):
    raw = packed_file.read_bytes()
    store = ExpertStore.from_packed(packed_file)
    blob = store.layout.slot_bytes
    packed_file.write_bytes(raw[: len(raw) - blob - 5])  # the last two blobs incomplete
    last = store.layers[-1]
    with pytest.raises(StoreError, match=rf"'{packed_file}' is truncated: .*expert blob \(layer "
                       rf"{last}, expert {store.num_experts - 2}\)"):
        ExpertStore.from_packed(packed_file)
    packed_file.write_bytes(b"NOTREMOE" + raw[8:])
    with pytest.raises(StoreError, match=rf"'{packed_file}' is not a remoe packed expert file"):
        ExpertStore.from_packed(packed_file)
    packed_file.write_bytes(raw[:8] + struct.pack("<I", 99) + raw[12:])
    with pytest.raises(StoreError, match=r"format version 99; this remoe-engine reads versions "
                       "2 and 3: upgrade remoe-engine"):
        ExpertStore.from_packed(packed_file)
    packed_file.write_bytes(raw[:20] + b"}" + raw[21:])  # the JSON starts after the 20-byte prefix
    with pytest.raises(StoreError, match=rf"'{packed_file}' has a corrupt header"):
        ExpertStore.from_packed(packed_file)
    corrupt = bytearray(raw)
    seg = store.segments(store.layers[1], 3)[0]
    corrupt[seg.offset + 10] ^= 0xFF
    packed_file.write_bytes(bytes(corrupt))
    with pytest.raises(StoreError, match=rf"is corrupt: expert blob \(layer {store.layers[1]}, "
                       r"expert 3\) has CRC32C"):
        ExpertStore.from_packed(packed_file).verify()


def test_pack_is_atomic_on_failure(qwen_ckpt, tmp_path):
    store = ExpertStore.from_checkpoint(qwen_ckpt)
    _, shard = _expert_shard(qwen_ckpt, "layers.3.mlp.experts.7.down_proj")
    os.truncate(shard, 8)  # the store already holds the ranges: the read fails mid-pack
    out = tmp_path / "out.remoe"
    tensor = r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+\.weight"
    with pytest.raises(StoreError, match=rf"'{shard}' is truncated: '{tensor}' needs bytes"):
        store.pack(out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.remoe.tmp-*"))


def test_pack_cli(qwen_ckpt, tmp_path, capsys):
    out = tmp_path / "cli.remoe"
    assert cli.main(["pack", str(qwen_ckpt), str(out), "--no-progress", "--verify"]) == 0
    assert "wrote" in capsys.readouterr().out and ExpertStore.from_packed(out).num_experts == 8
    assert cli.main(["pack", str(qwen_ckpt), str(out), "--no-progress"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli.main(["pack", str(tmp_path / "nope"), str(tmp_path / "y.remoe")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_layers_past_num_hidden_layers_are_ignored(tmp_path):
    # DeepSeek-V3 checkpoints keep a multi-token-prediction layer (61) that transformers skips.
    model = hf_tiny.build("qwen3_moe")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    block = find_moe_blocks(model)[0].experts
    extra = {f"model.layers.4.mlp.experts.{e}.{name}.weight": t[e].contiguous()
             for e in range(8) for name, t in (("gate_proj", block.gate_up_proj[:, :32]),
                                               ("up_proj", block.gate_up_proj[:, 32:]),
                                               ("down_proj", block.down_proj))}
    save_file({k: v.detach() for k, v in extra.items()}, tmp_path / "mtp.safetensors")
    index = tmp_path / "model.safetensors.index.json"  # the MTP shard is part of the checkpoint
    data = json.loads(index.read_text())
    data["weight_map"].update(dict.fromkeys(extra, "mtp.safetensors"))
    index.write_text(json.dumps(data))
    assert ExpertStore.from_checkpoint(tmp_path).layers == (0, 1, 2, 3)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    assert ExpertStore.from_checkpoint(tmp_path).layers == (0, 1, 2, 3, 4)  # it was seen
