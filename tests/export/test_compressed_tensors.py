"""compressed-tensors export: exact codes, a config compressed-tensors accepts, loading without hfcompress, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import hfcompress
from hfcompress import HfCompressConfig, compress, compressed_modules, save_compressed
from hfcompress.export import ExportError, export
from hfcompress.export.compressed_tensors import pack_int32
from hfcompress.testing.models import tiny_llama

from fixtures.files import byte_tokenizer, tree_hash

ct = pytest.importorskip("compressed_tensors")
CT_VERSION = tuple(int(x) for x in ct.__version__.split(".")[:2])


def _byte_tokenizer():
    return byte_tokenizer()


def _saved(tmp_path, config: HfCompressConfig, dtype=torch.bfloat16, **model_kw):
    model = compress(tiny_llama(**model_kw).to(dtype), config)
    folder = tmp_path / "src"
    save_compressed(model, folder, tokenizer=_byte_tokenizer(), card=False)
    return model, folder


# Loads the export in a fresh interpreter that never imports hfcompress, and compares with what we decode.
_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
ref = torch.load(sys.argv[2])
kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if sys.argv[3] == "decompressed" else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
with torch.no_grad():
    logits = model(ref["ids"]).logits
plain = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=CompressedTensorsConfig(run_compressed=False))
mods = dict(plain.named_modules())
equal = {n: bool(torch.equal(mods[n].weight.data, w)) for n, w in ref["weights"].items()}
print(json.dumps({"hfcompress_imported": "hfcompress" in sys.modules, "dtype": str(model.dtype),
                  "logit_diff": (logits.float() - ref["logits"].float()).abs().max().item(),
                  "logit_scale": ref["logits"].float().abs().max().item(), "equal": equal}))
"""


def _load_without_hfcompress(out, model, tmp_path, mode: str = "compressed") -> dict:
    ids = torch.tensor([[1, 5, 9, 77, 200, 3, 42, 17]])
    with torch.no_grad():
        logits = model(ids).logits
    weights = {n: m.dequantize_weight(torch.bfloat16) for n, m in hfcompress.compressed_modules(model).items()}
    ref = tmp_path / "ref.pt"
    torch.save({"ids": ids, "logits": logits, "weights": weights}, ref)
    r = subprocess.run([sys.executable, "-c", _LOADER, str(out), str(ref), mode], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits,group_size,clip", [(4, 32, "minmax"), (8, None, "minmax"), (4, None, "minmax"), (4, 32, "mse")])
def test_symmetric_export_loads_in_plain_transformers_bit_exact(tmp_path, bits, group_size, clip):
    model, src = _saved(tmp_path, HfCompressConfig(bits=bits, group_size=group_size, scale_dtype="bfloat16", clip=clip))
    if clip == "mse":  # signed scales (the extreme on the wide side of the code range) decode the same way
        assert any(bool((m.weight_scale < 0).any()) for m in compressed_modules(model).values())
    before = tree_hash(src)
    report = export(src, tmp_path / "ct", to="compressed-tensors")
    assert report.exact and len(report.layers) == 14
    assert tree_hash(src) == before  # the source is only read
    got = _load_without_hfcompress(tmp_path / "ct", model, tmp_path)
    assert not got["hfcompress_imported"]
    assert got["dtype"] == "torch.bfloat16"
    assert all(got["equal"].values()), got["equal"]  # every weight bit for bit
    assert got["logit_diff"] <= 0.02 * got["logit_scale"]  # same weights; only the matmul's bf16 rounding differs


def test_w8a8_int_quantized_weights_exact(tmp_path):
    model, src = _saved(tmp_path, HfCompressConfig.for_export("compressed-tensors-w8a8"))
    report = export(src, tmp_path / "ct", to="compressed-tensors", activations="int8")
    assert report.exact
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is True and acts["strategy"] == "token" and acts["num_bits"] == 8
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.int8
    got = _load_without_hfcompress(tmp_path / "ct", model, tmp_path)
    assert all(got["equal"].values())
    assert got["logit_diff"] <= 0.1 * got["logit_scale"]  # activations are quantized on their side only


def test_config_is_what_compressed_tensors_writes(tmp_path):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    _, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, scale_dtype="bfloat16"))
    export(src, tmp_path / "ct", to="compressed-tensors")
    ours = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, group_size=32, strategy="group"))
    theirs = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
                                ignore=["lm_head"]).model_dump(exclude=["quant_method"])  # fmt: skip
    def same(a: dict, b: dict, where: str) -> None:  # every field compressed-tensors writes, with its value;
        for key, value in b.items():                 # fields other releases add or drop are None/{} on the other side
            if isinstance(value, dict) and value:
                same(a[key], value, f"{where}.{key}")
            else:
                assert a.get(key) == value, f"{where}.{key}"
        for key in set(a) - set(b):
            assert a[key] in (None, {}) or key in ("quant_method", "sparsity_config", "transform_config", "version"), f"{where}.{key}"

    same(ours, theirs, "quantization_config")
    assert ours["quant_method"] == "compressed-tensors" and ours["sparsity_config"] == {}
    QuantizationConfig.model_validate({k: v for k, v in ours.items() if k not in ("sparsity_config", "transform_config", "version")})


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_int32_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 77), generator=g, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    ours = pack_int32(codes, bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(codes.shape)), signed)


def test_asymmetric_zero_points_decode_exactly_with_compressed_tensors(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    model, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, symmetric=False, scale_dtype="bfloat16"))
    export(src, tmp_path / "ct", to="compressed-tensors")
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, symmetric=False, group_size=32, strategy="group"))
    for name, module in hfcompress.compressed_modules(model).items():
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        decoded = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(decoded, module.dequantize_weight(torch.bfloat16)), name


@pytest.mark.skipif(CT_VERSION >= (0, 20), reason="compressed-tensors 0.20 leaves zero points unpacked when transformers builds the model, so no asymmetric pack-quantized checkpoint loads")
def test_asymmetric_export_loads_in_plain_transformers(tmp_path):
    # transformers' compressed mode (run_compressed=True) keeps zero points unpacked, so asymmetric pack-quantized
    # checkpoints load decompressed (run_compressed=False)
    model, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, symmetric=False, scale_dtype="bfloat16"))
    export(src, tmp_path / "ct", to="compressed-tensors")
    got = _load_without_hfcompress(tmp_path / "ct", model, tmp_path, mode="decompressed")
    assert all(got["equal"].values())
    assert got["logit_diff"] <= 0.02 * got["logit_scale"]


# ---------------------------------------------------------------------- what cannot be exported exactly
def test_ragged_groups_refused_with_layer_and_fix(tmp_path):
    _, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=64, scale_dtype="bfloat16"))
    with pytest.raises(ExportError) as err:
        export(src, tmp_path / "ct", to="compressed-tensors")
    assert err.value.layer.startswith("model.layers.0.") and "group_size" in err.value.fix
    assert "not a multiple of group_size=64" in str(err.value)
    assert not (tmp_path / "ct").exists() and not list(tmp_path.glob(".ct.tmp-*"))


def test_scales_not_in_model_dtype_refused_then_requantized_with_report(tmp_path):
    _, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, scale_dtype="float32"))
    with pytest.raises(ExportError, match="scale_dtype='bfloat16'"):
        export(src, tmp_path / "ct", to="compressed-tensors")
    report = export(src, tmp_path / "ct", to="compressed-tensors", requantize=True)
    assert not report.exact and len(report.requantized) == 14
    assert all(0 < layer.rel_error < 0.02 for layer in report.requantized)
    # the same model exported in float32 keeps every scale: exact
    assert export(src, tmp_path / "ct32", to="compressed-tensors", dtype="float32").exact


def test_w8a8_needs_8bit_per_channel(tmp_path):
    _, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, scale_dtype="bfloat16"))
    with pytest.raises(ExportError, match="for_export\\('compressed-tensors-w8a8'\\)"):
        export(src, tmp_path / "ct", to="compressed-tensors", activations="int8")


def test_sparse_and_embedding_layers_refused(tmp_path):
    model = compress(tiny_llama(tie_word_embeddings=False).to(torch.bfloat16),
                     HfCompressConfig(bits=4, group_size=32, scale_dtype="bfloat16", targets=["Linear", "Embedding"]))
    with pytest.raises(ExportError, match="Embedding"):
        export(model, tmp_path / "ct", to="compressed-tensors", tokenizer=_byte_tokenizer())
    sparse = compress(tiny_llama().to(torch.bfloat16), HfCompressConfig(sparsity=0.5, method="magnitude"))
    with pytest.raises(ExportError, match="sparse format"):
        export(sparse, tmp_path / "ct", to="compressed-tensors", tokenizer=_byte_tokenizer())
    assert not (tmp_path / "ct").exists()


def test_a_model_with_unmerged_peft_adapters_is_refused(tmp_path):
    import peft

    model = compress(tiny_llama().to(torch.bfloat16), HfCompressConfig(bits=4, group_size=32, scale_dtype="bfloat16"))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    for adapted in (lora, lora.base_model.model):
        with pytest.raises(ValueError, match="Merge the adapters first"):
            export(adapted, tmp_path / "ct", to="compressed-tensors", tokenizer=_byte_tokenizer())
    assert not (tmp_path / "ct").exists()
    export(lora.merge_and_unload(), tmp_path / "ct", to="compressed-tensors", tokenizer=_byte_tokenizer())
    assert (tmp_path / "ct" / "model.safetensors").is_file()


def test_in_memory_model_exports_like_its_saved_folder(tmp_path):
    model, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, scale_dtype="bfloat16"))
    export(src, tmp_path / "a", to="compressed-tensors")
    export(model, tmp_path / "b", to="compressed-tensors", tokenizer=_byte_tokenizer())
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_arguments(tmp_path):
    _, src = _saved(tmp_path, HfCompressConfig(bits=4, group_size=32, scale_dtype="bfloat16"))
    with pytest.raises(ValueError, match="export target"):
        export(src, tmp_path / "x", to="onnx")
    with pytest.raises(ValueError, match="activations"):
        export(src, tmp_path / "x", to="compressed-tensors", activations="fp8")
    with pytest.raises(TypeError, match="requantize"):
        export(src, tmp_path / "x", to="compressed-tensors", requantize="yes")
    with pytest.raises(ValueError, match="dtype"):
        export(src, tmp_path / "x", to="compressed-tensors", dtype="int8")
    with pytest.raises(ValueError, match="lies inside the input"):
        export(src, src / "inside", to="compressed-tensors")
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "missing", tmp_path / "x", to="compressed-tensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="did not write"):
        export(src, tmp_path / "taken", to="compressed-tensors", overwrite=True)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
