"""``quantease``: GPTQ refined by coordinate descent on the codes and on the scales.

GPTQ visits each column once and never revisits a decision. Starting from its result, this method
keeps lowering the same layer objective ``f = tr((W - W') H (W - W')^T)`` (the output error on the
calibration inputs) by alternating two exact descent steps, each of which can only lower ``f``:

* **codes** (cyclic coordinate descent, as in QuantEase, Behdin et al. 2023): for one column ``j`` with
  all others fixed, ``f`` is a 1-D quadratic whose minimiser over the column's grid is the grid point
  nearest to ``W'_j + (dW H)_j / H_jj``; every row moves at once. Columns are swept in blocks so most
  of the work is matrix products (the in-block updates are rank-1, the rest one GEMM per block);
* **scales** (block Gauss-Seidel): with the codes fixed, ``f`` is quadratic in each group's scale, so
  every (row, group) scale jumps to its exact minimiser ``s + c.P_g / c^T H_gg c`` (``c`` the group's
  integer offsets, ``P = dW H``), then is rounded to ``scale_dtype``; zero points stay fixed.

Codes and scales are chosen on the stored grid, so what is measured is what is saved. The result is
kept only if it beats GPTQ's (and RTN's) objective. ``method_args``: GPTQ's ``damp``, ``block_size``,
``act_order`` plus ``sweeps`` (5: code sweeps, each followed by a scale sweep) and ``cd_damp``
(0.0: extra diagonal, relative to ``mean(diag H)``, in the objective the descent minimises).
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.base import CompressedWeight
from ..grid import QuantizedWeight, group_width, scale_torch_dtype
from ..spec import LayerSpec
from .base import Method, register_method
from .options import method_options
from .gptq import GPTQ_DEFAULTS, best_of_rtn, few_threads, gptq_quantize, quant_objective
from .hessian import prepare_hessian

__all__ = ["refine_quantization", "quantease_compress_layer"]

QUANTEASE_DEFAULTS: dict[str, Any] = {**GPTQ_DEFAULTS, "sweeps": 5, "cd_damp": 0.0}


def _group_bounds(cols: int, group_size: int | None) -> list[tuple[int, int]]:
    g = group_width(cols, group_size)
    return [(a, min(a + g, cols)) for a in range(0, cols, g)]


@torch.no_grad()
def refine_quantization(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    q: QuantizedWeight,
    scale_dtype: torch.dtype,
    sweeps: int = 5,
    block_size: int = 128,
    refine_scales: bool = True,
    dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Lower ``tr((W - Q) H (W - Q)^T)`` from the starting point ``q`` (see module docstring).

    The residual products ``P = dW H`` are recomputed from scratch at every sweep, so working in float32
    (``dtype``, the default, twice as fast as float64) never lets rounding errors build up; the
    per-column loop runs on one thread, the matrix products on all.
    """
    rows, cols = weight.shape
    bits, gs = q.bits, q.group_size
    maxq = (1 << bits) - 1
    bounds = _group_bounds(cols, gs)
    w = weight.to(dtype)
    h = hessian.to(dtype)
    codes = q.codes.to(dtype)
    scale = q.scale.clone()
    zero = q.zero.to(dtype) if q.zero is not None else None
    mid = float(1 << (bits - 1))

    def expand(t_rows_groups: torch.Tensor) -> torch.Tensor:  # [rows, ngroups] -> [cols, rows]
        return torch.cat([t_rows_groups[:, k : k + 1].expand(rows, b - a) for k, (a, b) in enumerate(bounds)], 1).t().contiguous()

    diag = torch.diagonal(h).clone()
    alive = (diag > 0).tolist()
    inv_diag = torch.where(diag > 0, 1.0 / diag.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(diag))
    # work on transposes: column j is the contiguous row [j]
    ct = codes.t().contiguous()
    for sweep in range(sweeps):
        s_t = expand(scale.to(dtype))
        z_t = expand(zero) if zero is not None else torch.full_like(s_t, mid)
        what_t = (ct - z_t) * s_t
        p_t = (h @ (w.t() - what_t))  # P^T = H dW^T : [cols, rows]
        # ---- codes: cyclic coordinate descent, blocked
        for b1 in range(0, cols, block_size):
            b2 = min(b1 + block_size, cols)
            d_block = torch.zeros(b2 - b1, rows, dtype=dtype)
            with few_threads(1):
                for j in range(b1, b2):
                    if not alive[j]:
                        continue
                    target = what_t[j] + p_t[j] * inv_diag[j]
                    new_code = torch.clamp(torch.round(target / s_t[j]) + z_t[j], 0, maxq)
                    if torch.equal(new_code, ct[j]):
                        continue
                    new_val = (new_code - z_t[j]) * s_t[j]
                    delta = new_val - what_t[j]  # change of W'_j (dW_j changes by -delta)
                    ct[j] = new_code
                    what_t[j] = new_val
                    d_block[j - b1] = delta
                    p_t[b1:b2].addr_(h[b1:b2, j], delta, alpha=-1)
            if b1 > 0:
                p_t[:b1].addmm_(h[:b1, b1:b2], d_block, alpha=-1)
            if b2 < cols:
                p_t[b2:].addmm_(h[b2:, b1:b2], d_block, alpha=-1)
        if not refine_scales:
            continue
        # ---- scales: exact per-(row, group) minimiser, groups in turn
        for k, (a, b) in enumerate(bounds):
            c = ct[a:b] - z_t[a:b]  # [g, rows] integer offsets
            num = (c * p_t[a:b]).sum(0)
            den = ((h[a:b, a:b] @ c) * c).sum(0)
            ok = den > 0
            old = scale[:, k].double()
            step = torch.where(ok, num.double() / den.double().clamp(min=1e-300), torch.zeros_like(old))
            new = (old + step).to(scale_dtype)
            new = torch.where(new.double() > 0, new, scale[:, k])  # a scale never flips sign or vanishes
            moved = (new.double() - old).to(dtype)
            if not bool((moved != 0).any()):
                continue
            scale[:, k] = new
            delta = c * moved  # [g, rows] change of W'
            s_t[a:b] = new.to(dtype)
            what_t[a:b] += delta
            p_t.addmm_(h[:, a:b], delta, alpha=-1)
    out_codes = ct.t().round().clamp(0, maxq).to(torch.uint8).contiguous()
    return QuantizedWeight(codes=out_codes, scale=scale, zero=q.zero, bits=bits, group_size=gs)


def quantease_args(method_args: dict[str, Any], method: str = "quantease") -> dict[str, Any]:
    """QuantEase's ``method_args`` with defaults filled in; unknown keys and bad values raise ``ValueError``."""
    args = method_options(method, method_args, QUANTEASE_DEFAULTS)
    sweeps, cd_damp = args["sweeps"], args["cd_damp"]
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"method_args sweeps={sweeps!r} must be a non-negative integer, e.g. 5.")
    if isinstance(cd_damp, bool) or not isinstance(cd_damp, (int, float)) or not cd_damp >= 0 or cd_damp == float("inf"):
        raise ValueError(f"method_args cd_damp={cd_damp!r} must be a non-negative finite number, e.g. 0.0.")
    return args


def quantease_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """``compress_layer`` of method ``"quantease"`` (see :mod:`hfcompress.algorithms`)."""
    args = quantease_args(method_args)
    sweeps, cd_damp = args.pop("sweeps"), args.pop("cd_damp")
    if stats.hessian is None:
        raise ValueError("method='quantease' needs the input Hessian; the calibration pipeline did not provide it.")
    start = gptq_quantize(weight, stats.hessian, spec, **args)
    start = best_of_rtn(weight, stats.hessian, spec, start)
    if sweeps:
        w64, h64, _ = prepare_hessian(weight, stats.hessian)
        if cd_damp:
            h64 = h64 + cd_damp * torch.diagonal(h64).mean() * torch.eye(h64.shape[0], dtype=torch.float64)
        refined = refine_quantization(
            w64, h64, start, scale_torch_dtype(spec.scale_dtype), sweeps=sweeps, block_size=args["block_size"]
        )
        h = stats.hessian
        if quant_objective(weight, refined.dequantize(torch.float64), h) < quant_objective(weight, start.dequantize(torch.float64), h):
            start = refined
    return CompressedWeight(weight=start.dequantize(torch.float32), quantized=start)


register_method(
    Method(
        name="quantease",
        data_free=False,
        quantizes=True,
        prunes=False,
        description="GPTQ followed by coordinate descent on codes and scales of the layer output error (lower error, slower).",
        needs=frozenset({"hessian"}),
        compress_layer=quantease_compress_layer,
        check_args=quantease_args,
    )
)
