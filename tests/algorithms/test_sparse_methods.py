"""Pruning methods: exact sparsity in real checkpoints, bit-identical reload, and reconstruction quality."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import HfCompressConfig, compressed_modules, compression_report, oneshot
from hfcompress.algorithms.admm import admm_compress_layer
from hfcompress.algorithms.magnitude import magnitude_compress
from hfcompress.algorithms.sparsegpt import sparsegpt_compress_layer
from hfcompress.algorithms.wanda import wanda_compress_layer
from hfcompress.calibration.stats import LayerStats
from hfcompress.testing.models import tiny_llama
from hfcompress.algorithms.reconstruction import admm_update
from hfcompress.spec import LayerSpec

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def bf16_llama_dir(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def _check_layers(model, spec_sparsity: float, nm: tuple[int, int] | None):
    mods = compressed_modules(model)
    assert mods
    for name, module in mods.items():
        w = module.dequantize_weight(torch.float32)
        keep = w.reshape(module.shape2d) != 0
        if nm is None:
            numel = keep.numel()
            assert int((~keep).sum()) >= round(spec_sparsity * numel), name  # quantization may zero a few more
        else:
            n, m = nm
            assert bool((keep.reshape(keep.shape[0], -1, m).sum(-1) <= n).all()), name


@pytest.mark.parametrize(
    "cfg, fmt, nm",
    [
        (HfCompressConfig(method="magnitude", sparsity=0.5), "bitmask", None),
        (HfCompressConfig(method="magnitude", sparsity_structure="2:4"), "nm", (2, 4)),
        (HfCompressConfig(method="magnitude", sparsity=0.5, bits=4, group_size=32), "bitmask", None),
        (HfCompressConfig(method="magnitude", sparsity_structure="4:8", bits=4, group_size=40, symmetric=False), "nm", (4, 8)),
    ],
    ids=["u50", "2:4", "u50_w4", "4:8_w4asym"],
)
def test_magnitude_on_load_save_reload_bit_identical(bf16_llama_dir, tmp_path, cfg, fmt, nm):
    model = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, quantization_config=cfg)
    assert {m.format_name for m in compressed_modules(model).values()} == {fmt}
    dense = AutoModelForCausalLM.from_pretrained(bf16_llama_dir)
    if not cfg.bits:
        for name, module in compressed_modules(model).items():  # exact count of pruned weights, values untouched
            w = dense.get_submodule(name).weight.float()
            got = module.dequantize_weight(torch.float32)
            keep = got != 0
            assert torch.equal(got[keep], w[keep])
            if nm is None:
                assert int((~keep).sum()) == round(0.5 * w.numel())
            assert module.compressed_tensors()["weight_values"].dtype == torch.bfloat16
    _check_layers(model, 0.5, nm)
    with torch.no_grad():
        before = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "magnitude"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        after = reloaded(IDS).logits
    assert torch.equal(before, after)
    for name, module in compressed_modules(reloaded).items():
        ref = compressed_modules(model)[name].compressed_tensors()
        for key, tensor in module.compressed_tensors().items():
            assert torch.equal(tensor, ref[key]) and tensor.dtype == ref[key].dtype, (name, key)


def test_report_counts_sparse_bytes(bf16_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, quantization_config=HfCompressConfig(method="magnitude", sparsity=0.5))
    report = compression_report(model)
    for layer in report["layers"]:
        assert layer["format"] == "bitmask"
        assert 9.0 <= layer["bits_per_weight"] <= 9.1
        assert set(layer["tensors"]) == {"weight_values", "weight_bitmask", "weight_shape"}


def _problem(rows=48, cols=96, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 2 * mix)  # correlated features
    x[:, 5] *= 20  # an outlier feature, as LLM activations have
    w = torch.randn(rows, cols, generator=g)
    stats = LayerStats(hessian=2 / tokens * x.T @ x, act_sq=x.pow(2).sum(0), nsamples=tokens)
    return w, x, stats


def _err(w, w_hat, x):
    return float(((w - w_hat) @ x.T).pow(2).sum())


@pytest.mark.parametrize(
    "spec",
    [LayerSpec(sparsity=0.5), pytest.param(LayerSpec(sparsity=0.7), marks=pytest.mark.slow),
     LayerSpec(sparsity_structure="2:4"), pytest.param(LayerSpec(sparsity_structure="4:8"), marks=pytest.mark.slow),
     LayerSpec(sparsity=0.5, bits=4, group_size=32),
     pytest.param(LayerSpec(sparsity_structure="2:4", bits=4, group_size=32, symmetric=False), marks=pytest.mark.slow)],
    ids=["u50", "u70", "2:4", "4:8", "u50_w4", "2:4_w4asym"],
)  # fmt: skip
def test_calibrated_methods_beat_magnitude_on_calibration_inputs(spec):
    w, x, stats = _problem()
    results = {
        "magnitude": magnitude_compress(w.clone(), spec),
        "wanda": wanda_compress_layer(w.clone(), stats, spec, {}),
        "sparsegpt": sparsegpt_compress_layer(w.clone(), stats, spec, {}),
        "sparsegpt+admm": sparsegpt_compress_layer(w.clone(), stats, spec, {"refine_iters": 20}),
        "admm": admm_compress_layer(w.clone(), stats, spec, {}),
    }
    err = {k: _err(w, cw.weight, x) for k, cw in results.items()}
    for name, cw in results.items():  # every method hits the exact sparsity/pattern
        keep = cw.mask
        if spec.nm:
            assert bool((keep.reshape(keep.shape[0], -1, spec.nm[1]).sum(-1) == spec.nm[0]).all()), name
        else:
            assert int((~keep).sum()) == round(spec.sparsity * keep.numel()), name
        assert bool((cw.weight[~keep] == 0).all()), name
    assert err["sparsegpt"] <= err["magnitude"], err
    assert err["wanda"] <= err["magnitude"], err
    assert err["sparsegpt+admm"] <= err["sparsegpt"] * 1.001, err
    assert err["admm"] <= err["wanda"], err


def test_admm_update_is_optimal_on_a_fixed_mask():
    w, x, stats = _problem(rows=6, cols=24, tokens=200)
    keep = torch.rand(6, 24, generator=torch.Generator().manual_seed(3)) > 0.5
    got = admm_update(w, stats.hessian, keep, iters=200, damp=0.0)
    exact = torch.zeros_like(w)
    for r in range(6):  # least squares on each row's support
        s = keep[r]
        sol = torch.linalg.lstsq(x[:, s].double(), (x @ w[r]).double().unsqueeze(1)).solution
        exact[r, s] = sol[:, 0].float()
    assert _err(w, got, x) <= _err(w, exact, x) * 1.01 + 1e-6
    assert bool((got[~keep] == 0).all())


def test_unknown_method_args_are_clear_errors():
    w, x, stats = _problem(rows=4, cols=16, tokens=40)
    with pytest.raises(ValueError, match="unknown method_args \\['blocksiz'\\]"):
        sparsegpt_compress_layer(w, stats, LayerSpec(sparsity=0.5), {"blocksiz": 64})
    with pytest.raises(ValueError, match="must be an int"):
        sparsegpt_compress_layer(w, stats, LayerSpec(sparsity=0.5), {"blocksize": "64"})


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    [
        HfCompressConfig(method="wanda", sparsity=0.5),
        HfCompressConfig(method="sparsegpt", sparsity_structure="2:4"),
        HfCompressConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=32),
        HfCompressConfig(method="admm", sparsity=0.5, method_args={"iters": 9}),
    ],
    ids=["wanda", "sparsegpt_2:4", "sparsegpt_u50_w4", "admm"],
)
def test_oneshot_save_reload_bit_identical(bf16_llama_dir, tmp_path, cfg):
    model = AutoModelForCausalLM.from_pretrained(bf16_llama_dir)  # (from_pretrained keeps rotary buffers in fp32)
    oneshot(model, cfg, CALIB, batch_size=3, show_progress=False)
    mods = compressed_modules(model)
    assert len(mods) == 14
    _check_layers(model, 0.5, cfg.default_spec().nm)
    with torch.no_grad():
        before = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(before, reloaded(IDS).logits)


def test_calibrated_methods_refuse_to_run_on_load(bf16_llama_dir):
    with pytest.raises(ValueError, match="oneshot"):
        AutoModelForCausalLM.from_pretrained(bf16_llama_dir, quantization_config=HfCompressConfig(method="sparsegpt", sparsity=0.5))


def test_method_registry_flags():
    for name in ("magnitude", "wanda", "sparsegpt", "admm"):
        method = hfcompress.get_method(name)
        assert method.prunes and method.quantizes
    assert hfcompress.get_method("magnitude").data_free
    assert hfcompress.get_method("wanda").needs == {"act_sq"}
    assert hfcompress.get_method("sparsegpt").needs == {"hessian"}


@pytest.mark.slow
def test_values_follow_model_dtype_cast_but_grids_do_not(bf16_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, dtype=torch.float32)
    oneshot(model, HfCompressConfig(method="sparsegpt", sparsity=0.5), CALIB, batch_size=3, show_progress=False)
    values = {n: m.compressed_tensors()["weight_values"] for n, m in compressed_modules(model).items()}
    assert {v.dtype for v in values.values()} == {torch.float32}  # calibrated in fp32, stored as computed
    model.to(torch.bfloat16)  # cast before saving, as for a dense bf16 checkpoint
    for name, module in compressed_modules(model).items():
        got = module.compressed_tensors()["weight_values"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, values[name].to(torch.bfloat16))
        assert module.compressed_tensors()["weight_bitmask"].dtype == torch.uint8
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # (.to() also cast rotary buffers: compare tensors)
    for name, module in compressed_modules(reloaded).items():
        got = module.compressed_tensors()["weight_values"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, values[name].to(torch.bfloat16))
    quant = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, quantization_config=HfCompressConfig(method="magnitude", sparsity=0.5, bits=4))
    scales = {n: m.compressed_tensors()["weight_scale"].clone() for n, m in compressed_modules(quant).items()}
    quant.to(torch.float32)
    for name, module in compressed_modules(quant).items():
        assert module.compressed_tensors()["weight_scale"].dtype == torch.float16
        assert torch.equal(module.compressed_tensors()["weight_scale"], scales[name])


@pytest.mark.slow
@pytest.mark.parametrize("cfg, limit", [
    (HfCompressConfig(method="magnitude", sparsity=0.5), 9.1),
    (HfCompressConfig(method="magnitude", sparsity_structure="2:4"), 9.1),
    (HfCompressConfig(method="magnitude", sparsity=0.5, bits=4, group_size=64), 3.3),
], ids=["u50", "2:4", "u50_w4g64"])  # fmt: skip
def test_real_smollm2_bits_per_weight_and_reload(smollm2_path, tmp_path, cfg, limit):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=cfg)
    report = compression_report(model)
    assert len(report["layers"]) == 30 * 7
    assert max(layer["bits_per_weight"] for layer in report["layers"]) <= limit
    ids = torch.arange(5, 69).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    size = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    dense_linear = sum(8 * layer["nbytes"] / layer["bits_per_weight"] for layer in report["layers"]) * 2
    assert size < report["other_bytes"] + dense_linear * limit / 16 + 1e6
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(before, reloaded(ids).logits)


@pytest.mark.parametrize("cfg", [
    HfCompressConfig(method="magnitude", sparsity=0.5, lossless=True),
    HfCompressConfig(method="magnitude", sparsity_structure="2:4", bits=4, group_size=32, lossless=True),
], ids=["bitmask_bf16", "nm_w4"])  # fmt: skip
def test_sparse_formats_compose_with_lossless_stage(bf16_llama_dir, tmp_path, cfg):
    model = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, quantization_config=cfg)
    with torch.no_grad():
        before = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(before, reloaded(IDS).logits)
    for name, module in compressed_modules(reloaded).items():
        ref = compressed_modules(model)[name].compressed_tensors()
        for key, tensor in module.compressed_tensors().items():
            assert torch.equal(tensor, ref[key]), (name, key)


def test_deprecated_argument_spellings_still_work_and_warn():
    """SparseGPT/ADMM took ``dampening``/``blocksize``; GPTQ/QuantEase ``damp``/``block_size``: one spelling now."""
    w, x, stats = _problem(rows=8, cols=32, tokens=64)
    spec = LayerSpec(sparsity=0.5)
    new = sparsegpt_compress_layer(w.clone(), stats, spec, {"damp": 0.05, "block_size": 16})
    with pytest.warns(FutureWarning, match="'dampening' of method='sparsegpt' is deprecated; use 'damp'"):
        old = sparsegpt_compress_layer(w.clone(), stats, spec, {"dampening": 0.05, "blocksize": 16})
    assert torch.equal(new.weight, old.weight) and torch.equal(new.mask, old.mask)
    with pytest.raises(ValueError, match="give both 'dampening' and 'damp'"):
        sparsegpt_compress_layer(w.clone(), stats, spec, {"dampening": 0.05, "damp": 0.05})
    with pytest.raises(ValueError, match="damp=1.5 .* must be a number in \\[0, 1\\)"):
        sparsegpt_compress_layer(w.clone(), stats, spec, {"damp": 1.5})
