"""Faults in expert storage: corrupt, changed or mismatched input is a clear one-line error, never
silently wrong output, never a hang, and never a half-written file.

Each test reproduces one fault: packed format version 2 (keyed CRC32C per blob, a checksummed
header), safetensors header rules, the checkpoint files transformers would load, non-regular
files, and `remoe pack` write failures and stale temporary files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import hf_tiny
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_store import _assert_bytes_equal, _expected, crc32c_ref
from transformers import AutoModelForCausalLM

import remoe_engine
from remoe_engine import cli
from remoe_engine.store import ExpertStore, StoreError, read_safetensors_header

PREFIX = struct.Struct("<8sIII")  # magic, version, JSON length, CRC32C of the JSON (format v2)


@pytest.fixture(scope="module")
def model():
    return hf_tiny.build("qwen3_moe")


@pytest.fixture()
def single(tmp_path, model):
    """A checkpoint with one model.safetensors."""
    model.save_pretrained(tmp_path / "single")
    return tmp_path / "single"


@pytest.fixture()
def sharded(tmp_path, model):
    """A checkpoint with model.safetensors.index.json and several shards."""
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    return tmp_path / "sharded"


@pytest.fixture()
def packed(tmp_path, single):
    return ExpertStore.from_checkpoint(single).pack(tmp_path / "x.remoe", progress=False)


def _read_packed_header(path: Path) -> dict:
    raw = path.read_bytes()
    _, _, n, _ = PREFIX.unpack_from(raw)
    return json.loads(raw[PREFIX.size : PREFIX.size + n])


def _write_packed_header(path: Path, header: dict, version: int = 2) -> None:
    """Replace a packed file's header with `header`, checksummed, the blobs left as they are."""
    raw = bytearray(path.read_bytes())
    text = json.dumps(header).encode()
    start = _read_packed_header(path)["data_offset"]
    assert PREFIX.size + len(text) <= start
    head = PREFIX.pack(b"REMOEPAK", version, len(text), crc32c_ref(text)) + text
    raw[:start] = head.ljust(start, b"\0")
    path.write_bytes(bytes(raw))


def _within(seconds: float, fn, *args):
    """Run fn(*args) in a daemon thread; fail (instead of hanging the suite) past the deadline."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001  (re-raised in the test's thread)
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds}s: it hangs")
    if "error" in result:
        raise result["error"]
    return result.get("value")


# ----------------------------------------------------------------- packed format v2, checksums


def test_packed_v2_matches_its_specification(packed):
    raw = packed.read_bytes()
    magic, version, n, header_crc = PREFIX.unpack_from(raw)
    assert (magic, version) == (b"REMOEPAK", 2)
    text = raw[PREFIX.size : PREFIX.size + n]
    assert header_crc == crc32c_ref(text)
    header = json.loads(text)
    store = ExpertStore.from_packed(packed)
    sums = store.blob_checksums()
    E, slot = header["num_experts"], header["slot_bytes"]
    assert sums.dtype == torch.int64 and sums.shape == (len(header["layers"]) * E, 2)
    assert len(header["crc32c"]) == len(header["layers"]) * E
    for i, layer in enumerate(header["layers"]):
        for e in range(E):
            at = header["data_offset"] + (i * E + e) * slot
            key = struct.pack("<qq", layer, e)
            want = crc32c_ref(key + raw[at : at + slot])
            assert sums[i * E + e].tolist() == [crc32c_ref(key), want], (layer, e)
            assert header["crc32c"][i * E + e] == f"{want:08x}"
    assert len(raw) == header["data_offset"] + len(header["layers"]) * E * slot


def test_only_packed_stores_have_checksums(single, model):
    assert ExpertStore.from_checkpoint(single).blob_checksums() is None
    assert ExpertStore.from_model(model, pin_memory=False).blob_checksums() is None


def test_reversed_layers_are_refused(packed):
    header = _read_packed_header(packed)
    header["layers"] = header["layers"][::-1]
    _write_packed_header(packed, header)
    with pytest.raises(StoreError, match=rf"'{packed}' has a corrupt header: layers \[3, 2, 1, 0\] "
                       "must be distinct ascending"):
        ExpertStore.from_packed(packed)


@pytest.mark.parametrize("relabel", ["layers shifted", "experts swapped"])
def test_relabelled_blobs_fail_verify(packed, relabel):
    # A consistent header whose labels lie: under unkeyed checksums every blob still checked out.
    header = _read_packed_header(packed)
    store = ExpertStore.from_packed(packed)
    if relabel == "layers shifted":  # blob (layer 0, e) now claims to be (layer 1, e), and so on
        header["layers"] = [layer + 1 for layer in header["layers"]]
        first = f"layer {header['layers'][0]}, expert 0"
    else:  # swap the blobs of experts 0 and 1 of the first layer, with their checksums
        raw = bytearray(packed.read_bytes())
        a, b = (store.segments(store.layers[0], e)[0] for e in (0, 1))
        raw[a.offset : a.offset + a.nbytes], raw[b.offset : b.offset + b.nbytes] = (
            raw[b.offset : b.offset + b.nbytes], raw[a.offset : a.offset + a.nbytes])
        packed.write_bytes(bytes(raw))
        header["crc32c"][0], header["crc32c"][1] = header["crc32c"][1], header["crc32c"][0]
        first = f"layer {store.layers[0]}, expert 0"
    _write_packed_header(packed, header)
    relabelled = ExpertStore.from_packed(packed)
    with pytest.raises(StoreError, match=rf"'{packed}' is corrupt: expert blob \({first}\) has "
                       r"CRC32C [0-9a-f]{8}, the header says [0-9a-f]{8}"):
        relabelled.verify()


def test_every_flipped_header_bit_is_an_error(packed):
    raw = packed.read_bytes()
    _, _, n, _ = PREFIX.unpack_from(raw)
    ExpertStore.from_packed(packed)
    fd = os.open(packed, os.O_WRONLY)
    try:
        for at in range(PREFIX.size + n):
            for bit in (0x01, 0x40):
                os.pwrite(fd, bytes([raw[at] ^ bit]), at)
                with pytest.raises(StoreError, match=rf"'{packed}'"):
                    ExpertStore.from_packed(packed)
            os.pwrite(fd, raw[at : at + 1], at)
    finally:
        os.close(fd)


def test_flipped_header_byte_message(packed):
    raw = bytearray(packed.read_bytes())
    at = raw.index(b'"layers": [0, 1, 2, 3]') + len(b'"layers": [0, 1, 2, ')
    raw[at] = ord("5")  # still valid JSON of the right shape: only the checksum can tell
    packed.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"'{packed}' has a corrupt header: its CRC32C is "
                       r"[0-9a-f]{8}, the prefix says [0-9a-f]{8}"):
        ExpertStore.from_packed(packed)


@pytest.mark.parametrize(("version", "match"), [
    (1, r"packed format version 1, written by an earlier remoe-engine .*re-run `remoe pack`"),
    (0, r"packed format version 0.*re-run `remoe pack`"),
    (4, r"packed format version 4; this remoe-engine reads versions 2 and 3: upgrade "
        "remoe-engine"),
    # A version 2 file relabelled 3 (compressed blobs) lacks their layout.
    (3, r"a corrupt header: no 'compressed' field"),
])
def test_other_format_versions_are_refused(packed, version, match):
    raw = bytearray(packed.read_bytes())
    raw[8:12] = struct.pack("<I", version)
    packed.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"'{packed}' has {match}"):
        ExpertStore.from_packed(packed)


def test_version_1_file_is_refused(packed):
    # A real version 1 file: 16-byte prefix, unkeyed zlib CRC-32 per blob.
    header = _read_packed_header(packed)
    header["version"] = 1
    header["crc32"] = header.pop("crc32c")
    text = json.dumps(header).encode()
    raw = bytearray(packed.read_bytes())
    raw[: header["data_offset"]] = (struct.pack("<8sII", b"REMOEPAK", 1, len(text)) + text).ljust(
        header["data_offset"], b"\0")
    packed.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"version 1, written by an earlier remoe-engine"):
        ExpertStore.from_packed(packed)


@pytest.mark.parametrize(("fault", "match"), [
    ("not hex", r"crc32c\[5\] is 'zzzzzzzz', not 8 hex digits"),
    ("signed", r"crc32c\[5\] is '\+1234567', not 8 hex digits"),
    ("underscore", r"crc32c\[5\] is '1234_567', not 8 hex digits"),
    ("not a string", r"crc32c\[5\] is 305419896, not 8 hex digits"),
    ("one missing", r"31 CRC32C checksums for 4 x 8 expert blobs"),
    ("not a list", r"crc32c is not a list"),
    ("absent", r"no 'crc32c'"),
])
def test_checksum_field_faults(packed, fault, match):
    header = _read_packed_header(packed)
    crcs = header["crc32c"]
    if fault in ("not hex", "signed", "underscore", "not a string"):
        crcs[5] = {"not hex": "zzzzzzzz", "signed": "+1234567", "underscore": "1234_567",
                   "not a string": 0x12345678}[fault]
    elif fault == "one missing":
        crcs.pop()
    elif fault == "not a list":
        header["crc32c"] = "".join(crcs)
    else:
        del header["crc32c"]
    _write_packed_header(packed, header)
    with pytest.raises(StoreError, match=rf"'{packed}' has a corrupt header: {match}"):
        ExpertStore.from_packed(packed)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("layers", [0, 1, 1, 3], r"layers .* must be distinct ascending"),
    ("layers", [0, 1, True, 3], r"layers .* must be distinct ascending"),
    ("layers", "0123", r"layers .* must be distinct ascending"),
    ("num_experts", 0, r"num_experts must be a positive integer"),
    ("num_experts", 8.0, r"num_experts must be a positive integer"),
    ("dtype", "Tensor", r"dtype 'Tensor' is not a torch dtype"),
    ("slot_bytes", 4095, r"slot_bytes 4095 is not a multiple of 4096"),
    ("data_offset", 4097, r"data_offset 4097 is not a multiple of 4096"),
])
def test_header_field_faults(packed, field, value, match):
    header = _read_packed_header(packed)
    header[field] = value
    _write_packed_header(packed, header)
    with pytest.raises(StoreError, match=rf"'{packed}' has a corrupt header: .*{match}"):
        ExpertStore.from_packed(packed)


@pytest.mark.parametrize("size", [0, 10, 19, 30])
def test_truncated_prefix_or_header_says_truncated(packed, size):
    packed.write_bytes(packed.read_bytes()[:size])
    with pytest.raises(StoreError, match=rf"'{packed}' is truncated: {size} bytes"):
        ExpertStore.from_packed(packed)


def test_bytes_after_the_last_blob_are_an_error(packed):
    with open(packed, "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(StoreError, match=rf"'{packed}' has 4096 bytes after its last expert blob"):
        ExpertStore.from_packed(packed)


# ----------------------------------------------------------------- safetensors header rules

A4 = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}


def _safetensors(path: Path, header: dict, data: int) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(range(256)) * (data // 256)
                     + bytes(data % 256))
    return path


BAD_HEADERS = {
    "dtype not a string": ({"a": {**A4, "dtype": 5}}, 4, r"tensor 'a': dtype 5 is not a string"),
    "unknown dtype": ({"a": {**A4, "dtype": "X9"}}, 4, r"tensor 'a': unknown dtype 'X9'"),
    "shape not a list": ({"a": {**A4, "shape": "4"}}, 4, r"tensor 'a': shape '4' is not a list"),
    "negative dim": ({"a": {**A4, "shape": [-4]}}, 4, r"tensor 'a': shape \[-4\] is not a list "
                     "of non-negative integers"),
    "float dim": ({"a": {**A4, "shape": [4.0]}}, 4, r"shape \[4\.0\] is not a list of non-neg"),
    "bool dim": ({"a": {**A4, "dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1,
                 r"shape \[True\] is not a list of non-negative integers"),
    "three offsets": ({"a": {**A4, "data_offsets": [0, 4, 4]}}, 4,
                      r"data_offsets \[0, 4, 4\] is not a list of two non-negative integers"),
    "float offset": ({"a": {**A4, "data_offsets": [0, 4.0]}}, 4, r"data_offsets \[0, 4\.0\]"),
    "string offset": ({"a": {**A4, "data_offsets": ["0", 4]}}, 4, r"data_offsets \['0', 4\]"),
    "bool offset": ({"a": {**A4, "dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1,
                    r"data_offsets \[False, True\]"),
    "missing field": ({"a": {"dtype": "U8", "shape": [4]}}, 4, r"tensor 'a': no data_offsets"),
    "entry not an object": ({"a": [1]}, 0, r"tensor 'a': \[1\] is not an object"),
    "metadata not strings": ({"a": A4, "__metadata__": {"format": 1}}, 4,
                             r"__metadata__ must map strings to strings"),
    "size mismatch": ({"a": {**A4, "shape": [3]}}, 4, r"tensor 'a' spans data bytes 0\.\.4 but "
                      r"shape \[3\] of U8 needs 3"),
    "sub-byte end": ({"a": {**A4, "dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2,
                     r"tensor 'a': 3 F4 elements do not end on a byte boundary"),
    "overlap": ({"a": A4, "b": {**A4, "data_offsets": [2, 6]}}, 6,
                r"tensors 'a' \(data bytes 0\.\.4\) and 'b' \(data bytes 2\.\.6\) overlap"),
    "same bytes": ({"b": A4, "a": A4}, 4,
                   r"tensors 'a' \(data bytes 0\.\.4\) and 'b' \(data bytes 0\.\.4\) overlap"),
    "gap": ({"a": A4, "b": {**A4, "data_offsets": [6, 10]}}, 10,
            r"data bytes 4\.\.6 belong to no tensor \(between 'a' and 'b'\)"),
    "not from 0": ({"a": {**A4, "data_offsets": [2, 6]}}, 6,
                   r"data bytes 0\.\.2 belong to no tensor \(before 'a'\)"),
    "bytes after": ({"a": A4}, 5, r"data bytes 4\.\.5 belong to no tensor \(after 'a'\)"),
    "truncated": ({"a": A4, "b": {**A4, "data_offsets": [4, 8]}}, 7,
                  r"tensor 'b' ends at byte \d+ but the file has \d+ bytes"),
    "end before begin": ({"a": {**A4, "shape": [0], "data_offsets": [4, 0]}}, 4,
                         r"tensor 'a': data_offsets \[4, 0\] end before they begin"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_bad_safetensors_headers_are_refused(tmp_path, case):
    header, data, match = BAD_HEADERS[case]
    path = _safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(Exception):  # noqa: B017  (the safetensors library refuses it too)
        safe_open(path, framework="pt")
    with pytest.raises(StoreError, match=rf"'{path}'(: | is truncated: ).*{match}"):
        read_safetensors_header(path)


GOOD_HEADERS = {
    "other dtypes": ({"a": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]},
                      "b": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [4, 8]}}, 8),
    "sub-byte": ({"a": {"dtype": "F4", "shape": [2, 2], "data_offsets": [0, 2]}}, 2),
    "empty tensors": ({"a": {**A4, "shape": [0], "data_offsets": [0, 0]}, "b": A4,
                       "c": {**A4, "shape": [2, 0], "data_offsets": [4, 4]}}, 4),
    "extra fields": ({"a": {**A4, "note": "x"}, "__metadata__": None}, 4),
    "no tensors": ({"__metadata__": {"format": "pt"}}, 0),
}


@pytest.mark.parametrize("case", GOOD_HEADERS, ids=list(GOOD_HEADERS))
def test_valid_safetensors_headers_are_read(tmp_path, case):
    header, data = GOOD_HEADERS[case]
    path = _safetensors(tmp_path / "x.safetensors", header, data)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    infos = read_safetensors_header(path)
    assert set(infos) == keys
    for key, info in infos.items():
        begin, end = header[key]["data_offsets"]
        assert (info.offset, info.nbytes) == (path.stat().st_size - data + begin, end - begin)


def test_expert_tensors_of_an_unread_dtype_are_named(tmp_path):
    hf_tiny.build("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {k: v.view(torch.uint16) if ".experts." in k else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StoreError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.0\.\w+\.weight'"
                       r" in '.*model\.safetensors' has dtype U16, which remoe-engine does not"):
        ExpertStore.from_checkpoint(tmp_path)


# ---------------------------------------------------------- which files a checkpoint is made of


def _hf_experts(directory: Path) -> dict:
    """What transformers' from_pretrained loads for each expert: the reference."""
    return _expected(AutoModelForCausalLM.from_pretrained(directory))


def _assert_store_is(store: ExpertStore, want: dict) -> None:
    for (layer, e), tensors in want.items():
        _assert_bytes_equal(store.expert_tensors(layer, e), tensors, f"layer {layer} expert {e}")


def test_stray_safetensors_beside_model_safetensors_is_ignored(single, tmp_path):
    hf_tiny.build("qwen3_moe", seed=1).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", single / "zz_backup.safetensors")
    want = _hf_experts(single)
    store = ExpertStore.from_checkpoint(single)
    assert store.files == [str(single / "model.safetensors")]
    _assert_store_is(store, want)


def test_model_safetensors_wins_over_an_index_as_in_transformers(sharded, tmp_path):
    hf_tiny.build("qwen3_moe", seed=1).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", sharded / "model.safetensors")
    want = _hf_experts(sharded)
    store = ExpertStore.from_checkpoint(sharded)
    assert store.files == [str(sharded / "model.safetensors")]
    _assert_store_is(store, want)


def test_stray_shard_beside_an_index_is_ignored(sharded, tmp_path):
    hf_tiny.build("qwen3_moe", seed=1).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", sharded / "zz-backup.safetensors")
    want = _hf_experts(sharded)
    store = ExpertStore.from_checkpoint(sharded)
    assert str(sharded / "zz-backup.safetensors") not in store.files
    _assert_store_is(store, want)


def test_transformers_weights_in_config_picks_the_file(single, tmp_path):
    hf_tiny.build("qwen3_moe", seed=1).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", single / "chosen.safetensors")
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config,
                                                     "transformers_weights": "chosen.safetensors"}))
    want = _hf_experts(single)
    store = ExpertStore.from_checkpoint(single)
    assert store.files == [str(single / "chosen.safetensors")]
    _assert_store_is(store, want)


def test_no_weights_file_names_the_directory_and_lists_what_is_there(single):
    (single / "model.safetensors").rename(single / "weights.safetensors")
    with pytest.raises(StoreError, match=rf"'{single}' has neither model\.safetensors nor "
                       r"model\.safetensors\.index\.json.*\(\.safetensors files there: "
                       r"weights\.safetensors\)"):
        ExpertStore.from_checkpoint(single)


def test_a_tensor_in_two_shards_is_an_error(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if "layers.1.mlp.experts.2.down_proj" in k)
    other = next(s for s in sorted(set(index.values())) if s != index[key])
    tensors = load_file(sharded / other)
    tensors[key] = torch.zeros_like(load_file(sharded / index[key])[key])
    save_file(tensors, sharded / other, metadata={"format": "pt"})
    first, second = sorted([index[key], other])
    with pytest.raises(StoreError, match=rf"tensor '{key}' is in both '.*{first}' and "
                       rf"'.*{second}'"):
        ExpertStore.from_checkpoint(sharded)


# ----------------------------------------------------------------------- non-regular files

KINDS = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}


def _replace_with(path: Path, kind: str, request) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)

        def unblock():  # lets a thread stuck in open() go, if a regression left one there
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

        request.addfinalizer(unblock)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/null")  # /dev/zero would be endless (a regression: out of memory)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["shard", "index", "config", "single file", "packed",
                                    "read_expert"])
def test_non_regular_files_are_refused_at_once(sharded, single, tmp_path, kind, target, request):
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shard_key = next(k for k in weight_map if "layers.2.mlp.experts.5.up_proj" in k)
    shard = sharded / weight_map[shard_key]
    if target == "packed":
        path = ExpertStore.from_checkpoint(single).pack(tmp_path / "x.remoe", progress=False)
        call = lambda: ExpertStore.from_packed(path)  # noqa: E731
    elif target == "read_expert":
        store = ExpertStore.from_checkpoint(sharded)
        path = shard
        call = lambda: store.read_expert(2, 5)  # noqa: E731
    else:
        path = {"shard": shard, "index": sharded / "model.safetensors.index.json",
                "config": sharded / "config.json",
                "single file": single / "model.safetensors"}[target]
        ckpt = single if target == "single file" else sharded
        call = lambda: ExpertStore.from_checkpoint(ckpt)  # noqa: E731
    _replace_with(path, kind, request)
    with pytest.raises(StoreError, match=rf"'{path}' is {KINDS[kind]}, not a regular file"):
        _within(10, call)


# ------------------------------------------------------------------ `remoe pack` write faults


def _tmp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp-*"))


def _pack_subprocess(args: list[str], *, preexec_fn=None, prelude: str = "", cwd=None,
                     wait: bool = True):
    """Run `remoe pack ARGS` in a fresh interpreter (`prelude` runs first)."""
    script = "import sys\n" + textwrap.dedent(prelude) + textwrap.dedent("""
        from remoe_engine.cli import main
        sys.exit(main(["pack", *sys.argv[1:]]))
    """)
    package_root = os.path.dirname(os.path.dirname(remoe_engine.__file__))
    command = [sys.executable, "-c", script, *args]
    env = {**os.environ, "PYTHONPATH": package_root, "PYTHONDONTWRITEBYTECODE": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, preexec_fn=preexec_fn,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, preexec_fn=preexec_fn, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(stderr: str, match: str) -> None:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("remoe pack: error: "), stderr
    assert re.search(match, lines[0]), (match, lines[0])


@pytest.mark.slow
def test_file_too_large_is_one_line_and_leaves_nothing(single, tmp_path):
    out = tmp_path / "big.remoe"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = _pack_subprocess([str(single), str(out), "--no-progress"],
                              preexec_fn=limit_file_size, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    _one_line_error(result.stderr, rf"cannot write '{out}': File too large \(EFBIG\)")
    assert not out.exists() and _tmp_files(tmp_path) == []


def _without_permission_override():
    """In the child before exec: root loses the capabilities that let it ignore permissions."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP: gone after exec too
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow
def test_permission_denied_is_one_line_and_leaves_nothing(single, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)  # a read-only directory
    out = tmp_path / "ro" / "x.remoe"
    try:
        preexec_fn = _without_permission_override if os.geteuid() == 0 else None
        if preexec_fn is None and os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("this user can write to a read-only directory")
        result = _pack_subprocess([str(single), str(out), "--no-progress"],
                                  preexec_fn=preexec_fn, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        _one_line_error(result.stderr, rf"cannot write '{out}': Permission denied \(EACCES\)")
        assert os.listdir(tmp_path / "ro") == []
    finally:
        os.chmod(tmp_path / "ro", 0o755)


WRITE_FAULTS = {  # (os function, errno, which call fails)
    "read-only filesystem": ("open", errno.EROFS, 1),
    "disk full": ("pwrite", errno.ENOSPC, 3),
    "file too large": ("pwrite", errno.EFBIG, 2),
    "I/O error at fsync": ("fsync", errno.EIO, 1),
    "rename fails": ("replace", errno.EXDEV, 1),
}


@pytest.mark.parametrize("fault", WRITE_FAULTS, ids=list(WRITE_FAULTS))
def test_write_failures_are_one_line_and_keep_the_old_file(single, tmp_path, monkeypatch, capsys,
                                                           fault):
    name, code, nth = WRITE_FAULTS[fault]
    out = tmp_path / "x.remoe"
    out.write_bytes(b"the previous file")
    real, calls = getattr(os, name), []

    def failing(*args, **kwargs):
        if name != "open" or ".tmp-" in str(args[0]):  # the temporary file, not a checkpoint
            calls.append(args)
            if len(calls) == nth:
                raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)
    assert cli.main(["pack", str(single), str(out), "--no-progress", "--force"]) == 2
    monkeypatch.undo()
    _one_line_error(capsys.readouterr().err, rf"cannot write '{out}': {os.strerror(code)} "
                    rf"\({errno.errorcode[code]}\)")
    assert out.read_bytes() == b"the previous file" and _tmp_files(tmp_path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_pack_never_replaces_what_is_not_a_regular_file(single, tmp_path, capsys, kind, request):
    out = tmp_path / "x.remoe"
    out.write_bytes(b"")
    _replace_with(out, kind, request)
    assert cli.main(["pack", str(single), str(out), "--no-progress", "--force"]) == 2
    _one_line_error(capsys.readouterr().err, rf"cannot write '{out}': it is {KINDS[kind]}, not "
                    "a regular file")
    assert os.path.lexists(out) and not out.is_file() and _tmp_files(tmp_path) == []


def test_pack_api_raises_store_error_on_a_full_disk(single, tmp_path, monkeypatch):
    store = ExpertStore.from_checkpoint(single)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreError, match=r"cannot write '.*y\.remoe': No space left on device"):
        store.pack(tmp_path / "y.remoe", progress=False)
    assert list(tmp_path.glob("*y.remoe*")) == []


@pytest.mark.slow
def test_sigkilled_pack_leaves_a_temp_file_the_next_pack_removes(single, tmp_path, capsys):
    out, marker = tmp_path / "x.remoe", tmp_path / "reading"
    # The pack stalls after two blobs, so the kill lands mid-write however fast the disk is.
    prelude = f"""
        import time
        from pathlib import Path
        from remoe_engine.store import ExpertStore
        read, calls = ExpertStore.read_expert, []
        def slow(self, layer, expert):
            calls.append(1)
            if len(calls) == 3:
                Path({str(marker)!r}).touch()
                time.sleep(600)
            return read(self, layer, expert)
        ExpertStore.read_expert = slow
    """
    proc = _pack_subprocess([str(single), str(out), "--no-progress"], prelude=prelude,
                            cwd=tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pack never started writing"
            time.sleep(0.05)
        temp = tmp_path / f".x.remoe.tmp-{proc.pid}"
        assert temp.exists() and temp.stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _tmp_files(tmp_path) == [temp] and not out.exists()  # what a SIGKILL leaves behind

    assert cli.main(["pack", str(single), str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"removed stale temporary file '{temp}' (left by process {proc.pid}, " in err
    assert _tmp_files(tmp_path) == []
    ExpertStore.from_packed(out).verify()


def test_stale_temp_files_of_dead_processes_only_are_removed(single, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = tmp_path / f".x.remoe.tmp-{dead.pid}"
        keep = [tmp_path / f".x.remoe.tmp-{live.pid}",  # a pack still running: never touched
                tmp_path / ".x.remoe.tmp-notapid", tmp_path / f".y.remoe.tmp-{dead.pid}"]
        for path in [stale, *keep]:
            path.write_bytes(b"partial")
        out = tmp_path / "x.remoe"
        assert cli.main(["pack", str(single), str(out), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert f"removed stale temporary file '{stale}' (left by process {dead.pid}, " in err
        assert not stale.exists() and all(path.exists() for path in keep)
        assert err.count("removed stale") == 1
    finally:
        live.kill()
        live.wait()


def test_pack_verify_and_help_use_crc32c(single, tmp_path, capsys):
    out = tmp_path / "v.remoe"
    assert cli.main(["pack", str(single), str(out), "--no-progress", "--verify"]) == 0
    raw = bytearray(out.read_bytes())
    raw[-1] ^= 0xFF  # one weight of the last expert: only its checksum can tell
    out.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"expert blob \(layer 3, expert 7\) has CRC32C"):
        ExpertStore.from_packed(out).verify()
    with pytest.raises(SystemExit):
        cli.main(["pack", "--help"])
    help_text = capsys.readouterr().out
    assert "CRC32C" in help_text and "CRC-32" not in help_text
