"""Attacks on what hfcompress loads: damaged, tampered and truncated files of every format, edited configs, crafted
lossless headers and memory bombs. A load either refuses with a clear error naming the file and tensor, or
gives exactly the weights that were saved: never wrong weights in silence.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import pytest
import torch
from fixtures.files import tree_hash
from fixtures.hub_server import local_hub  # noqa: F401  (fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.checkpoint import CheckpointError, data_start, read_header
from hfcompress.hub import push_to_hub
from hfcompress.inspection import inspect_checkpoint
from hfcompress.integrity import IntegrityError
from hfcompress.lossless import LosslessFormatError, codec, coder
from hfcompress.testing.models import tiny_llama

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
FORMATS = {
    "packed-asym": HfCompressConfig(bits=4, group_size=32, symmetric=False),
    "bitmask": HfCompressConfig(method="magnitude", sparsity=0.5, bits=4, group_size=32),
    "nm": HfCompressConfig(method="magnitude", sparsity_structure="2:4"),
    "lossless": HfCompressConfig(bits=4, group_size=32, lossless=True),
}
UNVERIFIED = HfCompressConfig.loading(verify_checksums=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per format, with the logits it must reload to."""
    out = {}
    for name, cfg in FORMATS.items():
        model = hfcompress.compress(tiny_llama(), cfg)
        folder = tmp_path_factory.mktemp(name) / "ckpt"
        model.save_pretrained(folder)
        with torch.no_grad():
            out[name] = (folder, model(IDS).logits)
    return out


def _copy(saved, name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(saved[name][0], folder)
    return folder


def _logits(folder, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        return model(IDS).logits


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata=meta)


# ---------------------------------------------------------------------------------------------- tampered data
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_saved_format_reloads_exactly_and_verified(saved, fmt):
    folder, logits = saved[fmt]
    assert torch.equal(_logits(folder), logits)
    assert inspect_checkpoint(folder)["verified"]


@pytest.mark.parametrize("tensor", ["weight_packed", "weight_scale", "weight_zero_point"])
def test_a_flipped_byte_in_any_compressed_tensor_is_refused(saved, tmp_path, tensor):
    folder = _copy(saved, "packed-asym", tmp_path)
    key = f"model.layers.0.mlp.up_proj.{tensor}"

    def flip(t):
        raw = t[key].clone().contiguous()
        raw.view(torch.uint8).view(-1)[3] ^= 0x01
        t[key] = raw

    _edit_tensors(folder, flip)
    with pytest.raises(IntegrityError, match=rf"{key}' fails its checksum"):
        _logits(folder)
    with pytest.raises(IntegrityError, match=key):
        inspect_checkpoint(folder)


def test_swapped_tensor_data_is_refused(saved, tmp_path):
    folder = _copy(saved, "packed-asym", tmp_path)
    a, b = "model.layers.0.mlp.up_proj.weight_packed", "model.layers.0.mlp.gate_proj.weight_packed"
    _edit_tensors(folder, lambda t: t.update({a: t[b], b: t[a]}))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        _logits(folder)


def test_a_dense_tensor_relabelled_bf16_as_f16_is_refused(tmp_path):
    model = hfcompress.compress(tiny_llama().to(torch.bfloat16), HfCompressConfig(bits=4, group_size=32))
    folder = tmp_path / "bf16"
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["model.norm.weight"]["dtype"] == "BF16"
    header["model.norm.weight"]["dtype"] = "F16"  # same bytes, different numbers
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    path.write_bytes(bytes(raw[:8]) + new + bytes(raw[8 + n :]))
    with pytest.raises(IntegrityError, match="model.norm.weight' is stored as F16 .* written as BF16"):
        _logits(folder)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(list(FORMATS)), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_anywhere_in_a_file_never_loads_different_weights(saved, tmp_path_factory, fmt, where, bit):
    folder = tmp_path_factory.mktemp("flip") / fmt
    shutil.copytree(saved[fmt][0], folder)
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    pos = int(where * len(raw))
    raw[pos] ^= 1 << bit
    path.write_bytes(bytes(raw))
    try:
        logits = _logits(folder)
    except (ValueError, TypeError, OSError) as exc:  # refused: the error names the file
        assert "model.safetensors" in str(exc) or "checkpoint" in str(exc).lower(), exc
        return
    assert torch.equal(logits, saved[fmt][1])  # a flip that changed nothing (e.g. JSON whitespace)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_and_extended_files_are_refused(saved, tmp_path, cut, fmt):
    folder = _copy(saved, fmt, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(CheckpointError, match="truncated"):
        _logits(folder)
    path.write_bytes(data + b"\0" * cut)
    with pytest.raises(CheckpointError, match="after its last tensor"):
        _logits(folder)
    with pytest.raises(CheckpointError, match="after its last tensor"):
        inspect_checkpoint(folder, verify=False)


# ---------------------------------------------------------------------------------------------- edited configs
@pytest.mark.parametrize(
    "edit",
    [
        ("symmetric", True), ("symmetric", None), ("targets", ["re:self_attn"]), ("ignore", ["lm_head", "re:mlp"]),
        ("group_size", 64), ("bits", 8), ("scale_dtype", "bfloat16"),
    ],  # fmt: skip
    ids=lambda e: f"{e[0]}={e[1]}",
)
def test_an_edited_config_json_never_loads_wrong_weights(saved, tmp_path, edit):
    key, value = edit
    folder = _copy(saved, "packed-asym", tmp_path)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if value is None:
        config["quantization_config"].pop(key)  # omitted: the default applies
    else:
        config["quantization_config"][key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match=f"{key}: weights written with"):
        _logits(folder)
    with pytest.raises(IntegrityError, match="does not match"):
        inspect_checkpoint(folder)
    # without the recorded stamp, the stored tensors themselves still refuse the mismatch
    _edit_tensors(folder, lambda t: None)
    stripped = folder / "model.safetensors"
    tensors = load_file(stripped)
    save_file(tensors, stripped, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weight_zero_point|no place for|lacks|shape|dtype|missing"):
        _logits(folder, quantization_config=UNVERIFIED)


def test_checkpoint_without_checksums_needs_an_explicit_opt_out(saved, tmp_path, tiny_dense_dir):
    folder = _copy(saved, "packed-asym", tmp_path)
    path = folder / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})
    with pytest.raises(IntegrityError, match="carries no hfcompress checksums.*verify_checksums=False"):
        _logits(folder)
    assert torch.equal(_logits(folder, quantization_config=UNVERIFIED), saved["packed-asym"][1])
    with pytest.raises(ValueError, match="only carries options for loading"):
        AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=UNVERIFIED)


# ---------------------------------------------------------------------------------------------- lossless headers
@pytest.fixture(scope="module")
def payload():
    return codec.encode_tensor(torch.randn(64, 96).to(torch.bfloat16), chunk_elems=1024)


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 2000), value=st.integers(0, 255))
def test_any_damaged_payload_header_byte_raises_only_lossless_format_error(payload, pos, value):
    info = codec.read_info(payload)
    pos = pos % info.header_bytes
    bad = payload.clone()
    if int(bad[pos]) == value:
        return
    bad[pos] = value
    with pytest.raises(LosslessFormatError, match="model.x_lossless"):
        codec.decode_tensor(bad, where="model.x_lossless")
    with pytest.raises(LosslessFormatError):
        codec.verify_payload(bad, where="model.x_lossless")


def _payload_with(shape, chunk_elems, planes_spec):
    """A hand-made payload (uint8 dtype): header fields as given, one plane per chunk."""
    head = bytearray(struct.pack("<4sBBBB", codec.MAGIC, codec.VERSION, 10, 0, len(shape)))
    head += struct.pack(f"<{len(shape)}Q", *shape)
    head += struct.pack("<QIB", chunk_elems, len(planes_spec), 1)
    data = b""
    for method, stored, crc in planes_spec:
        head += struct.pack("<BI", method, len(stored)) + struct.pack("<II", crc, coder.crc32(stored))
        data += stored
    head += struct.pack("<I", coder.crc32(bytes(head)))
    return torch.frombuffer(bytearray(head + data), dtype=torch.uint8)


def test_a_deflate_bomb_is_refused_without_inflating_it():
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    stored = bomb.compress(b"\0" * (64 << 20)) + bomb.flush()  # 64 MiB of zeros in ~64 KiB
    assert len(stored) < 100_000
    # honest header: 64 MiB declared from 64 KiB is within DEFLATE's ratio, and decodes (the tensor is that big)
    # lying header: declares 4 KiB, the stream would give 64 MiB: refused after at most 4 KiB + 1 of output
    lying = _payload_with((4096,), 4096, [(coder.METHOD_DEFLATE, stored, 0)])
    with pytest.raises(LosslessFormatError, match="more than the 4096 bytes"):
        codec.decode_tensor(lying, where="bomb")
    # a header declaring more than DEFLATE can expand to is refused before anything is allocated
    greedy = _payload_with((1 << 40,), 1 << 30, [(coder.METHOD_DEFLATE, b"\x03\x00", 0)] * 1024)
    with pytest.raises(LosslessFormatError, match="n_chunks|more than DEFLATE can expand"):
        codec.read_info(greedy, where="greedy")
    huge = _payload_with((1 << 50, 1 << 50), 1 << 30, [])
    with pytest.raises(LosslessFormatError, match="'shape'"):
        codec.read_info(huge, where="huge")


def test_a_payload_claiming_another_shape_than_the_model_is_refused_before_decoding(saved, tmp_path):
    folder = _copy(saved, "lossless", tmp_path)
    key = "model.embed_tokens.weight_lossless"
    _edit_tensors(folder, lambda t: t.__setitem__(key, codec.encode_tensor(torch.zeros(4096, 96, dtype=torch.float32))))
    with pytest.raises(IntegrityError):
        _logits(folder)
    with pytest.raises(LosslessFormatError, match="declares shape \\[4096, 96\\]"):
        _logits(folder, quantization_config=UNVERIFIED)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 60), value=st.integers(0, 255))
def test_inspect_names_file_and_tensor_for_any_damaged_lossless_header(saved, tmp_path_factory, offset, value):
    folder = tmp_path_factory.mktemp("hdr") / "ll"
    shutil.copytree(saved["lossless"][0], folder)
    path = folder / "model.safetensors"
    header = read_header(path)
    key = "model.embed_tokens.weight_lossless"
    start = data_start(path) + header[key]["data_offsets"][0]
    raw = bytearray(path.read_bytes())
    if raw[start + offset] == value:
        return
    raw[start + offset] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as info:  # verified (the default): every damage is caught
        inspect_checkpoint(folder)
    assert key in str(info.value) and "model.safetensors" in str(info.value), info.value
    try:  # headers only: a field that cannot be read is reported the same way, never as another exception
        inspect_checkpoint(folder, verify=False)
    except ValueError as exc:
        assert key in str(exc) and "model.safetensors" in str(exc), exc


# ---------------------------------------------------------------------------------------------- push
@pytest.mark.parametrize("damage", ["payload", "no-index", "index-outside", "link-to-system-file", "config-edit"])
def test_push_uploads_nothing_from_a_damaged_folder(saved, tmp_path, local_hub, damage):
    if damage in ("no-index", "index-outside"):
        model = hfcompress.compress(tiny_llama(), FORMATS["packed-asym"])
        folder = tmp_path / "sharded"
        model.save_pretrained(folder, max_shard_size="100KB")
        if damage == "no-index":
            (folder / "model.safetensors.index.json").unlink()
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            index["weight_map"] = {k: f"../x/{v}" for k, v in index["weight_map"].items()}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        folder = _copy(saved, "lossless", tmp_path)
    if damage == "payload":
        key = "model.embed_tokens.weight_lossless"

        def flip(t):
            t[key] = t[key].clone()
            t[key][-5] ^= 0x04

        _edit_tensors(folder, flip)
    elif damage == "link-to-system-file":
        (folder / "notes.txt").symlink_to("/etc/passwd")
    elif damage == "config-edit":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["ignore"] = ["mlp"]
        (folder / "config.json").write_text(json.dumps(config))
    before = tree_hash(folder)
    with pytest.raises((ValueError, FileNotFoundError)):
        push_to_hub(folder, "tester/damaged")
    assert not local_hub.requests("POST") and not local_hub.requests("PUT"), "something was uploaded"
    assert tree_hash(folder) == before


def test_push_uploads_a_good_folder_without_the_marker(saved, tmp_path, local_hub):
    folder = hfcompress.hub.save_compressed(hfcompress.compress(tiny_llama(), FORMATS["nm"]), tmp_path / "good")
    push_to_hub(folder, "tester/good")
    files = local_hub.files("tester/good")
    assert "model.safetensors" in files and ".hfcompress-output.json" not in files


def test_verification_cost_is_one_pass_over_the_files(saved, monkeypatch):
    """Loading verifies every byte once (the benchmark measures the time: eval/bench_integrity.py)."""
    from hfcompress import integrity

    seen = []
    real = integrity.crc32
    monkeypatch.setattr(integrity, "crc32", lambda data, value=0: (seen.append(len(memoryview(data))), real(data, value))[1])
    folder = saved["packed-asym"][0]
    _logits(folder)
    data_bytes = os.path.getsize(folder / "model.safetensors") - data_start(folder / "model.safetensors")
    assert sum(seen) == data_bytes
    seen.clear()
    _logits(folder, quantization_config=UNVERIFIED)
    assert sum(seen) == 0
