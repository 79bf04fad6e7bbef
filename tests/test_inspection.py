"""Checkpoint inspection from headers: agrees with the in-memory report, measures zeros, catches damage."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hfcompress import HfCompressConfig, compress, compression_report, compressed_modules
from hfcompress.inspection import inspect_checkpoint, layer_groups
from hfcompress.testing.models import tiny_llama

CONFIG = dict(bits=4, group_size=32, overrides=[{"targets": ["re:down_proj$"], "bits": 8, "group_size": None}])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = compress(tiny_llama(), HfCompressConfig(**CONFIG))
    folder = tmp_path_factory.mktemp("inspect") / "int4"
    model.save_pretrained(folder)
    return model, folder


def test_inspect_agrees_with_compression_report(saved):
    model, folder = saved
    report = inspect_checkpoint(folder)
    memory = compression_report(model)
    assert report["compressed"] and report["architecture"] == "LlamaForCausalLM"
    assert HfCompressConfig.from_dict(report["quantization_config"]) == HfCompressConfig(**CONFIG)
    by_name = {layer["name"]: layer for layer in memory["layers"]}
    assert {layer["name"] for layer in report["layers"]} == set(by_name)
    for layer in report["layers"]:
        ref = by_name[layer["name"]]
        for key in ("format", "bits", "group_size", "sparsity", "nbytes", "bits_per_weight"):
            assert layer[key] == ref[key], (layer["name"], key)
        assert tuple(layer["shape"]) == tuple(ref["shape"])
    assert report["compressed_bytes"] == memory["compressed_bytes"]
    on_disk = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
    assert report["total_bytes"] == on_disk
    # bfloat16 reference: compressed weights at 2 bytes, other float tensors (float32 here) at 2 bytes too.
    other_elems = sum(p.numel() for n, p in model.named_parameters() if "layers" not in n or "norm" in n)
    assert report["bf16_bytes"] == 2 * report["compressed_params"] + 2 * other_elems


def test_measured_zero_fraction_is_the_decoded_weight(saved):
    model, folder = saved
    report = inspect_checkpoint(folder, measure=True)
    modules = compressed_modules(model)
    for layer in report["layers"]:
        weight = modules[layer["name"]].dequantize_weight(torch.float32)
        assert layer["zero_fraction"] == int((weight == 0).sum()) / weight.numel()


def test_dense_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    report = inspect_checkpoint(tmp_path / "dense")
    assert not report["compressed"] and report["layers"] == [] and report["compressed_bytes"] == 0
    assert report["total_bytes"] == report["other_bytes"] > 0


def test_damaged_checkpoints_are_reported(saved, tmp_path):
    import shutil

    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    with safe_open(folder / "model.safetensors", "pt") as f:
        meta = f.metadata()  # the recorded checksums stay: the edits below must be caught against them

    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.up_proj.")}, missing / "model.safetensors", meta)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        inspect_checkpoint(missing)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        inspect_checkpoint(missing, verify=False)

    misshapen = tmp_path / "misshapen"
    shutil.copytree(folder, misshapen)
    key = next(k for k in tensors if k.startswith("model.layers.0.self_attn.q_proj.weight_") and tensors[k].dim() == 2)
    save_file({**tensors, key: tensors[key][:-1].contiguous()}, misshapen / "model.safetensors", meta)
    with pytest.raises(ValueError, match="q_proj.*stored as .* but was written as"):
        inspect_checkpoint(misshapen)
    with pytest.raises(ValueError, match="q_proj.*shape"):
        inspect_checkpoint(misshapen, verify=False)

    with pytest.raises(FileNotFoundError, match="config.json"):
        inspect_checkpoint(tmp_path)


def test_layer_groups_aggregate_and_flag_mixed_settings():
    layers = [
        {"name": "model.layers.0.mlp.up_proj", "format": "packed", "shape": [8, 16], "bits": 4, "group_size": 16, "sparsity": 0.0, "nbytes": 70},
        {"name": "model.layers.1.mlp.up_proj", "format": "packed", "shape": [8, 16], "bits": 8, "group_size": 16, "sparsity": 0.0, "nbytes": 130},
        {"name": "lm_head", "format": "packed", "shape": [4, 16], "bits": 4, "group_size": None, "sparsity": 0.0, "nbytes": 40},
    ]
    groups = {g["group"]: g for g in layer_groups(layers)}
    up = groups["model.layers.*.mlp.up_proj"]
    assert up["count"] == 2 and up["bits"] == "mixed" and up["group_size"] == 16
    assert up["params"] == 256 and up["nbytes"] == 200 and up["bits_per_weight"] == pytest.approx(6.25)
    assert groups["lm_head"]["count"] == 1 and groups["lm_head"]["group_size"] is None


def test_lossless_checkpoint_reports_stored_and_decoded_bytes(saved, tmp_path):
    model, folder = saved
    coded = compress(tiny_llama(), HfCompressConfig(**CONFIG, lossless=True))
    coded.save_pretrained(tmp_path / "coded")
    plain, report = inspect_checkpoint(folder, measure=True), inspect_checkpoint(tmp_path / "coded", measure=True)
    assert report["lossless"] and not plain["lossless"]
    on_disk = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "coded" / "model.safetensors").values())
    assert report["total_bytes"] == on_disk < plain["total_bytes"]
    assert report["bf16_bytes"] == plain["bf16_bytes"]
    for a, b in zip(report["layers"], plain["layers"]):
        assert a["name"] == b["name"] and a["memory_nbytes"] == b["nbytes"] == b["memory_nbytes"]
        assert a["nbytes"] <= a["memory_nbytes"] and a["zero_fraction"] == b["zero_fraction"]
    assert sum(a["nbytes"] for a in report["layers"]) < plain["compressed_bytes"]
