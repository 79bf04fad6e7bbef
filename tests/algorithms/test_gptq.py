"""GPTQ against independent references on small matrices: the naive OBS recursion, brute force, RTN."""

from __future__ import annotations

import math

import pytest
import torch

from hfcompress.algorithms import get_method
from hfcompress.algorithms.gptq import gptq_quantize, hessian_inverse_cholesky, quant_objective
from hfcompress.calibration.stats import LayerStats
from hfcompress.grid import compute_qparams, dequantize, quantize, quantize_rtn, scale_torch_dtype
from hfcompress.spec import LayerSpec


def _problem(rows: int, cols: int, seed: int, n: int | None = None, correlated: bool = True):
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * cols
    x = torch.randn(n, cols, generator=g)
    if correlated:  # real activations are strongly correlated and have outlier features
        x = x @ torch.randn(cols, cols, generator=g) * 0.5 + x
        x[:, 0] *= 6
    w = torch.randn(rows, cols, generator=g)
    h = 2 * x.t() @ x / n
    return w, h, x


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, spec: LayerSpec, damp: float, act_order: bool):
    """The textbook recursion: quantize one column, spread its error with the current inverse Hessian,
    then remove that column from the inverse (no Cholesky, no lazy blocks, no transposes)."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    g = cols if spec.group_size is None or spec.group_size >= cols else spec.group_size
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(cols))
    h = h + damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    sdtype = scale_torch_dtype(spec.scale_dtype)
    params: dict[int, tuple] = {}
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    remaining = list(range(cols))
    for j in order:
        grp = j // g
        if grp not in params:
            members = list(range(grp * g, min((grp + 1) * g, cols)))
            s, z = compute_qparams(w[:, members].float(), spec.bits, None, spec.symmetric, sdtype, clip=spec.clip)
            params[grp] = (s, z)
        s, z = params[grp]
        c = quantize(w[:, j : j + 1].float(), s, z, spec.bits, None)
        codes[:, j] = c[:, 0]
        q = dequantize(c, s, z, spec.bits, None, torch.float64)[:, 0]
        err = (w[:, j] - q) / hinv[j, j]
        remaining.remove(j)
        w[:, remaining] -= err.unsqueeze(1) * hinv[j, remaining].unsqueeze(0)
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize(
    "bits,group_size,symmetric,act_order",
    [(4, 8, True, True), (3, 8, False, True), (4, None, True, False), (2, 5, True, True), (8, 6, False, False)],
)
def test_matches_textbook_recursion(bits, group_size, symmetric, act_order):
    w, h, _ = _problem(12, 22, seed=bits)  # 22 columns: ragged last group for sizes 8, 5, 6
    spec = LayerSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    q = gptq_quantize(w, h, spec, damp=0.01, block_size=7, act_order=act_order)  # blocks not aligned to groups
    ref = _reference_gptq(w, h, spec, damp=0.01, act_order=act_order)
    assert (q.codes == ref).float().mean() >= 0.995
    assert math.isclose(
        quant_objective(w, q.dequantize(torch.float64), h),
        quant_objective(w, dequantize(ref, q.scale, q.zero, bits, group_size, torch.float64), h),
        rel_tol=1e-3,
    )


def test_block_size_does_not_change_result():
    w, h, _ = _problem(16, 40, seed=3)
    spec = LayerSpec(bits=3, group_size=16)
    a = gptq_quantize(w, h, spec, block_size=128)
    b = gptq_quantize(w, h, spec, block_size=3)
    assert (a.codes == b.codes).float().mean() > 0.995
    assert torch.equal(a.scale, b.scale) or (a.scale - b.scale).abs().max() < 1e-3


def _brute_force_optimum(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int) -> float:
    """Exhaustive minimum of tr(dW H dW^T) over all codes on the fixed symmetric per-row grid."""
    rows, cols = w.shape
    levels = torch.arange(1 << bits, dtype=torch.float64) - (1 << (bits - 1))
    best = 0.0
    hd = h.double()
    for r in range(rows):
        grid = levels * scale[r, 0].double()
        cand = torch.cartesian_prod(*([grid] * cols))
        delta = cand - w[r].double()
        best += float(((delta @ hd) * delta).sum(1).min())
    return best


def test_between_brute_force_optimum_and_rtn():
    """On tiny problems the exhaustive optimum bounds GPTQ from below and RTN from above, and GPTQ closes
    most of the gap between them."""
    compress_layer = get_method("gptq").compress_layer
    gaps = []
    for seed in range(8):
        w, h, _ = _problem(3, 5, seed=seed, n=64)
        spec = LayerSpec(bits=3, group_size=None, scale_dtype="float32")
        rtn = quantize_rtn(w, 3, None, True, torch.float32)
        cw = compress_layer(w, LayerStats(hessian=h, nsamples=64), spec, {"damp": 1e-6, "act_order": False})
        assert torch.equal(cw.quantized.scale, rtn.scale)  # per-channel static grid: only the codes differ
        obj = quant_objective(w, cw.weight, h)
        obj_rtn = quant_objective(w, rtn.dequantize(torch.float64), h)
        optimum = _brute_force_optimum(w, h, rtn.scale, 3)
        assert optimum * (1 - 1e-6) <= obj <= obj_rtn * (1 + 1e-6)  # objectives: float32 products
        gaps.append((obj - optimum) / max(obj_rtn - optimum, 1e-12))
    assert sum(gaps) / len(gaps) < 0.4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_never_worse_than_rtn_on_calibration_inputs(bits, symmetric):
    compress_layer = get_method("gptq").compress_layer
    for seed in range(2):
        w, h, x = _problem(24, 37, seed=seed + 10 * bits)
        spec = LayerSpec(bits=bits, group_size=16, symmetric=symmetric)
        cw = compress_layer(w.clone(), LayerStats(hessian=h, nsamples=x.shape[0]), spec, {})
        rtn = quantize_rtn(w, bits, 16, symmetric, torch.float16).dequantize()
        out_err = (x @ (cw.weight - w).t()).pow(2).sum()
        rtn_err = (x @ (rtn - w).t()).pow(2).sum()
        assert out_err <= rtn_err * (1 + 1e-6)
        assert torch.equal(cw.weight, cw.quantized.dequantize(torch.float32))  # what is stored is what is measured


def test_mse_clipping_and_asymmetric_codes_fit_the_grid():
    w, h, _ = _problem(10, 33, seed=5)
    for spec in (LayerSpec(bits=3, group_size=8, clip="mse"), LayerSpec(bits=4, group_size=8, symmetric=False, clip="mse")):
        q = gptq_quantize(w, h, spec)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < (1 << spec.bits)
        assert q.scale.shape == (10, 5) and q.scale.dtype == torch.float16
        assert (q.zero is None) == spec.symmetric
        assert torch.isfinite(q.dequantize()).all()


def test_singular_and_dead_inputs_give_finite_results():
    w = torch.randn(8, 16)
    x = torch.randn(4, 16)  # rank 4 < 16 columns
    x[:, 3] = 0  # a dead input feature
    h = 2 * x.t() @ x / 4
    q = gptq_quantize(w, h, LayerSpec(bits=4, group_size=8), damp=0.0)
    out = q.dequantize()
    assert torch.isfinite(out).all()
    assert torch.all(out[:, 3] == 0)  # a dead input's weights cannot matter: GPTQ zeroes them


def test_cholesky_failure_raises_dampening(caplog):
    _, h, _ = _problem(4, 12, seed=1)
    h = h.double()
    smallest = torch.linalg.eigvalsh(h)[0]
    h -= (smallest + 0.005 * torch.diagonal(h).mean()) * torch.eye(12, dtype=torch.float64)  # indefinite
    with caplog.at_level("WARNING", logger="hfcompress.calibration"):
        u = hessian_inverse_cholesky(h, 0.0001)
    assert torch.isfinite(u).all()
    assert "dampening" in caplog.text
    with pytest.raises(FloatingPointError, match="could not be factorised"):
        hessian_inverse_cholesky(-1e6 * torch.eye(6, dtype=torch.float64), 0.01)


def test_non_finite_hessian_is_reported():
    w = torch.randn(4, 8)
    h = torch.eye(8)
    h[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        gptq_quantize(w, h, LayerSpec(bits=4, group_size=8))


def test_method_args_are_validated():
    compress_layer = get_method("gptq").compress_layer
    w, h, _ = _problem(4, 8, seed=0)
    stats = LayerStats(hessian=h, nsamples=32)
    with pytest.raises(ValueError, match="damping"):
        compress_layer(w, stats, LayerSpec(bits=4), {"damping": 0.1})
    with pytest.raises(ValueError, match="damp=2"):
        compress_layer(w, stats, LayerSpec(bits=4), {"damp": 2})
    with pytest.raises(ValueError, match="act_order"):
        compress_layer(w, stats, LayerSpec(bits=4), {"act_order": "yes"})
    with pytest.raises(ValueError, match="Hessian"):
        compress_layer(w, LayerStats(), LayerSpec(bits=4), {})
