"""``gptq``: second-order weight quantization with error compensation (Frantar et al., 2022).

For a layer ``y = W x`` with input Hessian ``H = 2/n * sum x x^T``, GPTQ quantizes the columns of ``W``
one after another and, after each, spreads the column's rounding error over the not-yet-quantized
columns through the inverse Hessian, minimising ``tr((W - Q) H (W - Q)^T)``, the layer's output error
on the calibration inputs. This implementation has

* dampening ``damp * mean(diag H)`` added to the diagonal, raised tenfold (up to 5 times) when the
  Cholesky factorisation fails, so it never produces NaNs; dead inputs (``H_jj = 0``) are zeroed;
* the Cholesky form of the inverse Hessian and lazy block updates (``block_size`` columns at a time);
* act-order (``act_order=True``, default): columns in decreasing ``H_jj``, with *static* groups: every
  group is a fixed run of ``group_size`` original columns (the packed layout is unchanged), its scale
  is fixed when its first column is reached, from the current error-compensated values of all its columns;
* symmetric and asymmetric grids, 2..8 bits, ragged last groups, per-channel scales, optional
  MSE-optimal clipping (``clip="mse"``: each group's range shrink minimising its error weighted by the
  inputs' second moments ``H_jj``, as llama.cpp's importance matrix weights it), all through :mod:`hfcompress.grid`;
* float64 arithmetic for the Hessian inverse and the error propagation;
* a final check against round-to-nearest on the same objective: the result is never worse than RTN.

``method_args``: ``damp`` (0.01), ``block_size`` (128), ``act_order`` (True).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..formats.base import CompressedWeight
from ..grid import QuantizedWeight, compute_qparams, num_groups, quantize_rtn, scale_torch_dtype
from ..spec import LayerSpec
from .base import Method, register_method
from .options import method_options

logger = logging.getLogger("hfcompress.calibration")

__all__ = ["GPTQ_DEFAULTS", "gptq_quantize", "hessian_inverse_cholesky", "quant_objective"]

GPTQ_DEFAULTS: dict[str, Any] = {"damp": 0.01, "block_size": 128, "act_order": True}


def hessian_inverse_cholesky(h: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """Upper triangular ``U`` with ``U^T U = (H + lambda I)^-1``, raising ``lambda`` tenfold on failure.

    Computed without forming the inverse: with ``J`` the order reversal, ``J H J = L L^T`` gives
    ``H = R R^T`` for the upper triangular ``R = J L J``, so ``U = R^-1``: one Cholesky factorisation and
    one triangular solve. ``h`` is not modified.
    """
    return _inverse_cholesky(lambda: h.flip(0, 1), torch.diagonal(h).double().mean(), damp, name)


def _inverse_cholesky(reversed_h: Callable[[], torch.Tensor], mean_diag: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """:func:`hessian_inverse_cholesky` of ``H`` given ``reversed_h()``, a fresh ``J H J`` that this function
    may overwrite, and the mean of ``H``'s diagonal.

    Memory stays at two ``cols x cols`` float64 matrices: the factorisation writes into its input (LAPACK's
    wrapper still allocates one working copy meanwhile), the flipped factor replaces it, and the
    triangular solve writes into its identity right-hand side. Column-major
    layouts throughout, as ``torch.linalg`` itself returns them (which keeps the results bit-identical to
    the plain out-of-place calls). ``reversed_h`` is called again for each dampening retry instead of
    keeping a copy of ``H`` around for them.
    """
    mean_diag = mean_diag.clamp(min=1e-12)
    lam = max(damp, 1e-8) * mean_diag
    for attempt in range(6):
        hd = _column_major_float64(reversed_h())
        cols = hd.shape[0]
        torch.diagonal(hd).add_(lam)
        info = torch.empty((), dtype=torch.int32, device=hd.device)
        chol, info = torch.linalg.cholesky_ex(hd, out=(hd, info))  # in place: J (H + lambda I) J = L L^T
        del hd
        if info == 0:
            r = chol.flip(0, 1)  # upper triangular, H + lambda I = R R^T
            del chol
            u = torch.eye(cols, dtype=torch.float64, device=r.device).t()  # column-major right-hand side
            torch.linalg.solve_triangular(r, u, upper=True, out=u)
            del r
            if torch.isfinite(u).all():
                if attempt:
                    logger.warning("%s: Hessian needed dampening %.3g x mean diagonal to factorise.", name or "layer", float(lam / mean_diag))
                return u
            del u
        else:
            del chol
        lam = lam * 10
    raise FloatingPointError(f"{name or 'layer'}: the calibration Hessian could not be factorised even with strong dampening.")


def _column_major_float64(m: torch.Tensor) -> torch.Tensor:
    """``m`` as a column-major float64 matrix (``m`` itself when it already is one)."""
    if m.dtype == torch.float64 and m.stride() == (1, m.shape[0]):
        return m
    out = torch.empty(m.shape[1], m.shape[0], dtype=torch.float64, device=m.device).t()
    out.copy_(m)
    return out


def quant_objective(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``, the layer output error GPTQ minimises (product in float32, sum in float64)."""
    delta = (w_hat.double() - weight.double()).float()
    return float(((delta @ hessian.float()) * delta).double().sum())


def _qparams_for_columns(w_cols: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, clip: str, importance=None):
    """Scale/zero of one group given its current columns ``[rows, n]`` (and their importance ``H_jj``)."""
    scale, zero = compute_qparams(w_cols, bits, None, symmetric, scale_dtype, clip=clip, importance=importance)
    return scale[:, 0], (zero[:, 0] if zero is not None else None)


@contextlib.contextmanager
def few_threads(n: int = 1):
    """Run a loop of many small tensor ops on ``n`` threads: with more, thread wake-ups cost more than the
    work (and on a loaded machine OpenMP spinning makes it many times slower)."""
    before = torch.get_num_threads()
    if before > n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before > n:
            torch.set_num_threads(before)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: LayerSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    name: str = "",
) -> QuantizedWeight:
    """GPTQ codes and grid of ``weight[rows, cols]`` for input Hessian ``hessian[cols, cols]`` (see module docstring)."""
    if spec.bits is None:
        raise ValueError("method='gptq' quantizes weights: set bits (2, 3, 4, 5, 6 or 8).")
    bits, gs, sym = spec.bits, spec.group_size, spec.symmetric
    sdtype = scale_torch_dtype(spec.scale_dtype)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"The Hessian has shape {tuple(hessian.shape)}; expected {(cols, cols)} for a weight {tuple(weight.shape)}.")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("The calibration Hessian has non-finite entries (inf/NaN activations in the model).")
    # The values of prepare_hessian (float64, dead inputs neutralised), built directly in the permuted
    # order without full-size intermediate copies: the cols x cols matrices dominate GPTQ's memory.
    diag = torch.diagonal(hessian).to(torch.float64)
    dead = diag <= 0
    diag[dead] = 1.0
    g = cols if gs is None or gs >= cols else gs
    ngroups = num_groups(cols, gs)
    group_of = torch.arange(cols) // g

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(cols)
    u = _inverse_cholesky(lambda: _reversed_hessian(hessian, perm, dead), diag[perm].mean(), damp, name)
    # Work on the transpose: column j of W is the contiguous row wt[j], so per-column updates are cheap.
    wt = weight.detach().t()[perm].to(torch.float64, memory_format=torch.contiguous_format)
    wt[dead[perm]] = 0.0
    gperm = group_of[perm].tolist()  # group of the column at each permuted position
    pos_of = torch.empty(cols, dtype=torch.long)
    pos_of[perm] = torch.arange(cols)

    scale = torch.empty(rows, ngroups, dtype=sdtype)
    zero = None if sym else torch.empty(rows, ngroups, dtype=torch.uint8)
    ready = [False] * ngroups
    codes_t = torch.empty(cols, rows, dtype=torch.uint8)

    with few_threads(1):
        _gptq_loop(wt, u, gperm, pos_of, g, block_size, bits, sym, sdtype, spec.clip, scale, zero, codes_t, ready, diag[perm])
    del u, wt
    codes = codes_t[pos_of].t().contiguous()
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=bits, group_size=gs)


def _reversed_hessian(hessian: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``J P^T H P J`` as a column-major float64 matrix (``P`` the column permutation, ``J`` the order
    reversal), dead inputs given a unit diagonal; written a block of columns at a time, so the only
    temporaries are ``cols x chunk``."""
    cols = hessian.shape[0]
    order = perm.flip(0)
    out = torch.empty(cols, cols, dtype=torch.float64, device=hessian.device).t()
    for c0 in range(0, cols, chunk):
        out[:, c0 : c0 + chunk] = hessian[:, order[c0 : c0 + chunk]][order]
    idx = torch.nonzero(dead[order]).flatten()
    out[idx, idx] = 1.0
    return out


def _gptq_loop(wt, u, gperm, pos_of, g, block_size, bits, sym, sdtype, clip, scale, zero, codes_t, ready, importance) -> None:
    """The column loop of GPTQ on the transposed, permuted weight ``wt[cols, rows]`` (float64, in place);
    the codes of permuted column ``j`` go to ``codes_t[j]``."""
    cols, rows = wt.shape
    maxq = (1 << bits) - 1
    s_t = torch.empty(scale.shape[1], rows, dtype=torch.float64)
    z_t = torch.full((scale.shape[1], rows), float(1 << (bits - 1)), dtype=torch.float64)
    q = torch.empty(rows, dtype=torch.float64)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = wt[i1:i2]  # a view: in-block updates land in wt directly
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros(count, rows, dtype=torch.float64)
        for i in range(count):
            col = i1 + i
            grp = gperm[col]
            if not ready[grp]:
                # current values of every column of the group (pending lazy updates applied)
                members = pos_of[grp * g : min((grp + 1) * g, cols)]
                cur = wt[members].clone()
                later = members >= i2
                if i and bool(later.any()):
                    cur[later] -= u[i1:col, members[later]].t() @ err1[:i]
                sc, zc = _qparams_for_columns(cur.t(), bits, sym, sdtype, clip, importance[members])
                scale[:, grp] = sc
                s_t[grp] = sc.double()
                if zero is not None:
                    zero[:, grp] = zc
                    z_t[grp] = zc.double()
                ready[grp] = True
            x = w1[i]
            sv, zv = s_t[grp], z_t[grp]
            torch.round(x / sv, out=q)
            q.add_(zv).clamp_(0, maxq)
            codes_t[col] = q
            e = err1[i]
            torch.sub(x, (q - zv).mul_(sv), out=e)
            e.div_(u1[i, i])
            w1[i:].addr_(u1[i, i:], e, alpha=-1)
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)


def best_of_rtn(weight: torch.Tensor, hessian: torch.Tensor, spec: LayerSpec, q: QuantizedWeight, name: str = "") -> QuantizedWeight:
    """``q`` unless round-to-nearest reaches a lower output error on the calibration inputs."""
    rtn = quantize_rtn(weight, spec.bits, spec.group_size, spec.symmetric, scale_torch_dtype(spec.scale_dtype), spec.clip)
    obj_q = quant_objective(weight, q.dequantize(torch.float64), hessian)
    obj_rtn = quant_objective(weight, rtn.dequantize(torch.float64), hessian)
    if not math.isfinite(obj_q) or obj_rtn < obj_q:
        logger.info("%s: round-to-nearest beats the solver on the calibration objective; keeping RTN.", name or "layer")
        return rtn
    return q


def gptq_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """``compress_layer`` of method ``"gptq"`` (see :mod:`hfcompress.algorithms`)."""
    args = method_options("gptq", method_args, GPTQ_DEFAULTS)
    if stats.hessian is None:
        raise ValueError("method='gptq' needs the input Hessian; the calibration pipeline did not provide it.")
    q = gptq_quantize(weight, stats.hessian, spec, **args)
    q = best_of_rtn(weight, stats.hessian, spec, q)
    return CompressedWeight(weight=q.dequantize(torch.float32), quantized=q)


register_method(
    Method(
        name="gptq",
        data_free=False,
        quantizes=True,
        prunes=False,
        description="GPTQ: Hessian-based error-compensating quantization (act-order, static groups, lazy blocks).",
        needs=frozenset({"hessian"}),
        compress_layer=gptq_compress_layer,
        check_args=lambda args: method_options("gptq", args, GPTQ_DEFAULTS),
    )
)
