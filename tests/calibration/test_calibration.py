"""Calibration data, statistics hooks and the layer-by-layer pipeline behind ``hfcompress.oneshot``."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel

import hfcompress
from hfcompress import HfCompressConfig, LayerSpec, compressed_modules, oneshot
from hfcompress.algorithms import Method, get_method, register_method
from hfcompress.algorithms.rtn import rtn_compress
from hfcompress.calibration import LayerStats, StatsCollector, calibration_batches, layer_inputs_2d, text_windows
from hfcompress.calibration.blocks import find_blocks
from hfcompress.testing.models import tiny_llama, tiny_vit

# ---------------------------------------------------------------------- helpers


class CharTokenizer:
    """A stand-in tokenizer: one id per character (enough for windowing logic, no files needed)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return {"input_ids": [1 + ord(c) % 250 for c in text]}


TEXTS = [f"Document number {i} talks about topic {i % 7} in some detail. " * (1 + i % 3) for i in range(60)]
SEEN: dict[str, LayerStats] = {}


def _spy_compress_layer(weight, stats, spec, args):
    if args:
        raise ValueError(f"method_args {sorted(args)} are not understood by method='test_spy_rtn'.")
    SEEN[f"call{len(SEEN)}"] = stats
    return rtn_compress(weight, spec)


def _failing_compress_layer(weight, stats, spec, args):
    if len(SEEN) >= 3:
        raise RuntimeError("boom")
    SEEN[f"call{len(SEEN)}"] = stats
    return rtn_compress(weight, spec)


def _register(name, fn, needs):
    try:
        get_method(name)
    except ValueError:
        register_method(Method(name, False, True, False, "test method", needs=frozenset(needs), compress_layer=fn))


_register("test_spy_rtn", _spy_compress_layer, {"hessian", "act_sq"})
_register("test_failing", _failing_compress_layer, {"act_sq"})


def _ids(n=8, seq=32, seed=0, vocab=256):
    return torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _no_hooks_left(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name
        assert "forward" not in module.__dict__ and "dequantize_weight" not in module.__dict__, name


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- data


def test_list_of_strings_gives_reproducible_full_windows():
    tok = CharTokenizer()
    a = calibration_batches(TEXTS, tok, num_samples=6, seq_len=50, seed=0, batch_size=4)
    assert [b["input_ids"].shape for b in a] == [(4, 50), (2, 50)]
    b = calibration_batches(TEXTS, tok, num_samples=6, seq_len=50, seed=0, batch_size=4)
    c = calibration_batches(TEXTS, tok, num_samples=6, seq_len=50, seed=1, batch_size=4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    ids = torch.cat([x["input_ids"] for x in a]).flatten()
    assert (ids == tok.eos_token_id).sum() >= 1  # documents are joined with EOS
    assert ids.dtype == torch.long


def test_datasets_sources_and_column_detection():
    from datasets import Dataset

    tok = CharTokenizer()
    ds = Dataset.from_dict({"id": list(range(len(TEXTS))), "content": TEXTS})
    w1 = text_windows(hfcompress.calibration.iter_texts(ds, seed=3), tok, 4, 40)
    w2 = text_windows(hfcompress.calibration.iter_texts(ds, seed=3, text_column="content"), tok, 4, 40)
    assert torch.equal(w1, w2) and w1.shape == (4, 40)
    streamed = ds.to_iterable_dataset()
    w3 = text_windows(hfcompress.calibration.iter_texts(streamed, seed=3), tok, 4, 40)
    assert w3.shape == (4, 40)
    tokenised = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9]] * 20})
    w4 = text_windows(hfcompress.calibration.iter_texts(tokenised), tok, 2, 12)
    assert w4[0].tolist() == [5, 6, 7, 8, 9, 0, 5, 6, 7, 8, 9, 0]
    with pytest.raises(ValueError, match="text_column='body'"):
        list(hfcompress.calibration.iter_texts(ds, text_column="body"))
    with pytest.raises(ValueError, match="no text column"):
        list(hfcompress.calibration.iter_texts(Dataset.from_dict({"x": [1, 2]})))


def test_local_files(tmp_path):
    tok = CharTokenizer()
    txt = tmp_path / "calib.txt"
    txt.write_text("\n\n".join(TEXTS), encoding="utf-8")
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(TEXTS)), encoding="utf-8")
    csv = tmp_path / "calib.csv"
    csv.write_text("text\n" + "\n".join(f'"{t}"' for t in TEXTS), encoding="utf-8")
    for path in (txt, jsonl, csv):
        batches = calibration_batches(str(path), tok, num_samples=3, seq_len=64, batch_size=3)
        assert batches[0]["input_ids"].shape == (3, 64)
    from_txt = calibration_batches(txt, tok, num_samples=3, seq_len=64, batch_size=3)
    from_list = calibration_batches([t.strip() for t in TEXTS], tok, num_samples=3, seq_len=64, batch_size=3)
    assert torch.equal(from_txt[0]["input_ids"], from_list[0]["input_ids"])  # paragraphs = documents
    xml = tmp_path / "calib.xml"
    xml.write_text("<a/>", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type '.xml'"):
        calibration_batches(str(xml), tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration_batches(str(tmp_path / "missing.jsonl"), tok)


def test_default_wikipedia_summaries():
    texts = hfcompress.calibration.wikipedia_summaries()
    assert len(texts) > 5000 and all(isinstance(t, str) and t for t in texts[:100])
    batches = calibration_batches(None, CharTokenizer(), num_samples=4, seq_len=256, batch_size=2)
    assert len(batches) == 2 and batches[1]["input_ids"].shape == (2, 256)


def test_data_errors():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="fewer than num_samples"):
        calibration_batches(["short text"], tok, num_samples=4, seq_len=64)
    with pytest.raises(ValueError, match="num_samples=0"):
        calibration_batches(TEXTS, tok, num_samples=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        calibration_batches(TEXTS, tok, batch_size=0)
    with pytest.raises(ValueError, match="must hold strings"):
        calibration_batches(["ok", 3], tok)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_batches(TEXTS, None)
    with pytest.raises(TypeError, match="not supported"):
        calibration_batches(42, tok)
    with pytest.raises(ValueError, match="dict of tensors"):
        calibration_batches([{"input_ids": [1, 2]}], tok)


def test_tensor_and_ready_batches():
    ids = _ids(5, 16)
    batches = calibration_batches(ids, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    pixels = torch.randn(3, 3, 8, 8)
    assert set(calibration_batches(pixels, main_input_name="pixel_values")[0]) == {"pixel_values"}
    ready = [{"input_ids": ids[:2], "attention_mask": torch.ones(2, 16, dtype=torch.long)}]
    assert calibration_batches(ready) == ready


# ---------------------------------------------------------------------- statistics


def test_linear_statistics_and_shared_inputs():
    a, b = nn.Linear(6, 3), nn.Linear(6, 5)
    xs = [torch.randn(2, 7, 6), torch.randn(1, 4, 6)]
    with StatsCollector({"a": a, "b": b}, {"hessian", "act_sq"}) as col:
        for x in xs:
            a(x), b(x)  # same input tensor: products computed once, both accumulate
    assert not a._forward_pre_hooks and not b._forward_pre_hooks
    x2 = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    for name in ("a", "b"):
        s = col.stats(name)
        assert s.nsamples == 18
        torch.testing.assert_close(s.hessian, (2 * x2.t() @ x2 / 18).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.act_sq, x2.pow(2).sum(0).float(), rtol=1e-5, atol=1e-6)
    only_sq = StatsCollector({"a": a}, {"act_sq"})
    with only_sq:
        a(xs[0])
    assert only_sq.stats("a").hessian is None and only_sq.stats("a").act_sq is not None


def test_bfloat16_inputs_give_close_statistics():
    lin = nn.Linear(64, 8).bfloat16()
    xs = [torch.randn(4, 128, 64).bfloat16() for _ in range(4)]
    with StatsCollector({"l": lin}, {"hessian", "act_sq"}) as col:
        for x in xs:
            lin(x)
    x2 = torch.cat([x.reshape(-1, 64) for x in xs]).double()  # the exact products of the same bf16 inputs
    ref = 2 * x2.t() @ x2 / x2.shape[0]
    s = col.stats("l")
    assert s.hessian.dtype == torch.float32 and s.nsamples == 4 * 4 * 128
    assert (s.hessian.double() - ref).abs().max() < 4e-3 * ref.diagonal().max()
    torch.testing.assert_close(s.act_sq.double(), x2.pow(2).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, (3, 2), dilation=(1, 2), padding="same"),
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_conv_inputs_match_weight_columns(conv):
    x = torch.randn(2, conv.in_channels, 9, 9)
    patches = layer_inputs_2d(conv, x)  # [N*L, cols] in the column order of weight.reshape(out, -1)
    y = conv(x) - conv.bias.view(1, -1, 1, 1)
    y2 = patches @ conv.weight.reshape(conv.out_channels, -1).t()
    torch.testing.assert_close(y2, y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), rtol=1e-4, atol=1e-4)


def test_depthwise_conv_pools_channel_groups():
    conv = nn.Conv2d(4, 4, 3, groups=4, padding=1)
    x = torch.randn(1, 4, 5, 5)
    patches = layer_inputs_2d(conv, x)
    assert patches.shape == (4 * 25, 9)
    with StatsCollector({"c": conv}, {"hessian"}) as col:
        conv(x)
    assert col.stats("c").hessian.shape == (9, 9)


# ---------------------------------------------------------------------- pipeline


def test_find_blocks():
    assert find_blocks(tiny_llama())[0] == "model.layers"
    assert find_blocks(tiny_vit())[0] == "vit.layers"
    assert find_blocks(tiny_llama(), "model.layers")[0] == "model.layers"
    with pytest.raises(ValueError, match="blocks='model.norm'"):
        find_blocks(tiny_llama(), "model.norm")
    with pytest.raises(ValueError, match="not a submodule"):
        find_blocks(tiny_llama(), "model.nope")


def test_gptq_on_tiny_llama_reloads_bit_exactly(tmp_path):
    model = tiny_llama()
    dense = tiny_llama()
    ids = _ids(8, 48)
    config = HfCompressConfig(method="gptq", bits=4, group_size=32)
    _, results = oneshot(model, config, ids, batch_size=3, show_progress=False, return_results=True)
    _no_hooks_left(model)
    names = set(compressed_modules(model))
    assert len(names) == 14 and names == set(results)
    assert all(0 <= r.error < 0.05 and r.nsamples == 8 * 48 for r in results.values())
    x = _ids(2, 40, seed=5)
    with torch.no_grad():
        out, ref = model(x).logits, dense(x).logits
    assert (out - ref).pow(2).mean() / ref.pow(2).mean() < 0.02
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.method == "gptq"
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, out)


def test_inputs_propagate_through_compressed_blocks():
    """Block 1 is calibrated on the outputs of the *compressed* block 0, exactly."""
    SEEN.clear()
    ids = _ids(4, 32)
    model = tiny_llama()
    oneshot(model, HfCompressConfig(method="test_spy_rtn", bits=3, group_size=32), ids, batch_size=2, show_progress=False)
    calls = list(SEEN.values())
    assert len(calls) == 14
    q1_stats = calls[7]  # model.layers.1.self_attn.q_proj (modules run in definition order)

    def q1_input_hessian(m):
        seen = []
        h = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, 96)))
        with torch.no_grad():
            m(ids)
        h.remove()
        x = torch.cat(seen).double()
        return (2 * x.t() @ x / x.shape[0]).float()

    rtn_model = tiny_llama()  # dense modules holding the RTN-decoded weights: the compressed model's arithmetic
    for module in rtn_model.modules():
        if isinstance(module, nn.Linear) and module is not rtn_model.lm_head:
            module.weight.data = rtn_compress(module.weight.data, LayerSpec(bits=3, group_size=32)).weight
    torch.testing.assert_close(q1_stats.hessian, q1_input_hessian(rtn_model), rtol=1e-4, atol=1e-5)
    dense_h = q1_input_hessian(tiny_llama())
    assert (q1_stats.hessian - dense_h).abs().max() > 1e-3  # the dense model's inputs would differ
    torch.testing.assert_close(q1_stats.act_sq, torch.diagonal(q1_stats.hessian) * q1_stats.nsamples / 2, rtol=1e-4, atol=1e-4)


def test_calibration_memory_is_released():
    model = tiny_llama(hidden_size=88)  # a hidden size no other tensor in the test session has
    ids = _ids(6, 40)
    oneshot(model, HfCompressConfig(method="gptq", bits=4, group_size=32), ids, batch_size=3, show_progress=False)
    gc.collect()
    leaked = [
        t.shape
        for t in gc.get_objects()
        if type(t) is torch.Tensor and t.dim() == 3 and t.shape[-1] == 88 and t.shape[1] == 40
    ]
    assert not leaked
    _no_hooks_left(model)


def test_failure_restores_the_model():
    SEEN.clear()
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        oneshot(model, HfCompressConfig(method="test_failing", bits=4), _ids(), show_progress=False)
    assert not compressed_modules(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _no_hooks_left(model)
    assert not getattr(model, "is_quantized", False)


def test_bad_arguments_leave_the_model_untouched():
    model = tiny_llama()
    before = _state(model)
    cfg = HfCompressConfig(method="gptq", bits=4)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        oneshot(model, cfg, TEXTS)
    with pytest.raises(ValueError, match="damping"):
        oneshot(model, HfCompressConfig(method="gptq", bits=4, method_args={"damping": 1}), _ids(), show_progress=False)
    with pytest.raises(ValueError, match="layer_specs key 'layers.0.mlp.up_proj'"):
        oneshot(model, cfg, _ids(), layer_specs={"layers.0.mlp.up_proj": LayerSpec(bits=8)})
    with pytest.raises(ValueError, match="does not prune"):
        oneshot(model, cfg, _ids(), layer_specs={"model.layers.0.mlp.up_proj": LayerSpec(bits=None, sparsity=0.5)})
    with pytest.raises(TypeError, match="HfCompressConfig"):
        oneshot(model, {"bits": 4}, _ids())
    with pytest.raises(ValueError, match="blocks="):
        oneshot(model, cfg, _ids(), blocks="model.norm")
    with pytest.raises(ValueError, match="needs calibration data"):
        hfcompress.compress(model, cfg)
    assert not compressed_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _no_hooks_left(model)
    oneshot(model, cfg, _ids(), show_progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        oneshot(model, cfg, _ids())


def test_tokenizer_and_text_path_with_real_tokenizer_folder(tmp_path):
    """``oneshot`` falls back to the tokenizer saved beside a locally loaded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(sorted({w for t in TEXTS for w in t.split()}))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    tiny_llama().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    oneshot(model, HfCompressConfig(method="gptq", bits=8, group_size=None), TEXTS, num_samples=4, seq_len=32, show_progress=False)
    assert len(compressed_modules(model)) == 14


def test_true_sequential_calibrates_in_execution_order():
    ids = _ids(6, 32)
    cfg = HfCompressConfig(method="gptq", bits=3, group_size=32)
    _, seq = oneshot(tiny_llama(), cfg, ids, true_sequential=True, show_progress=False, return_results=True)
    _, blk = oneshot(tiny_llama(), cfg, ids, show_progress=False, return_results=True)
    first = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    for name in first:  # the first stage sees the same (dense) inputs either way
        assert seq[name].error == pytest.approx(blk[name].error, rel=1e-5)
    assert seq["model.layers.0.mlp.down_proj"].error != pytest.approx(blk["model.layers.0.mlp.down_proj"].error, rel=1e-3)


def test_layer_specs_are_saved_as_overrides(tmp_path):
    model = tiny_llama()
    specs = {"model.layers.1.mlp.down_proj": LayerSpec(bits=8, group_size=None), "model.layers.0.self_attn.q_proj": LayerSpec(bits=3, group_size=16)}
    oneshot(model, HfCompressConfig(method="gptq", bits=4, group_size=32), _ids(), layer_specs=specs, show_progress=False)
    mods = compressed_modules(model)
    assert mods["model.layers.1.mlp.down_proj"].spec == specs["model.layers.1.mlp.down_proj"]
    assert mods["model.layers.0.self_attn.q_proj"].spec.bits == 3
    assert mods["model.layers.0.mlp.up_proj"].spec == LayerSpec(bits=4, group_size=32)
    assert len(model.config.quantization_config.overrides) == 2
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert compressed_modules(reloaded)["model.layers.0.self_attn.q_proj"].spec.bits == 3
    x = _ids(1, 20, seed=9)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_data_free_method_through_oneshot_equals_compress():
    cfg = HfCompressConfig(bits=4, group_size=32)
    a = oneshot(tiny_llama(), cfg, None)
    b = hfcompress.compress(tiny_llama(), cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def test_bert_encoder_and_pooler_after_the_blocks():
    model, dense = _tiny_bert(), _tiny_bert()
    ids = _ids(6, 24, vocab=128)
    batches = [{"input_ids": ids[:3], "attention_mask": torch.ones(3, 24, dtype=torch.long)}, {"input_ids": ids[3:]}]
    _, results = oneshot(model, HfCompressConfig(method="gptq", bits=8, group_size=None), batches, return_results=True, show_progress=False)
    assert "pooler.dense" in results and results["pooler.dense"].nsamples == 6  # it reads the first token only
    assert len(compressed_modules(model)) == 2 * 6 + 1
    _no_hooks_left(model)
    with torch.no_grad():
        out, ref = model(ids).pooler_output, dense(ids).pooler_output
    assert (out - ref).abs().max() < 0.05


def test_vit_with_conv_stem_before_the_blocks(tmp_path):
    model, dense = tiny_vit(), tiny_vit()
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = HfCompressConfig(method="gptq", bits=8, group_size=None, targets=["Linear", "Conv2d"], ignore=["classifier"])
    _, results = oneshot(model, cfg, pixels, batch_size=4, return_results=True, show_progress=False)
    stem = "vit.embeddings.patch_embeddings.projection"
    assert stem in results and results[stem].nsamples == 6 * 64  # one patch vector per 4x4 patch
    assert isinstance(compressed_modules(model)[stem], hfcompress.CompressedConv2d)
    with torch.no_grad():
        out, ref = model(pixels).logits, dense(pixels).logits
    assert (out - ref).abs().max() < 0.05
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForImageClassification

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, out)


def test_accelerate_offloaded_model_gives_the_same_result(tmp_path):
    """A model dispatched with a device_map that offloads blocks to disk is compressed block by block and
    ends up exactly like the in-memory one."""
    tiny_llama().save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map, offload_folder=str(tmp_path / "off"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    cfg = HfCompressConfig(method="gptq", bits=4, group_size=32)
    oneshot(offloaded, cfg, _ids(), show_progress=False)
    oneshot(plain, cfg, _ids(), show_progress=False)
    a, b = compressed_modules(offloaded), compressed_modules(plain)
    assert a.keys() == b.keys()
    for name in a:
        for t_name, t in b[name].compressed_tensors().items():
            assert torch.equal(a[name].compressed_tensors()[t_name], t), f"{name}.{t_name}"
    x = _ids(1, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(x).logits, plain(x).logits)


def test_unaligned_weights_get_aligned_storage_of_their_own():
    from hfcompress.calibration.pipeline import own_aligned_storage

    layer = nn.Linear(16, 8)
    buffer = torch.randn(8 * 16 + 2)
    view = buffer[2:].view(8, 16)  # 8 bytes past an aligned address, as inside a memory-mapped file
    assert view.data_ptr() % 64
    layer.weight.data = view
    before = layer.weight.detach().clone()
    assert own_aligned_storage(layer) == 1
    assert layer.weight.data_ptr() % 64 == 0 and layer.weight.data_ptr() != view.data_ptr()
    assert torch.equal(layer.weight, before) and isinstance(layer.weight, nn.Parameter)
    assert own_aligned_storage(layer) == 0  # already aligned: nothing copied


# ---------------------------------------------------------------------- the public per-block step
def test_calibrate_block_walked_by_hand_gives_what_run_calibration_gives():
    from hfcompress.calibration.blocks import capture_block_inputs
    from hfcompress.calibration.step import CalibrationRun, calibrate_block, entry_state
    from hfcompress.plan.targets import resolve_layers

    config = HfCompressConfig(method="blocktune", bits=4, group_size=32, method_args={"tune_samples": 2, "tune_batch_size": 2})
    ids = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    reference = oneshot(tiny_llama(num_hidden_layers=2), config, ids, batch_size=2, show_progress=False)
    model = tiny_llama(num_hidden_layers=2).eval()
    plan = resolve_layers(model, config)
    run = CalibrationRun(model, plan, get_method("blocktune"), config.method_args)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}])
    state = entry_state(run, inputs.hidden, inputs.rows)
    assert len(state.dense_hidden) == 1  # block tuning keeps the dense batches its tune_samples come from
    for i, block in enumerate(blocks):
        state = calibrate_block(run, inputs, block, i, [n for n in plan if n.startswith(f"model.layers.{i}.")], state)
    run.commit()
    expected = reference.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def test_calibrate_block_errors_name_the_argument_and_the_fix():
    from hfcompress.calibration.blocks import capture_block_inputs
    from hfcompress.calibration.step import CalibrationRun, CalibrationState, calibrate_block, entry_state
    from hfcompress.plan.targets import resolve_layers

    model = tiny_llama(num_hidden_layers=2).eval()
    config = HfCompressConfig(method="blocktune", bits=4, group_size=32)
    plan = resolve_layers(model, config)
    with pytest.raises(ValueError, match=r"method='rtn' is data-free; use hfcompress.compress"):
        CalibrationRun(model, plan, get_method("rtn"), {})
    run = CalibrationRun(model, plan, get_method("blocktune"), {})
    _, blocks = find_blocks(model)
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, [{"input_ids": torch.ones(2, 8, dtype=torch.long)}])
    names = [n for n in plan if n.startswith("model.layers.0.")]
    with pytest.raises(ValueError, match=r"state.dense_hidden=None, but method='blocktune'.*entry_state"):
        calibrate_block(run, inputs, blocks[0], 0, names, CalibrationState(inputs.hidden))
    with pytest.raises(ValueError, match=r"state.hidden holds 2 batches but block_inputs recorded 1.*entry_state"):
        calibrate_block(run, inputs, blocks[0], 0, names, CalibrationState(inputs.hidden * 2, inputs.hidden))
    with pytest.raises(ValueError, match=r"names=\['model.layers.0.nope'\] are not in run.plan"):
        calibrate_block(run, inputs, blocks[0], 0, ["model.layers.0.nope"], entry_state(run, inputs.hidden, inputs.rows))
    assert not run.replaced  # nothing was compressed
