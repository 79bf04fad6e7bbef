"""The lossless stage in models: save/reload bit for bit, ties kept, damaged files refused, streaming converter."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import hfcompress
from hfcompress import HfCompressConfig, compressed_modules
from hfcompress.cli import main as cli_main
from hfcompress.convert import convert_checkpoint
from hfcompress.formats.lossless import LOSSLESS_SUFFIX, lossless_files_summary
from hfcompress.integrity import IntegrityError
from hfcompress.lossless import LosslessFormatError
from hfcompress.testing.models import tiny_llama, tiny_vit

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def stored(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].view(_INT_VIEW[sa[k].element_size()]), sb[k].view(_INT_VIEW[sb[k].element_size()])), k


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_config_shortest_forms():
    cfg = HfCompressConfig(lossless=True)
    assert cfg.lossless and cfg.bits is None and cfg.to_dict()["lossless"] is True
    assert HfCompressConfig.from_dict(cfg.to_dict()) == cfg
    assert HfCompressConfig(bits=4, group_size=64, lossless=True).default_spec().bits == 4
    assert HfCompressConfig.from_dict({"quant_method": "hfcompress", "bits": 4}).lossless is False  # older configs
    with pytest.raises(ValueError, match="compress nothing.*lossless=True"):
        HfCompressConfig()
    with pytest.raises(TypeError, match="lossless='yes' must be True or False"):
        HfCompressConfig(lossless="yes")


def test_lossless_only_changes_nothing_in_memory(dense_dir):
    m = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=HfCompressConfig(lossless=True))
    assert not compressed_modules(m)
    assert_same_state(m, AutoModelForCausalLM.from_pretrained(dense_dir))


def test_lossless_checkpoint_layout(dense_dir, lossless_dir):
    tensors = stored(lossless_dir)
    # Every weight matrix and the (tied) embedding is coded; the tie is stored once; tiny norms stay plain.
    assert "model.embed_tokens.weight" + LOSSLESS_SUFFIX in tensors
    assert not any(k.startswith("lm_head") for k in tensors)
    assert all(k.endswith(LOSSLESS_SUFFIX) for k in tensors if "proj" in k)
    assert all(not k.endswith(LOSSLESS_SUFFIX) for k in tensors if "norm" in k)
    assert all(v.dtype == torch.uint8 and v.dim() == 1 for k, v in tensors.items() if k.endswith(LOSSLESS_SUFFIX))
    with safe_open(os.path.join(lossless_dir, "model.safetensors"), "pt") as f:
        assert f.metadata()["hfcompress_lossless"] == "1"
    config = json.loads((lossless_dir / "config.json").read_text())
    assert config["quantization_config"]["lossless"] is True
    assert folder_bytes(lossless_dir) < 0.72 * folder_bytes(dense_dir)  # random tiny weights: ~2/3


def test_reload_is_bit_exact_and_stays_tied(dense_dir, lossless_dir, tmp_path):
    reloaded = AutoModelForCausalLM.from_pretrained(lossless_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert_same_state(reloaded, dense)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded(IDS).logits, dense(IDS).logits)
    assert isinstance(reloaded.config.quantization_config, HfCompressConfig) and reloaded.config.quantization_config.lossless
    # Saving the reloaded model again writes the same coded tensors (the decoder is not reversed on save).
    reloaded.save_pretrained(tmp_path / "again")
    first, again = stored(lossless_dir), stored(tmp_path / "again")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_reload_into_float32_widens_exactly(dense_dir, lossless_dir):
    reloaded = AutoModelForCausalLM.from_pretrained(lossless_dir, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    assert reloaded.model.embed_tokens.weight.dtype == torch.float32
    assert_same_state(reloaded, dense)


def test_sharded_lossless_checkpoint(dense_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=HfCompressConfig(lossless=True))
    m.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded"), AutoModelForCausalLM.from_pretrained(dense_dir))


def test_quantized_codes_are_coded_and_reload_exactly(dense_dir, tmp_path):
    plain_cfg = HfCompressConfig(bits=4, group_size=64)
    q = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=plain_cfg)
    q.save_pretrained(tmp_path / "w4")
    lq = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=HfCompressConfig(bits=4, group_size=64, lossless=True))
    lq.save_pretrained(tmp_path / "w4ll")
    tensors = stored(tmp_path / "w4ll")
    assert any(k.endswith("weight_packed" + LOSSLESS_SUFFIX) for k in tensors)
    assert "model.embed_tokens.weight" + LOSSLESS_SUFFIX in tensors  # the dense tied embedding is coded too
    assert folder_bytes(tmp_path / "w4ll") < folder_bytes(tmp_path / "w4")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "w4ll")
    assert len(compressed_modules(b)) == 14
    assert_same_state(a, b)
    assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_in_memory_compress_then_save(dense_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(dense_dir)
    hfcompress.compress(m, HfCompressConfig(lossless=True))
    m.save_pretrained(tmp_path / "mem")
    assert lossless_files_summary(tmp_path / "mem")["coded_tensors"] > 0
    assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "mem"), AutoModelForCausalLM.from_pretrained(dense_dir))


def test_vision_model_round_trip(tmp_path):
    vit = tiny_vit().to(torch.bfloat16)
    vit.save_pretrained(tmp_path / "dense")
    m = AutoModelForImageClassification.from_pretrained(tmp_path / "dense", quantization_config=HfCompressConfig(lossless=True))
    m.save_pretrained(tmp_path / "ll")
    assert lossless_files_summary(tmp_path / "ll")["coded_tensors"] > 0
    assert_same_state(AutoModelForImageClassification.from_pretrained(tmp_path / "ll"), vit)


# ------------------------------------------------------------------------------------------ damaged files
def _rewrite(folder, fn, keep_metadata=True):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    fn(tensors)
    save_file(tensors, path, metadata=meta if keep_metadata else {k: v for k, v in meta.items() if not k.startswith("hfcompress_c")})


def unverified(mode: str = "load") -> HfCompressConfig:
    """Loading options that skip the file-level checksums, to reach the payloads' own checks behind them."""
    return HfCompressConfig.loading(lossless_decode=mode, verify_checksums=False)


@pytest.fixture()
def damaged_dir(lossless_dir, tmp_path):
    import shutil

    path = tmp_path / "damaged"
    shutil.copytree(lossless_dir, path)
    return path


def test_corrupt_payload_is_refused(damaged_dir):
    key = "model.layers.1.mlp.down_proj.weight" + LOSSLESS_SUFFIX

    def flip(t):
        t[key] = t[key].clone()
        t[key][t[key].numel() // 2] ^= 0x40

    _rewrite(damaged_dir, flip)
    with pytest.raises(IntegrityError, match=rf"{key}' fails its checksum"):
        AutoModelForCausalLM.from_pretrained(damaged_dir)
    # Not transformers' generic conversion error: one error naming the tensor, the damage and the fix.
    for mode in ("load", "lazy", "first_forward"):
        cfg = unverified(mode)
        with pytest.raises(LosslessFormatError) as info:
            AutoModelForCausalLM.from_pretrained(damaged_dir, quantization_config=cfg)
        msg = str(info.value)
        assert f"1 lossless tensor(s) in {damaged_dir} are damaged" in msg, msg
        assert key in msg and "checksum" in msg and "force_download=True" in msg and "re-convert" in msg, msg


def test_corrupt_payload_error_names_tensor(lossless_dir):
    from hfcompress.storage.loader import LosslessDecode

    key = "model.layers.1.mlp.down_proj.weight"
    payload = stored(lossless_dir)[key + LOSSLESS_SUFFIX].clone()
    payload[-3] ^= 0x01
    with pytest.raises(LosslessFormatError, match=rf"{key}{LOSSLESS_SUFFIX}: chunk \d+ .*(checksum|corrupt)"):
        LosslessDecode().convert({"x": [payload]}, full_layer_name=key)


def test_truncated_payload_is_refused(damaged_dir):
    key = "model.embed_tokens.weight" + LOSSLESS_SUFFIX
    _rewrite(damaged_dir, lambda t: t.__setitem__(key, t[key][:-100].clone()))
    with pytest.raises(IntegrityError, match=rf"{key}' is stored as U8 \[43317\] but was written as U8 \[43417\]"):
        AutoModelForCausalLM.from_pretrained(damaged_dir)
    for mode in ("load", "lazy"):
        cfg = unverified(mode)
        with pytest.raises(LosslessFormatError, match=rf"are damaged .*{key}.*is truncated .*force_download=True"):
            AutoModelForCausalLM.from_pretrained(damaged_dir, quantization_config=cfg)


def test_every_damaged_tensor_is_named(damaged_dir):
    keys = [f"model.layers.{i}.mlp.up_proj.weight{LOSSLESS_SUFFIX}" for i in range(2)]

    def flip(t):
        for k in keys:
            t[k] = t[k].clone()
            t[k][-1] ^= 0x01

    _rewrite(damaged_dir, flip)
    with pytest.raises(IntegrityError, match=rf"{keys[0]}' fails its checksum"):
        AutoModelForCausalLM.from_pretrained(damaged_dir)
    with pytest.raises(LosslessFormatError, match=rf"2 lossless tensor\(s\) .*: {keys[0]}, {keys[1]}\. First error"):
        AutoModelForCausalLM.from_pretrained(damaged_dir, quantization_config=unverified())


def test_truncated_file_is_refused(damaged_dir):
    path = damaged_dir / "model.safetensors"
    os.truncate(path, path.stat().st_size - 5000)
    with pytest.raises(ValueError, match="model.safetensors is truncated.*re-download"):
        AutoModelForCausalLM.from_pretrained(damaged_dir)


def test_payload_that_is_not_uint8_is_a_clear_error(damaged_dir):
    key = "model.embed_tokens.weight" + LOSSLESS_SUFFIX
    _rewrite(damaged_dir, lambda t: t.__setitem__(key, torch.zeros(4, 4)))
    with pytest.raises(IntegrityError, match="stored as F32 \\[4, 4\\] but was written as U8"):
        AutoModelForCausalLM.from_pretrained(damaged_dir)
    with pytest.raises(ValueError, match="not a 1-D uint8 lossless payload"):
        AutoModelForCausalLM.from_pretrained(damaged_dir, quantization_config=unverified())


# ------------------------------------------------------------------------------------------ converter
def test_streaming_converter_is_bit_exact(dense_dir, tmp_path):
    out = convert_checkpoint(dense_dir, tmp_path / "conv")
    assert sorted(os.listdir(out)) == sorted(os.listdir(dense_dir) + [".hfcompress-output.json"])
    tensors = stored(out)
    assert "model.embed_tokens.weight" + LOSSLESS_SUFFIX in tensors
    assert folder_bytes(out) < 0.72 * folder_bytes(dense_dir)
    assert_same_state(AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(dense_dir))


def test_converter_sharded_and_float32_cast(tmp_path):
    m = tiny_llama(hidden_size=128, intermediate_size=256)  # float32
    m.save_pretrained(tmp_path / "f32", max_shard_size="60KB")
    exact = convert_checkpoint(tmp_path / "f32", tmp_path / "exact")
    index = json.loads((exact / "model.safetensors.index.json").read_text())
    assert all(os.path.exists(exact / f) for f in index["weight_map"].values())
    assert set(index["weight_map"]) == set(stored(exact))
    assert_same_state(AutoModelForCausalLM.from_pretrained(exact, dtype=torch.float32), m)
    cast = convert_checkpoint(tmp_path / "f32", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((cast / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(cast)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.embed_tokens.weight, m.model.embed_tokens.weight.to(torch.bfloat16))


def test_converter_adds_lossless_to_an_hfcompress_checkpoint(dense_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=HfCompressConfig(bits=4, group_size=64)).save_pretrained(tmp_path / "w4")
    out = convert_checkpoint(tmp_path / "w4", tmp_path / "w4ll")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["lossless"] is True and qc["bits"] == 4
    assert_same_state(AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(tmp_path / "w4"))
    with pytest.raises(ValueError, match="already lossless"):
        convert_checkpoint(out, tmp_path / "again")


def test_converter_refuses_bad_input_and_leaves_nothing(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="contains the input"):
        convert_checkpoint(dense_dir, dense_dir.parent, overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoint(dense_dir, tmp_path)
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert_checkpoint(dense_dir, tmp_path / "x", dtype="int8")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_checkpoint(tmp_path, tmp_path / "x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((dense_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((dense_dir / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        convert_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_converter_command_line(dense_dir, tmp_path, capsys):
    assert cli_main(["convert", str(dense_dir), "-o", str(tmp_path / "cli")]) == 0
    assert "tensors coded" in capsys.readouterr().out
    assert cli_main(["convert", str(dense_dir), "-o", str(tmp_path / "cli"), "--json"]) == 2  # exists, not replaced
    assert "exists" in capsys.readouterr().out
    assert lossless_files_summary(tmp_path / "cli")["coded_tensors"] > 0


def test_sharded_quantized_lossless_reload(dense_dir, tmp_path):
    cfg = HfCompressConfig(bits=4, group_size=64, lossless=True)
    q = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=cfg)
    q.save_pretrained(tmp_path / "w4ll", max_shard_size="30KB")
    assert len(list((tmp_path / "w4ll").glob("*.safetensors"))) > 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w4ll")
    assert_same_state(reloaded, q)
    assert torch.equal(reloaded(IDS).logits, q(IDS).logits)


def test_state_dict_helpers_round_trip():
    from hfcompress.formats.lossless import decode_state_dict, encode_state_dict

    sd = tiny_llama().to(torch.bfloat16).state_dict()
    coded = encode_state_dict(sd, threads=2)
    assert any(k.endswith(LOSSLESS_SUFFIX) for k in coded) and list(decode_state_dict(coded)) == [
        k[: -len(LOSSLESS_SUFFIX)] if k.endswith(LOSSLESS_SUFFIX) else k for k in coded
    ]
    back = decode_state_dict(coded)
    assert all(torch.equal(back[k], sd[k]) for k in sd if k in back)
    with pytest.raises(ValueError, match="reserved suffix"):
        encode_state_dict({"x" + LOSSLESS_SUFFIX: torch.zeros(4096)})


def test_payloads_without_lossless_in_config_are_refused(damaged_dir):
    path = damaged_dir / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["bits"] = 4
    config["quantization_config"]["lossless"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match="lossless: weights written with True, config.json says False"):
        AutoModelForCausalLM.from_pretrained(damaged_dir)
    _rewrite(damaged_dir, lambda t: None, keep_metadata=False)  # no stamp left: the payloads themselves refuse it
    with pytest.raises(ValueError, match="lossless payloads .* lossless=False"):
        AutoModelForCausalLM.from_pretrained(damaged_dir, quantization_config=HfCompressConfig.loading(verify_checksums=False))
