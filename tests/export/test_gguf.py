"""GGUF export: llama.cpp's block layouts decode (with the gguf package's own dequantizer) to exactly our weights,
for every supported architecture; metadata, tokenizer, tied embeddings, refusals and atomic single-file writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hfcompress
from hfcompress import HfCompressConfig, compress, save_compressed
from hfcompress.export import ExportError, export
from hfcompress.export.gguf import is_our_gguf
from hfcompress.export.gguf.arch import qk_row_order
from hfcompress.export.gguf.blocks import encode_exact
from hfcompress.export.gguf.vocab import pre_tokenizer_name
from hfcompress.export.source import QuantizedLayer
from hfcompress.outputs import OutputPathError

from fixtures.files import byte_tokenizer

gguf = pytest.importorskip("gguf")


def _byte_tokenizer(pre=None):
    return byte_tokenizer(["hello hello world"] * 4, vocab_size=260, special_tokens=["<|end|>"], pre=pre, eos_token="<|end|>")


def _tiny(model_type: str, **kw):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 32}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "sliding_window": 64, "query_pre_attn_scalar": 32}),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 32, "sliding_window": 64, "query_pre_attn_scalar": 32}),
    }
    cfg_cls, model_cls, extra = classes[model_type]
    config = getattr(transformers, cfg_cls)(**{**common, **extra, **kw})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norms away from their init so that a missing "+1" or a wrong order shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(torch.bfloat16)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _decoded(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(*reversed([int(x) for x in t.shape]))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"])
def test_every_architecture_decodes_bit_exact(tmp_path, model_type):
    model = compress(_tiny(model_type), HfCompressConfig.for_export("gguf-q4_0"))
    out = tmp_path / "m.gguf"
    report = export(model, out, to="gguf", tokenizer=_byte_tokenizer())
    assert report.exact, [layer for layer in report.layers if not layer.exact]
    reader, tensors = _read(out)
    arch = reader.fields["general.architecture"].contents()
    assert arch == {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[model_type]
    assert reader.fields[f"{arch}.block_count"].contents() == 2
    assert reader.fields[f"{arch}.attention.head_count_kv"].contents() == 2
    assert reader.fields["general.quantized_by"].contents() == "hfcompress" and is_our_gguf(out)
    by_layer = {layer.name: layer for layer in report.layers}
    n_q = 0
    scales = torch.cat([m.weight_scale.flatten().float() for m in hfcompress.compressed_modules(model).values()])
    assert bool((scales < 0).any()) and bool((scales > 0).any())  # the mse search's signed scales (ggml's own grid)
    for name, module in hfcompress.compressed_modules(model).items():
        ours = module.dequantize_weight(torch.float32)
        if model_type == "llama" and name.endswith(("q_proj", "k_proj")):
            ours = ours[qk_row_order(ours.shape[0], 4 if name.endswith("q_proj") else 2)]
        t = tensors[by_layer[name].target_name]
        assert t.tensor_type.name == "Q4_0"
        assert np.array_equal(_decoded(t), ours.numpy()), name
        n_q += 1
    assert n_q == 14
    # dense tensors: the embedding once (tied head: no output tensor), norms in float32 (+1 for Gemma)
    assert "output.weight" not in tensors
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "BF16"
    assert np.array_equal(_decoded(emb), model.model.embed_tokens.weight.detach().float().numpy())
    norm = tensors["output_norm.weight"]
    shift = 1.0 if model_type.startswith("gemma") else 0.0
    assert norm.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(norm.data), model.model.norm.weight.detach().float().numpy() + shift)
    if model_type == "qwen2":
        assert "blk.0.attn_q.bias" in tensors
    if model_type in ("qwen3", "gemma3_text"):
        assert "blk.0.attn_q_norm.weight" in tensors and reader.fields[f"{arch}.attention.key_length"].contents() == 32


def test_untied_head_written_once_each(tmp_path):
    model = compress(_tiny("llama", tie_word_embeddings=False), HfCompressConfig.for_export("gguf-q8_0"))
    out = tmp_path / "m.gguf"
    export(model, out, to="gguf", tokenizer=_byte_tokenizer())
    _, tensors = _read(out)
    assert "output.weight" in tensors and "token_embd.weight" in tensors
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"


def test_quantized_embedding_becomes_token_embd(tmp_path):
    model = compress(_tiny("llama", tie_word_embeddings=False), HfCompressConfig.for_export("gguf-q8_0", targets=["Linear", "Embedding"]))
    out = tmp_path / "m.gguf"
    assert export(model, out, to="gguf", tokenizer=_byte_tokenizer()).exact
    _, tensors = _read(out)
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "Q8_0"
    assert np.array_equal(_decoded(emb), model.model.embed_tokens.dequantize_weight(torch.float32).numpy())


@pytest.mark.parametrize("bits,qtype", [(5, "Q5_0"), (8, "Q8_0")])
def test_other_symmetric_widths(tmp_path, bits, qtype):
    model = compress(_tiny("qwen2"), HfCompressConfig(bits=bits, group_size=32, scale_dtype="float16"))
    out = tmp_path / "m.gguf"
    report = export(model, out, to="gguf", tokenizer=_byte_tokenizer())
    assert report.exact
    _, tensors = _read(out)
    w = model.model.layers[1].mlp.down_proj.dequantize_weight(torch.float32).numpy()
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == qtype and np.array_equal(_decoded(t), w)


@pytest.mark.parametrize("bits,qtype", [(4, "Q4_1"), (5, "Q5_1")])
def test_asymmetric_blocks_exact_when_minimum_fits_float16(bits, qtype):
    g = torch.Generator().manual_seed(bits)
    rows, cols = 4, 96
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 1 << bits, (rows, 3), generator=g, dtype=torch.uint8)
    scale = (2.0 ** torch.randint(-12, -4, (rows, 3), generator=g)).to(torch.float16)  # zero*scale is exact in float16
    spec = hfcompress.LayerSpec(bits=bits, group_size=32, symmetric=False)
    layer = QuantizedLayer("x", "Linear", spec, (rows, cols), codes, scale, zero, module=None)
    ours = hfcompress.grid.dequantize(codes, scale, zero, bits, 32)
    data = encode_exact(layer, qtype)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)
    assert np.array_equal(theirs, ours.numpy())


def test_asymmetric_minimum_rounding_refused_then_reported(tmp_path):
    model = compress(_tiny("llama"), HfCompressConfig(bits=4, group_size=32, symmetric=False, scale_dtype="float16"))
    with pytest.raises(ExportError, match="float16 cannot hold exactly") as err:
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer())
    assert "symmetric=True" in err.value.fix
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.iterdir())
    report = export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer(), requantize=True)
    assert len(report.requantized) == 14
    assert all(0 < layer.rel_error < 1e-2 for layer in report.requantized)  # codes kept, minima rounded
    reader, _ = _read(tmp_path / "m.gguf")
    assert reader.fields["hfcompress.exact"].contents() is False


@pytest.mark.parametrize("settings,fix", [
    ({"bits": 4, "group_size": 64}, "group_size=32"),
    ({"bits": 3, "group_size": 32}, "for_export('gguf-q4_0')"),
    ({"bits": 4, "group_size": 32, "scale_dtype": "float32"}, "scale_dtype='float16'"),
])  # fmt: skip
def test_grids_ggml_lacks_are_refused_with_the_fix(tmp_path, settings, fix):
    model = compress(_tiny("llama"), HfCompressConfig(**settings))
    with pytest.raises(ExportError) as err:
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer())
    assert fix in err.value.fix and err.value.layer.startswith("model.layers.0.")
    report = export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer(), requantize=True)
    assert report.requantized and all(layer.rel_error < 0.3 for layer in report.requantized)


def test_requested_type_other_than_the_grid_needs_requantize(tmp_path):
    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))
    with pytest.raises(ExportError, match="gguf_type='Q4_0'"):
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer(), gguf_type="Q8_0")
    report = export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer(), gguf_type="q8_0", requantize=True)
    assert {layer.target_type for layer in report.requantized} == {"Q8_0"}
    with pytest.raises(ValueError, match="K-quants"):
        export(model, tmp_path / "k.gguf", to="gguf", tokenizer=_byte_tokenizer(), gguf_type="Q4_K")


def test_dense_type_requantizes_dense_weights_with_report(tmp_path):
    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))
    report = export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer(), dense_type="Q8_0")
    (emb,) = [layer for layer in report.layers if layer.target_name == "token_embd.weight"]
    assert emb.target_type == "Q8_0" and not emb.exact and 0 < emb.rel_error < 0.01
    assert all(layer.exact for layer in report.layers if layer.source == "compressed")


def test_dense_model_exports_lossless(tmp_path):
    model = _tiny("llama")
    export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer())
    _, tensors = _read(tmp_path / "m.gguf")
    w = model.model.layers[0].mlp.gate_proj.weight.detach().float().numpy()
    assert tensors["blk.0.ffn_gate.weight"].tensor_type.name == "BF16" and np.array_equal(_decoded(tensors["blk.0.ffn_gate.weight"]), w)


# ---------------------------------------------------------------------- tokenizer
def test_tokenizer_metadata(tmp_path):
    tok = _byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))
    export(model, tmp_path / "m.gguf", to="gguf", tokenizer=tok)
    reader, _ = _read(tmp_path / "m.gguf")
    f = reader.fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 272  # padded to the model's vocabulary
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<|end|>"]] == int(gguf.TokenType.CONTROL) and types[271] == int(gguf.TokenType.UNUSED)
    assert f["tokenizer.ggml.eos_token_id"].contents() == vocab["<|end|>"]
    assert len(f["tokenizer.ggml.merges"].contents()) > 0
    assert f["tokenizer.chat_template"].contents() == tok.chat_template


def test_pre_tokenizer_names():
    from tokenizers import Regex, pre_tokenizers

    def name(pre):
        return pre_tokenizer_name(_byte_tokenizer(pre).backend_tokenizer.to_str())

    letters = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
    tail = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

    def split(pattern):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    assert name(pre_tokenizers.ByteLevel(add_prefix_space=False)) == "gpt-2"
    assert name(split(letters + r"\p{N}{1,3}" + tail)) == "llama-bpe"
    assert name(split(letters + r"\p{N}" + tail)) == "qwen2"
    assert name(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])) == "smollm"
    with pytest.raises(ValueError, match="matches none"):
        name(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))


def test_missing_tokenizer_refused(tmp_path):
    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))
    with pytest.raises(ValueError, match="tokenizer"):
        export(model, tmp_path / "m.gguf", to="gguf")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- the output file
def test_output_file_rules(tmp_path):
    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))
    src = tmp_path / "src"
    save_compressed(model, src, tokenizer=_byte_tokenizer(), card=False)
    with pytest.raises(ValueError, match=r"\.gguf"):
        export(src, tmp_path / "m.bin", to="gguf")
    with pytest.raises(OutputPathError, match="inside the input"):
        export(src, src / "m.gguf", to="gguf")
    out = tmp_path / "m.gguf"
    export(src, out, to="gguf")
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(FileExistsError):
        export(src, out, to="gguf")
    export(src, out, to="gguf", overwrite=True, dense_type="Q8_0")  # replaces a file we wrote
    other = tmp_path / "theirs.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(OutputPathError, match="not written by hfcompress"):
        export(src, other, to="gguf", overwrite=True)
    assert other.read_bytes() == b"GGUF" + b"\0" * 100
    # a killed run's temporary file is removed by the next run; nothing else is left behind
    leftover = tmp_path / ".m.gguf.tmp-dead"
    leftover.write_bytes(out.read_bytes()[:4096])
    export(src, out, to="gguf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src", "theirs.gguf"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import hfcompress.export.gguf as target

    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(target, "write_vocab", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer())
    assert not list(tmp_path.iterdir())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_gemma_attention_scale_llama_cpp_cannot_express_is_refused(tmp_path):
    model = compress(_tiny("gemma2", query_pre_attn_scalar=256), HfCompressConfig.for_export("gguf-q4_0"))
    with pytest.raises(ValueError, match="query_pre_attn_scalar=256"):
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer())


def test_unsupported_architecture_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=272))
    with pytest.raises(ValueError, match="model_type='gpt2' has no GGUF export"):
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer())


def test_compressed_tensors_options_refused_for_gguf(tmp_path):
    model = compress(_tiny("llama"), HfCompressConfig.for_export("gguf-q4_0"))
    with pytest.raises(TypeError, match="dtype"):
        export(model, tmp_path / "m.gguf", to="gguf", tokenizer=_byte_tokenizer(), dtype="float16")
    assert not list(tmp_path.iterdir())
