"""``sparsegpt``: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023), jointly quantized.

For a layer ``y = W x`` with Hessian ``H = 2/n sum x x^T``, SparseGPT walks the columns left to right in
blocks (``block_size`` columns). Within a block it picks the pruning mask from the OBS saliency
``w^2 / [H^-1]_jj^2`` (unstructured: the exact number of weights the block owes to the layer's target,
compared over the whole block; N:M: the ``M - N`` least salient of every ``M`` inputs of a row, decided
when the group is reached so it sees the updates of earlier columns), then for each column zeroes the
pruned weights (and, with ``bits``, rounds the kept ones to the grid, scales computed per group from
the current kept weights as in GPTQ) and spreads the error over the columns not yet processed through
the upper Cholesky factor of ``H^-1``. Pruned weights stay exactly zero and one pass yields the sparse,
quantized weight (the paper's joint 50% + 4-bit mode).

``method_args``: ``block_size`` (128), ``damp`` (0.01: fraction of the mean Hessian diagonal added to
the diagonal; raised tenfold until the Cholesky factorisation succeeds), ``refine_iters`` (0: after the
mask is chosen, run this many iterations of the ADMM optimal weight update of
:mod:`hfcompress.algorithms.reconstruction` on the fixed mask before quantizing), plus the allocation settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..formats.base import CompressedWeight
from ..grid import QuantizedWeight, compute_qparams, dequantize, group_width, quantize, scale_torch_dtype
from .hessian import prepare_hessian
from .reconstruction import admm_update
from ..sparsity.masks import lowest_k_mask, nm_mask, prune_count, split_count
from ..spec import LayerSpec
from .base import Method, register_method
from .options import method_options

DEFAULTS: dict[str, Any] = {"block_size": 128, "damp": 0.01, "refine_iters": 0}

__all__ = ["sparsegpt_compress_layer", "sparsegpt_prune", "inverse_hessian_factor"]


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` in float32, damp raised until the factorisation works."""
    h = h.double()
    mean_diag = float(torch.diagonal(h).mean()) or 1.0
    for _ in range(8):
        hd = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper.float()
        damp = damp * 10 if damp > 0 else 1e-6
    raise FloatingPointError(f"The Hessian stays singular after raising the dampening to {damp:g}; check the calibration data.")


def _block_size(block_size: int, cols: int, m: int | None, group_size: int | None) -> int:
    """``block_size`` rounded to a multiple of M and of the group size (when it fits), at least one unit."""
    unit = m or 1
    if group_size is not None and group_size <= block_size:
        unit = unit * group_size // math.gcd(unit, group_size)
    return max(unit, block_size // unit * unit)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: LayerSpec,
    block_size: int = 128,
    damp: float = 0.01,
    keep: torch.Tensor | None = None,
) -> CompressedWeight:
    """SparseGPT on ``weight[rows, cols]``; ``keep`` fixes the mask (then only reconstruction/quantization run)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer (128 is the usual choice).")
    w, h, dead = prepare_hessian(weight, hessian, torch.float32)
    rows, cols = w.shape
    hinv = inverse_hessian_factor(h, damp)
    nm = spec.nm
    quant = spec.quantized
    gsize = group_width(cols, spec.group_size)
    bs = _block_size(block_size, cols, nm[1] if nm else None, spec.group_size if quant else None)
    starts = list(range(0, cols, bs))
    counts = None
    if keep is None and nm is None and spec.sparse:
        # the exact layer count, spread over the blocks proportionally (dead columns are pruned first in each)
        sizes = [rows * (min(s + bs, cols) - s) for s in starts]
        counts = split_count(prune_count(rows * cols, spec.sparsity), sizes).tolist()
    out = torch.zeros_like(w)
    mask = torch.ones(rows, cols, dtype=torch.bool) if keep is None else keep.bool().clone()
    codes = torch.zeros(rows, cols, dtype=torch.uint8) if quant else None
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale_dtype = scale_torch_dtype(spec.scale_dtype)
    scale = zero = None
    for b, i1 in enumerate(starts):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        err1 = torch.zeros_like(w1)
        m1 = mask[:, i1:i2]
        if counts is not None:
            m1 = lowest_k_mask(w1.pow(2) / d.pow(2).unsqueeze(0), counts[b])
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and keep is None and i % nm[1] == 0:
                j = min(i + nm[1], i2 - i1)
                m1[:, i:j] = nm_mask(w1[:, i:j].pow(2) / d[i:j].pow(2).unsqueeze(0), *nm)
            if quant and col % gsize == 0:
                # grid of the next group from its current (partly updated) weights, pruned ones excluded
                g_end = min(col + gsize, cols)
                inside = w1[:, i : min(g_end - i1, i2 - i1)] * m1[:, i : min(g_end - i1, i2 - i1)]
                beyond = w[:, i2:g_end] * mask[:, i2:g_end] if g_end > i2 else w1[:, :0]
                scale, zero = compute_qparams(
                    torch.cat([inside, beyond], 1), spec.bits, None, spec.symmetric, scale_dtype, clip=spec.clip
                )
                scales.append(scale)
                if zero is not None:
                    zeros.append(zero)
            col_w = w1[:, i]
            q = col_w * m1[:, i]
            if quant:
                c = quantize(q.unsqueeze(1), scale, zero, spec.bits, None)
                codes[:, col] = c[:, 0]
                q = dequantize(c, scale, zero, spec.bits, None)[:, 0] * m1[:, i]
            out[:, col] = q
            e = (col_w - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        mask[:, i1:i2] = m1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out[:, dead] = 0
    qw = None
    if quant:
        qw = QuantizedWeight(
            codes=codes, scale=torch.cat(scales, 1), zero=torch.cat(zeros, 1) if zeros else None,
            bits=spec.bits, group_size=spec.group_size,
        )  # fmt: skip
        out = qw.dequantize(torch.float32) * mask
    return CompressedWeight(weight=out * mask, quantized=qw, mask=mask)


def sparsegpt_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """Calibrated-method entry point (see :mod:`hfcompress.algorithms`)."""
    opts = method_options("sparsegpt", method_args, DEFAULTS, allocation=True)
    if stats.hessian is None:
        raise ValueError("method='sparsegpt' needs the layer Hessian (LayerStats.hessian).")
    if not opts["refine_iters"]:
        return sparsegpt_prune(weight, stats.hessian, spec, opts["block_size"], opts["damp"])
    sparse_spec = spec.with_updates(bits=None)
    first = sparsegpt_prune(weight, stats.hessian, sparse_spec, opts["block_size"], opts["damp"])
    refined = admm_update(weight, stats.hessian, first.mask, iters=opts["refine_iters"], damp=opts["damp"])
    if not spec.quantized:
        return CompressedWeight(weight=refined, mask=first.mask)
    return sparsegpt_prune(refined, stats.hessian, spec, opts["block_size"], opts["damp"], keep=first.mask)


register_method(
    Method(
        name="sparsegpt",
        data_free=False,
        quantizes=True,
        prunes=True,
        description="SparseGPT: Hessian-based one-shot pruning with OBS weight reconstruction, unstructured or "
        "N:M, jointly quantized when bits is set; optional ADMM refinement of the weights (refine_iters).",
        needs=frozenset({"hessian"}),
        compress_layer=sparsegpt_compress_layer,
        check_args=lambda args: method_options("sparsegpt", args, DEFAULTS, allocation=True),
    )
)
