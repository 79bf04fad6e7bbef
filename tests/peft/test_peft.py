"""LoRA on compressed bases through PEFT's custom-layer API: gradients, merges, save/load (tiny Llama, fast)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, compress
from hfcompress import peft as hpeft
from hfcompress.grid import expand_groups
from hfcompress.testing.models import tiny_llama
from hfcompress.modules import CompressedLinear, compressed_modules

CONFIGS = {
    "w4": dict(bits=4, group_size=32),
    "sparse50": dict(method="magnitude", sparsity=0.5),
    "sparse50-w4": dict(method="magnitude", sparsity=0.5, bits=4, group_size=32, symmetric=False),
    "2:4-w4": dict(method="magnitude", sparsity_structure="2:4", bits=4, group_size=32),
}


def compressed_tiny(kind: str, seed: int = 0):
    model = tiny_llama(seed=seed)
    compress(model, HfCompressConfig(**CONFIGS[kind]))
    return model


def lora_config(**kw) -> LoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", "all-linear")
    return LoraConfig(**kw)


def randomize_lora(model, std: float = 0.01, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def packed_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in compressed_modules(model).items() for k, v in m.compressed_tensors().items()}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_only_adapters_train_and_base_stays_packed(kind, ids):
    model = compressed_tiny(kind)
    before = packed_state(model)
    lora = hpeft.get_peft_model(model, lora_config())
    layers = hpeft.compressed_lora_layers(lora)
    assert len(layers) == 14 and all(isinstance(l.get_base_layer(), CompressedLinear) for l in layers.values())
    randomize_lora(lora)
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    loss = lora(ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert with_grad == trainable and len(with_grad) == 28
    assert all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if ".lora_A." in n)
    opt.step()
    after = packed_state(lora)
    assert before.keys() == {k.removeprefix("base_model.model.").replace(".base_layer", "") for k in after}
    for k, v in after.items():
        assert torch.equal(v, before[k.removeprefix("base_model.model.").replace(".base_layer", "")]), k


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_fresh_adapter_is_identity(kind, ids):
    model = compressed_tiny(kind)
    with torch.no_grad():
        base = model(ids).logits
    lora = hpeft.get_peft_model(model, lora_config()).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, base, rtol=0, atol=1e-6)


def test_sparse_update_is_masked():
    model = compressed_tiny("sparse50")
    lora = hpeft.get_peft_model(model, lora_config())
    randomize_lora(lora)
    for layer in hpeft.compressed_lora_layers(lora).values():
        mask = hpeft.sparsity_mask(layer.get_base_layer())
        delta = layer.get_delta_weight("default")
        assert torch.all(delta[~mask] == 0) and torch.count_nonzero(delta[mask]) > 0.9 * mask.sum()
        w = layer.effective_weight(["default"])
        assert torch.all(w[~mask] == 0)


@pytest.mark.parametrize("kind", ["sparse50", "2:4-w4", "sparse50-w4"])
def test_merge_keeps_masks_and_logits(kind, ids, tmp_path):
    model = compressed_tiny(kind)
    masks = hpeft.sparsity_masks(model)
    lora = hpeft.get_peft_model(model, lora_config(), quant_aware=True).eval()
    randomize_lora(lora, std=0.02)
    with torch.no_grad():
        adapted = lora(ids).logits
    merged, report = hpeft.merge_and_unload(lora)
    assert not hpeft.compressed_lora_layers(merged) and len(compressed_modules(merged)) == 14
    after = hpeft.sparsity_masks(merged)
    assert after.keys() == masks.keys() and all(torch.equal(after[k], masks[k]) for k in masks)
    assert report.masks_preserved and len(report.layers) == 14
    with torch.no_grad():
        out = merged(ids).logits
    # quantization-aware adapters merge exactly (same rounding on the same grid); float values: exact add
    torch.testing.assert_close(out, adapted, rtol=0, atol=1e-5)
    assert report.max_rel_error < 1e-6
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, out)
    again = hpeft.sparsity_masks(reloaded)
    assert all(torch.equal(again[k], masks[k]) for k in masks)


def test_merge_into_quantized_base_requantizes_on_base_grid(ids):
    model = compressed_tiny("sparse50-w4")
    grids = {n: hpeft.base_grid(m) for n, m in compressed_modules(model).items()}
    lora = hpeft.get_peft_model(model, lora_config()).eval()  # not quantization-aware: merge rounds
    randomize_lora(lora, std=0.005)
    with torch.no_grad():
        adapted = lora(ids).logits
        targets = {n.removeprefix("base_model.model."): l.effective_weight(["default"]) for n, l in hpeft.compressed_lora_layers(lora).items()}
    merged, report = hpeft.merge_and_unload(lora)
    assert report.masks_preserved
    assert 0 < report.max_rel_error < 0.2
    for name, m in compressed_modules(merged).items():
        scale, zero = hpeft.base_grid(m)
        assert torch.equal(scale, grids[name][0]) and torch.equal(zero, grids[name][1])
        # every kept weight is within half a step of its exact target unless clamped at the grid's edge
        err = (m.dequantize_weight(torch.float32) - targets[name]).abs()
        half = expand_groups(scale.float(), err.shape[1], m.spec.group_size) / 2
        layer = next(r for r in report.layers if r.name == name)
        assert (err > half * (1 + 1e-5)).float().mean() <= layer.clipped + 1e-9
    with torch.no_grad():
        out = merged(ids).logits
    assert (out - adapted).abs().max() < 0.05 * adapted.abs().max()


def test_unmasked_policy_reports_the_dropped_update(ids):
    model = compressed_tiny("sparse50")
    masks = hpeft.sparsity_masks(model)
    lora = hpeft.get_peft_model(model, lora_config(), mask_update=False).eval()
    randomize_lora(lora)
    with pytest.warns(UserWarning, match="unmasked"):
        merged, report = hpeft.merge_and_unload(lora)
    assert report.masks_preserved and all(torch.equal(hpeft.sparsity_masks(merged)[k], masks[k]) for k in masks)
    assert report.max_rel_error > 1e-3  # the update of the pruned weights could not be stored
    assert "masks preserved: True" in str(report)


def test_unmerge_restores_exact_tensors(ids):
    model = compressed_tiny("sparse50-w4")
    before = packed_state(model)
    lora = hpeft.get_peft_model(model, lora_config()).eval()
    randomize_lora(lora)
    with torch.no_grad():
        adapted = lora(ids).logits
    lora.merge_adapter()
    assert all(l.merged for l in hpeft.compressed_lora_layers(lora).values())
    lora.unmerge_adapter()
    after = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in packed_state(lora).items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(lora(ids).logits, adapted)
        with lora.disable_adapter():
            base = lora(ids).logits
    assert not torch.equal(base, adapted)


@pytest.mark.parametrize("kind", ["w4", "sparse50"])
def test_adapter_save_load_reproduces_outputs(kind, ids, tmp_path):
    compressed_tiny(kind).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lora = hpeft.get_peft_model(base, lora_config(), quant_aware=kind == "w4").eval()
    randomize_lora(lora)
    with torch.no_grad():
        expected = lora(ids).logits
    hpeft.save_adapter(lora, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", hpeft.POLICY_FILE} <= files
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = hpeft.load_adapter(fresh, tmp_path / "adapter")
    assert hpeft.lora_policy(loaded)["quant_aware"] == (kind == "w4")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    # the plain PEFT API works too once the config is registered
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    cfg = hpeft.register_compressed_lora(LoraConfig.from_pretrained(tmp_path / "adapter"), quant_aware=kind == "w4")
    plain = PeftModel.from_pretrained(fresh, tmp_path / "adapter", config=cfg).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, expected)
    # and transformers' own adapter loading
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    cfg = hpeft.register_compressed_lora(LoraConfig.from_pretrained(tmp_path / "adapter"), quant_aware=kind == "w4")
    fresh.load_adapter(tmp_path / "adapter", peft_config=cfg)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, expected)


def test_gradient_checkpointing_gives_the_same_gradients(ids):
    grads = []
    for checkpointing in (False, True):
        lora = hpeft.get_peft_model(compressed_tiny("sparse50-w4"), lora_config())
        randomize_lora(lora)
        if checkpointing:
            lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            lora.enable_input_require_grads()
        lora.train()
        lora(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_training_loss_decreases():
    model = compressed_tiny("sparse50")
    masks = hpeft.sparsity_masks(model)
    lora = hpeft.get_peft_model(model, lora_config(r=8, lora_alpha=16)).train()
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 16), generator=g)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(16):
        loss = lora(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and min(losses[-3:]) < min(losses[:3])
    merged, report = hpeft.merge_and_unload(lora)
    assert report.masks_preserved and all(torch.equal(hpeft.sparsity_masks(merged)[k], masks[k]) for k in masks)


def test_mixed_batch_adapter_names(ids):
    lora = hpeft.get_peft_model(compressed_tiny("sparse50"), lora_config()).eval()
    randomize_lora(lora)
    with torch.no_grad():
        adapted = lora(ids).logits
        with lora.disable_adapter():
            base = lora(ids).logits
        mixed = lora(ids, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], adapted[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-5)


def test_plain_linear_targets_still_use_peft_layers():
    model = tiny_llama()
    compress(model, HfCompressConfig(bits=4, group_size=32, ignore=["lm_head", "re:mlp"]))
    lora = hpeft.get_peft_model(model, lora_config())
    assert len(hpeft.compressed_lora_layers(lora)) == 8  # attention projections are compressed
    mlp = lora.base_model.model.model.layers[0].mlp.up_proj
    assert type(mlp).__name__ == "Linear" and isinstance(mlp.get_base_layer(), torch.nn.Linear)


@pytest.mark.parametrize(
    "kwargs, policy, match",
    [
        (dict(lora_bias=True), {}, "lora_bias"),
        (dict(use_dora=True), {}, "variants"),
        (dict(init_lora_weights="pissa"), {}, "init_lora_weights"),
        (dict(lora_dropout=0.1), dict(quant_aware=True), "lora_dropout"),
    ],
)
def test_unsupported_settings_raise_clear_errors(kwargs, policy, match):
    model = compressed_tiny("w4")
    before = packed_state(model)
    with pytest.raises(ValueError, match=match):
        hpeft.get_peft_model(model, lora_config(**kwargs), **policy)
    assert all(torch.equal(v, before[k]) for k, v in packed_state(model).items())


def test_bad_policy_values_raise():
    with pytest.raises(ValueError, match="merge_grid"):
        hpeft.register_compressed_lora(lora_config(), merge_grid="nearest")
    with pytest.raises(ValueError, match="mask_update"):
        hpeft.register_compressed_lora(lora_config(), mask_update="yes")
    with pytest.raises(TypeError, match="LoraConfig"):
        hpeft.register_compressed_lora({"r": 4})


def test_refit_grid_merge_keeps_mask(ids):
    model = compressed_tiny("2:4-w4")
    masks = hpeft.sparsity_masks(model)
    lora = hpeft.get_peft_model(model, lora_config(), merge_grid="refit").eval()
    randomize_lora(lora, std=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged, report = hpeft.merge_and_unload(lora)
    assert report.masks_preserved and {r.grid for r in report.layers} == {"refit"}
    assert all(torch.equal(hpeft.sparsity_masks(merged)[k], masks[k]) for k in masks)


def test_wrapping_decodes_each_compressed_weight_once(monkeypatch):
    from hfcompress.modules import CompressedModule

    model = compressed_tiny("sparse50")
    calls = []
    original = CompressedModule.dequantize_weight

    def counting(self, dtype=torch.float32):
        calls.append(id(self))
        return original(self, dtype)

    monkeypatch.setattr(CompressedModule, "dequantize_weight", counting)
    lora = hpeft.get_peft_model(model, lora_config())
    assert len(calls) <= 14 and len(set(calls)) == len(calls)
    assert all("dequantize_weight" not in l.get_base_layer().__dict__ for l in hpeft.compressed_lora_layers(lora).values())
