"""Per-layer allocation: exact global target, the shape each scheme promises, recorded in the config, reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, compress, compressed_modules, oneshot
from hfcompress.testing.models import tiny_llama
from hfcompress.sparsity.allocation import apportion, global_counts, lamp_scores, owl_sparsities
from hfcompress.plan.targets import resolve_layers

CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _pruned_counts(model):
    return {n: int((m.dequantize_weight(torch.float32) == 0).sum()) for n, m in compressed_modules(model).items()}


def _numels(model):
    return {n: m.dequantize_weight(torch.float32).numel() for n, m in compressed_modules(model).items()}


def _scaled_llama():
    model = tiny_llama()
    with torch.no_grad():  # layers of very different scales, as in real models
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(4.0 if i else 0.25)
    return model


@pytest.mark.parametrize("kind", ["global", "lamp"])
def test_global_and_lamp_hit_the_target_exactly_and_differ_per_layer(kind, tmp_path):
    model = _scaled_llama()
    cfg = HfCompressConfig(method="magnitude", sparsity=0.6, method_args={"allocation": kind})
    compress(model, cfg)
    counts, numels = _pruned_counts(model), _numels(model)
    assert sum(counts.values()) == sum(round(0.6 * n) for n in numels.values())
    sparsities = {n: counts[n] / numels[n] for n in counts}
    assert max(sparsities.values()) - min(sparsities.values()) > 0.05  # really non-uniform
    # the small-scale down_proj of layer 0 is pruned harder than the large one of layer 1
    assert sparsities["model.layers.0.mlp.down_proj"] > sparsities["model.layers.1.mlp.down_proj"]
    saved = model.config.quantization_config
    assert len(saved.overrides) == len(counts)
    with torch.no_grad():
        before = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert raw["method_args"]["allocation"] == kind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(before, reloaded(IDS).logits)
    assert _pruned_counts(reloaded) == counts


@pytest.mark.slow
def test_owl_through_oneshot_keeps_target_and_bounds(tmp_path):
    model = tiny_llama()
    cfg = HfCompressConfig(method="wanda", sparsity=0.5, method_args={"allocation": "owl", "owl_lambda": 0.1})
    oneshot(model, cfg, CALIB, batch_size=3, show_progress=False)
    counts, numels = _pruned_counts(model), _numels(model)
    assert sum(counts.values()) == sum(round(0.5 * n) for n in numels.values())
    per_block = {}
    for n in counts:
        per_block.setdefault(n.split(".")[2], []).append(counts[n] / numels[n])
    for values in per_block.values():  # one sparsity per block, within [s - lambda, s + lambda]
        assert max(values) - min(values) < 0.01
        assert 0.39 <= values[0] <= 0.61
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert _pruned_counts(reloaded) == counts


def test_allocation_errors(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="cannot run while from_pretrained"):
        cfg = HfCompressConfig(method="magnitude", sparsity=0.5, method_args={"allocation": "lamp"})
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg)
    with pytest.raises(ValueError, match="allocation.*not supported"):
        compress(tiny_llama(), HfCompressConfig(method="magnitude", sparsity=0.5, method_args={"allocation": "erk"}))
    with pytest.raises(ValueError, match="N:M"):
        compress(tiny_llama(), HfCompressConfig(method="magnitude", sparsity_structure="2:4", method_args={"allocation": "lamp"}))
    with pytest.raises(ValueError, match="owl.*calibration"):
        compress(tiny_llama(), HfCompressConfig(method="magnitude", sparsity=0.5, method_args={"allocation": "owl"}))
    with pytest.raises(ValueError, match="max_sparsity"):
        apportion({"a": 5.0, "b": 5.0}, {"a": 10, "b": 10}, 19, max_sparsity=0.9)


def test_apportion_is_exact_and_keeps_shape():
    out = apportion({"a": 10.4, "b": 20.4, "c": 30.2}, {"a": 100, "b": 100, "c": 100}, 61)
    assert sum(out.values()) == 61 and out["a"] < out["b"] < out["c"]
    out = apportion({"a": 95.0, "b": 5.0}, {"a": 100, "b": 100}, 100, max_sparsity=0.9)
    assert out == {"a": 90, "b": 10}


def test_global_counts_with_ties_is_exact():
    scores = {"a": torch.tensor([0.0, 1.0, 1.0, 2.0]), "b": torch.tensor([1.0, 1.0, 3.0])}
    for total in range(8):
        out = global_counts(scores, total, {"a": 4, "b": 3})
        assert sum(out.values()) == total


def test_lamp_scores_are_monotone_and_end_at_one():
    s = lamp_scores(torch.tensor([[3.0, -1.0], [0.5, 2.0]]))
    assert torch.all(s[1:] >= s[:-1]) and s[-1] == 1.0


def test_owl_sparsities_average_to_target():
    out = owl_sparsities({"a": 0.01, "b": 0.02, "c": 0.05}, 0.5, 0.08)
    assert sum(out.values()) / 3 == pytest.approx(0.5)
    assert out["a"] > out["b"] > out["c"]  # more outliers, denser
    assert max(out.values()) - min(out.values()) == pytest.approx(0.16)


def test_resolve_layers_sees_pinned_specs():
    model = _scaled_llama()
    compress(model, HfCompressConfig(method="magnitude", sparsity=0.5, method_args={"allocation": "lamp"}))
    plan = resolve_layers(tiny_llama(), model.config.quantization_config)
    assert len({round(s.sparsity, 6) for s in plan.values()}) > 1
