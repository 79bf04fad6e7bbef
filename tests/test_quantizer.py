"""Compress on load, save, reload: bit-exact on tiny Llama/ViT/ResNet; corrupted checkpoints fail clearly."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import hfcompress
from hfcompress import CompressedConv2d, CompressedEmbedding, CompressedLinear, HfCompressConfig, compressed_modules
from hfcompress.integrity import IntegrityError
from hfcompress.testing.models import tiny_llama, tiny_resnet, tiny_vit


def _saved(model, path):
    model.save_pretrained(path)
    return path


def _keys(folder):
    keys = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                keys.update({k: sf.get_tensor(k) for k in sf.keys()})
    return keys


@pytest.fixture()
def llama_dir(tmp_path):
    return _saved(tiny_llama(), tmp_path / "dense")


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "cfg",
    [
        HfCompressConfig(bits=4, group_size=128),  # 96 columns: one ragged group
        HfCompressConfig(bits=4, group_size=40),  # 96 = 40 + 40 + 16
        HfCompressConfig(bits=3, group_size=32, symmetric=False),
        HfCompressConfig(bits=2, group_size=None, scale_dtype="bfloat16"),
        HfCompressConfig(bits=8, group_size=None, clip="mse"),
        HfCompressConfig(bits=4, group_size=32, overrides=[{"targets": ["re:down_proj"], "bits": 8, "symmetric": False}]),
    ],
    ids=["w4g128", "w4g40", "w3asym", "w2pc_bf16", "w8mse", "mixed"],
)
def test_on_load_then_reload_is_bit_exact(llama_dir, tmp_path, cfg):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, dtype=torch.float32)
    mods = compressed_modules(q)
    assert len(mods) == 14 and all(isinstance(m, CompressedLinear) for m in mods.values())
    assert not any(n.endswith(".weight") for n, _ in q.named_parameters() if "proj" in n), "dense weights must be gone"
    logits = q(IDS).logits
    dense = tiny_llama()(IDS).logits
    assert torch.isfinite(logits).all()
    rel = (logits - dense).norm() / dense.norm()
    assert rel < {2: 2.0, 3: 0.6, 4: 0.35, 8: 0.02}[cfg.bits]
    out = _saved(q, tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(out)
    assert r.config.quantization_config == cfg
    for name, m in compressed_modules(r).items():
        for t, v in m.compressed_tensors().items():
            assert torch.equal(v, mods[name].compressed_tensors()[t]), f"{name}.{t}"
    assert torch.equal(r(IDS).logits, logits)


def test_in_memory_compress_matches_on_load(llama_dir):
    cfg = HfCompressConfig(bits=4, group_size=32)
    on_load = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, dtype=torch.float32)
    in_mem = hfcompress.compress(tiny_llama(), cfg)
    assert torch.equal(on_load(IDS).logits, in_mem(IDS).logits)
    with pytest.raises(ValueError, match="already compressed"):
        hfcompress.compress(in_mem, cfg)


def test_memory_really_shrinks(llama_dir):
    dense = tiny_llama()
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfCompressConfig(bits=4, group_size=32), dtype=torch.float32)
    report = hfcompress.compression_report(q)
    lin = sum(m.weight.numel() * 4 for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and "proj" in n)
    assert report["compressed_bytes"] < lin / 6  # 4-bit codes + fp16 scales vs fp32
    for layer in report["layers"]:
        assert 4.0 < layer["bits_per_weight"] < 4.6


def test_tied_embedding_saved_once_and_stays_tied(llama_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfCompressConfig(bits=4), dtype=torch.float32)
    out = _saved(q, tmp_path / "q")
    keys = _keys(out)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    r = AutoModelForCausalLM.from_pretrained(out)
    assert r.lm_head.weight is r.model.embed_tokens.weight


def test_sharded_save_reloads(llama_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfCompressConfig(bits=4, group_size=32), dtype=torch.float32)
    q.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(r(IDS).logits, q(IDS).logits)


def test_dtype_and_device_map(llama_dir, tmp_path):
    cfg = HfCompressConfig(bits=4, group_size=32)
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, dtype=torch.bfloat16, device_map="auto")
    assert q.model.norm.weight.dtype == torch.bfloat16
    layer = q.model.layers[0].mlp.up_proj
    assert layer.weight_scale.dtype == torch.float16, "scales keep their stored dtype"
    assert q(IDS).logits.dtype == torch.bfloat16
    out = _saved(q, tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="auto")
    assert torch.equal(r(IDS).logits, q(IDS).logits)
    # casting the model never re-rounds compressed tensors
    scale = layer.weight_scale.clone()
    q.to(torch.float32)
    assert layer.weight_scale.dtype == torch.float16 and torch.equal(layer.weight_scale, scale)


def test_vision_models_conv_and_linear(tmp_path):
    for make, n_types in ((tiny_vit, (CompressedLinear,)), (tiny_resnet, (CompressedConv2d,))):
        dense = make()
        src = _saved(dense, tmp_path / make.__name__)
        cfg = HfCompressConfig(bits=4, group_size=16, targets=["Linear", "Conv2d"])
        q = AutoModelForImageClassification.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
        mods = compressed_modules(q)
        assert mods and all(isinstance(m, n_types) for m in mods.values())
        assert "classifier" not in " ".join(mods), "heads stay dense by default"
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        logits = q(pixel_values=x).logits
        ref = dense(pixel_values=x).logits
        assert (logits - ref).norm() / ref.norm() < 0.35
        out = _saved(q, tmp_path / (make.__name__ + "_q"))
        r = AutoModelForImageClassification.from_pretrained(out)
        assert torch.equal(r(pixel_values=x).logits, logits)


def test_conv_rows_are_output_filters():
    conv = torch.nn.Conv2d(8, 8, 3, groups=8, bias=True)  # depthwise
    twin = hfcompress.modules.compressed_twin(conv, hfcompress.LayerSpec(bits=8, group_size=None))
    twin.compress_(conv.weight)
    assert twin.weight_scale.shape == (8, 1) and twin.shape2d == (8, 9)
    x = torch.randn(1, 8, 5, 5)
    assert torch.allclose(twin(x), conv(x), atol=2e-2)


def test_untied_embedding_compression(tmp_path):
    dense = tiny_llama(tie_word_embeddings=False)
    src = _saved(dense, tmp_path / "untied")
    cfg = HfCompressConfig(bits=8, group_size=None, targets=["Linear", "Embedding"])
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
    assert isinstance(q.model.embed_tokens, CompressedEmbedding)
    out = _saved(q, tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(r(IDS).logits, q(IDS).logits)


# ---------------------------------------------------------------------------------------------- damage
@pytest.fixture()
def quantized_dir(llama_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfCompressConfig(bits=4, group_size=32), dtype=torch.float32)
    return _saved(q, tmp_path / "q")


def _rewrite(folder, fn, keep_metadata=True):
    """Edit the tensors of a saved checkpoint (keeping its hfcompress metadata, so the checksums catch the edit)."""
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata=metadata if keep_metadata else {"format": "pt"})


UNVERIFIED = HfCompressConfig.loading(verify_checksums=False)  # reach the structural checks behind the checksums


def test_missing_packed_tensor_is_a_clear_error(quantized_dir):
    _rewrite(quantized_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_packed"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_packed.*missing"):
        AutoModelForCausalLM.from_pretrained(quantized_dir)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_packed.*missing"):
        AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=UNVERIFIED)


def test_wrong_shape_is_a_clear_error(quantized_dir):
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight_scale"] = t["model.layers.0.self_attn.q_proj.weight_scale"][:, :2].clone()

    _rewrite(quantized_dir, shrink)
    with pytest.raises(IntegrityError, match=r"q_proj\.weight_scale.*stored as F16 \[96, 2\] but was written as F16 \[96, 3\]"):
        AutoModelForCausalLM.from_pretrained(quantized_dir)
    with pytest.raises(ValueError, match=r"q_proj\.weight_scale.*shape"):
        AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=UNVERIFIED)


def test_wrong_dtype_is_a_clear_error(quantized_dir):
    def retype(t):
        t["model.layers.0.self_attn.q_proj.weight_scale"] = t["model.layers.0.self_attn.q_proj.weight_scale"].float()

    _rewrite(quantized_dir, retype)
    with pytest.raises(IntegrityError, match=r"q_proj\.weight_scale.*stored as F32"):
        AutoModelForCausalLM.from_pretrained(quantized_dir)
    with pytest.raises(ValueError, match=r"q_proj\.weight_scale.*dtype"):
        AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=UNVERIFIED)


def test_truncated_file_is_a_clear_error(quantized_dir):
    path = os.path.join(quantized_dir, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(quantized_dir)


def test_config_of_another_model_is_a_clear_error(quantized_dir):
    cfg_path = os.path.join(quantized_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"]["group_size"] = 16
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(IntegrityError, match="group_size: weights written with 32, config.json says 16"):
        AutoModelForCausalLM.from_pretrained(quantized_dir)
    # without the recorded stamp (metadata stripped, verification off) the tensor shapes still refuse it
    _rewrite(quantized_dir, lambda t: None, keep_metadata=False)
    with pytest.raises(ValueError, match="weight_scale.*shape"):
        AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=UNVERIFIED)


def test_bad_config_leaves_source_untouched(llama_dir):
    before = {f: open(os.path.join(llama_dir, f), "rb").read() for f in os.listdir(llama_dir)}
    with pytest.raises(ValueError, match="matches no module"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfCompressConfig(bits=4, targets=["re:nothing"]))
    after = {f: open(os.path.join(llama_dir, f), "rb").read() for f in os.listdir(llama_dir)}
    assert before == after
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        hfcompress.compress(model, HfCompressConfig(bits=4, targets=["re:nothing"]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
