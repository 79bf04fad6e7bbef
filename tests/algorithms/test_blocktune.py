"""``blocktune``: layer-wise codes kept, scales tuned on block outputs against the dense model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, oneshot
from hfcompress.algorithms.blocktune import BlockTuneOptions
from hfcompress.calibration.blocks import capture_block_inputs, find_blocks
from hfcompress.testing.models import tiny_llama

TUNE = {"tune_samples": 8, "tune_batch_size": 2}


def _ids(n=8, seq=32, seed=0):
    return torch.randint(1, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _compressed(method: str, **method_args) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_llama(num_hidden_layers=3)
    oneshot(model, HfCompressConfig(method=method, bits=3, group_size=32, method_args=method_args), _ids(), batch_size=4, show_progress=False)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _output_error(model, ids) -> float:
    dense = tiny_llama(num_hidden_layers=3)
    with torch.no_grad():
        ref = dense(ids).logits
        return float((model(ids).logits - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("start", ["quantease", "gptq"])
def test_codes_of_the_start_kept_scales_tuned_error_lower_and_reload_exact(start, tmp_path):
    base, base_sd = _compressed(start)
    tuned, tuned_sd = _compressed("blocktune", start=start, **TUNE)
    assert sorted(base_sd) == sorted(tuned_sd)
    packed = [k for k in base_sd if k.endswith("weight_packed")]
    scales = [k for k in base_sd if k.endswith("weight_scale")]
    assert len(packed) == len(scales) == 21
    # block 0 keeps the start's integer codes; later blocks are calibrated on the tuned blocks' outputs
    first = [k for k in packed if ".layers.0." in k]
    assert len(first) == 7 and all(torch.equal(base_sd[k], tuned_sd[k]) for k in first)
    changed = [k for k in scales if not torch.equal(base_sd[k], tuned_sd[k])]
    assert len(changed) == len(scales)
    assert all(tuned_sd[k].dtype == torch.float16 for k in scales)
    norms = [k for k in base_sd if k.endswith("layernorm.weight")]
    assert norms and any(not torch.equal(base_sd[k], tuned_sd[k]) for k in norms)  # gains tuned too
    calib = _ids()
    assert _output_error(tuned, calib) < 0.95 * _output_error(base, calib)
    tuned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.method == "blocktune"
    x = _ids(2, 24, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, tuned(x).logits)


def test_no_tuning_step_keeps_the_layer_wise_result_exactly():
    _, base_sd = _compressed("quantease")
    _, same_sd = _compressed("blocktune", tune_epochs=0, **TUNE)
    assert all(torch.equal(base_sd[k], same_sd[k]) for k in base_sd)


def test_dense_gains_stay_when_their_learning_rate_is_zero():
    dense_sd = tiny_llama(num_hidden_layers=3).state_dict()
    _, sd = _compressed("blocktune", tune_norm_lr=0.0, **TUNE)
    norms = [k for k in sd if "norm" in k]
    assert norms and all(torch.equal(sd[k], dense_sd[k]) for k in norms)


@pytest.mark.parametrize(
    "args, match",
    [
        ({"tune_lr": -1.0}, "tune_lr=-1.0"),
        ({"tune_samples": 0}, "tune_samples=0"),
        ({"tune_batch_size": 1.5}, "tune_batch_size=1.5"),
        ({"tune_autocast": "int8"}, "tune_autocast='int8'"),
        ({"start": "rtn"}, "start='rtn'"),
        ({"start": "gptq", "sweeps": 2}, "sweeps"),
        ({"tune_steps": 3}, "not understood"),
    ],
)
def test_bad_method_args_raise_before_touching_the_model(args, match):
    model = tiny_llama(num_hidden_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        oneshot(model, HfCompressConfig(method="blocktune", bits=4, group_size=32, method_args=args), _ids(4), show_progress=False)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_options_defaults():
    assert BlockTuneOptions.from_method_args({}) == BlockTuneOptions()
    assert BlockTuneOptions.from_method_args({"tune_autocast": None, "damp": 0.1}).autocast is None


def test_call_rows_runs_a_slice_of_a_batch_like_the_whole_batch():
    model = tiny_llama(num_hidden_layers=2).eval()
    _, blocks = find_blocks(model, None)
    rec = capture_block_inputs(model, blocks, [{"input_ids": _ids(4, 16)}])
    assert rec.rows == [4]
    with torch.no_grad():
        full = rec.call(blocks[0], 0, 0, rec.hidden[0])
        part = rec.call_rows(blocks[0], 0, 0, slice(1, 3), rec.hidden[0][1:3])
    torch.testing.assert_close(part, full[1:3], rtol=1e-5, atol=1e-6)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def test_bert_encoder_with_mixed_masks_and_a_pooler_after_the_blocks():
    from transformers import BertConfig, BertModel

    def bert():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        return BertModel(cfg).eval()

    ids = torch.randint(1, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[:4], "attention_mask": torch.ones(4, 24, dtype=torch.long)}, {"input_ids": ids[4:]}]
    dense = bert()
    errors = {}
    for method in ("quantease", "blocktune"):
        model = bert()
        oneshot(model, HfCompressConfig(method=method, bits=3, group_size=16, method_args=TUNE if method == "blocktune" else {}), batches, show_progress=False)
        with torch.no_grad():
            errors[method] = _relative_error(model(ids).last_hidden_state, dense(ids).last_hidden_state)
    assert errors["blocktune"] < errors["quantease"]


def test_vit_with_a_conv_stem_before_the_blocks(tmp_path):
    from transformers import AutoModelForImageClassification

    from hfcompress.testing.models import tiny_vit

    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = dict(bits=3, group_size=16, targets=["Linear", "Conv2d"], ignore=["classifier"])
    dense = tiny_vit()
    errors, models = {}, {}
    for method in ("quantease", "blocktune"):
        model = tiny_vit()
        oneshot(model, HfCompressConfig(method=method, method_args=TUNE if method == "blocktune" else {}, **cfg), pixels, batch_size=4, show_progress=False)
        with torch.no_grad():
            errors[method] = _relative_error(model(pixels).logits, dense(pixels).logits)
        models[method] = model
    assert errors["blocktune"] < errors["quantease"]
    models["blocktune"].save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, models["blocktune"](pixels).logits)


def test_disk_offloaded_model_tunes_like_the_in_memory_one(tmp_path):
    from hfcompress import compressed_modules

    tiny_llama().save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map, offload_folder=str(tmp_path / "off"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    # offloaded blocks keep their dense gains (the offload store is not written back), so compare scales only
    cfg = HfCompressConfig(method="blocktune", bits=4, group_size=32, method_args={**TUNE, "tune_norm_lr": 0.0})
    oneshot(offloaded, cfg, _ids(), show_progress=False)
    oneshot(plain, cfg, _ids(), show_progress=False)
    a, b = compressed_modules(offloaded), compressed_modules(plain)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        for t_name, t in b[name].compressed_tensors().items():
            assert torch.equal(a[name].compressed_tensors()[t_name], t), f"{name}.{t_name}"
