"""``quantease``: coordinate descent after GPTQ, scale refits, and the dense-output target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfcompress import HfCompressConfig, LayerSpec, oneshot
from hfcompress.algorithms import Method, get_method, register_method
from hfcompress.algorithms.gptq import gptq_quantize, quant_objective
from hfcompress.algorithms.hessian import prepare_hessian
from hfcompress.algorithms.quantease import refine_quantization
from hfcompress.algorithms.rtn import rtn_compress
from hfcompress.calibration.stats import LayerStats
from hfcompress.testing.models import tiny_llama


def _problem(rows, cols, seed, n=None):
    g = torch.Generator().manual_seed(seed)
    n = n or 6 * cols
    x = torch.randn(n, cols, generator=g)
    x = x @ torch.randn(cols, cols, generator=g) * 0.4 + x
    x[:, 1] *= 5
    w = torch.randn(rows, cols, generator=g)
    return w, 2 * x.t() @ x / n, x


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, 16, True), (4, 16, False), (2, None, True), (4, 13, True)])
def test_descent_never_increases_the_objective(bits, group_size, symmetric):
    w, h, _ = _problem(20, 40, seed=bits)
    spec = LayerSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    start = gptq_quantize(w, h, spec)
    w64, h64, _ = prepare_hessian(w, h)
    objectives = [quant_objective(w, start.dequantize(torch.float64), h)]
    for sweeps in (1, 2, 4):
        q = refine_quantization(w64, h64, start, torch.float16, sweeps=sweeps)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < (1 << bits)
        assert q.scale.dtype == torch.float16 and bool((q.scale > 0).all())
        assert (q.zero is None) == symmetric and (q.zero is None or torch.equal(q.zero, start.zero))
        objectives.append(quant_objective(w, q.dequantize(torch.float64), h))
    assert all(b <= a * (1 + 1e-4) for a, b in zip(objectives, objectives[1:]))  # fp16 scale rounding only
    assert objectives[-1] < 0.97 * objectives[0]  # and it does find better solutions than GPTQ


def test_codes_only_descent_is_exactly_monotone():
    w, h, _ = _problem(16, 32, seed=7)
    spec = LayerSpec(bits=3, group_size=8)
    start = gptq_quantize(w, h, spec)
    w64, h64, _ = prepare_hessian(w, h)
    prev = quant_objective(w, start.dequantize(torch.float64), h)
    for sweeps in (1, 2, 3):
        q = refine_quantization(w64, h64, start, torch.float16, sweeps=sweeps, refine_scales=False)
        assert torch.equal(q.scale, start.scale)
        obj = quant_objective(w, q.dequantize(torch.float64), h)
        assert obj <= prev * (1 + 1e-6)  # float32 residuals
        prev = obj


def test_compress_layer_beats_gptq_and_rtn():
    qe, gptq = get_method("quantease").compress_layer, get_method("gptq").compress_layer
    for seed in range(3):
        w, h, x = _problem(32, 48, seed=seed)
        stats = LayerStats(hessian=h, nsamples=x.shape[0])
        spec = LayerSpec(bits=3, group_size=16)
        a = qe(w, stats, spec, {})
        b = gptq(w, stats, spec, {})
        c = rtn_compress(w, spec)
        assert torch.equal(a.weight, a.quantized.dequantize(torch.float32))
        oa, ob, oc = (quant_objective(w, t.weight, h) for t in (a, b, c))
        assert oa < ob <= oc


# ---------------------------------------------------------------------- dense_cross statistics in the pipeline
CROSS_SEEN: list[LayerStats] = []


def _cross_spy(weight, stats, spec, args):
    CROSS_SEEN.append(stats)
    return rtn_compress(weight, spec)


try:
    get_method("test_cross_spy")
except ValueError:
    register_method(Method("test_cross_spy", False, True, False, "test", needs=frozenset({"dense_cross"}), compress_layer=_cross_spy))


def _inputs(model, module_name, ids):
    seen = []
    hook = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return torch.cat(seen).double()


def test_pipeline_pairs_dense_and_compressed_inputs():
    CROSS_SEEN.clear()
    ids = torch.randint(1, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    spec = LayerSpec(bits=3, group_size=32)
    oneshot(tiny_llama(), HfCompressConfig(method="test_cross_spy", bits=3, group_size=32), ids, batch_size=2, show_progress=False)
    assert len(CROSS_SEEN) == 14
    rtn_model = tiny_llama()  # block 0 compressed, block 1 still dense: what block 1's calibration pass runs
    for module in rtn_model.model.layers[0].modules():
        if isinstance(module, nn.Linear):
            module.weight.data = rtn_compress(module.weight.data, spec).weight
    name = "model.layers.1.mlp.down_proj"
    x, xd = _inputs(rtn_model, name, ids), _inputs(tiny_llama(), name, ids)
    stats = CROSS_SEEN[13]
    torch.testing.assert_close(stats.hessian, (2 * x.t() @ x / x.shape[0]).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.dense_cross, (2 * xd.t() @ x / x.shape[0]).float(), rtol=1e-4, atol=1e-5)
    first = CROSS_SEEN[0]  # block 0 sees identical inputs in both models
    torch.testing.assert_close(first.dense_cross, first.hessian)
