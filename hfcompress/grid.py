"""The integer quantization grid shared by every algorithm and format.

A weight matrix ``W[rows, cols]`` (a Linear's ``[out, in]``, a Conv2d flattened to
``[out, in/groups * kh * kw]``, an Embedding's ``[num, dim]``) is split along ``cols`` into groups of
``group_size`` columns; the last group may be shorter when ``group_size`` does not divide ``cols``
("ragged" groups, e.g. 576 = 4 x 128 + 64). ``group_size=None`` means one group per row
(per-channel). Each (row, group) has a scale ``s`` and an integer zero point ``z`` and a weight is
stored as the unsigned code ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``; it decodes to
``(q - z) * s``.

* symmetric: ``z = 2**(bits-1)`` for every group (not stored), ``s = 2 * max|w| / (2**bits - 1)``. The codes
  reach one step further below zero than above (``-2**(bits-1) .. 2**(bits-1) - 1``), so the ``mse`` search
  (:func:`compute_qparams`) also tries *signed* scales that put the group's extreme weight on the wide side,
  ``s = -w_ext / 2**(bits-1)`` (llama.cpp's Q4_0 grid), or exactly on the narrow one, ``s = w_ext / (2**(bits-1) - 1)``;
  a negative scale decodes with the same formula.
* asymmetric: ``s = (max(w, 0) - min(w, 0)) / (2**bits - 1)``, ``z = round(-min(w, 0) / s)``, stored.

Scales are rounded to ``scale_dtype`` *before* the codes are computed, so the stored grid is exactly
the grid the codes were chosen on and decoding is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight",
    "group_width",
    "num_groups",
    "group_reduce",
    "expand_groups",
    "compute_qparams",
    "quantize",
    "dequantize",
    "quantize_rtn",
]

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_torch_dtype(name: str) -> torch.dtype:
    try:
        return _SCALE_DTYPES[name]
    except KeyError:
        raise ValueError(f"scale_dtype={name!r} is not supported; use one of {sorted(_SCALE_DTYPES)}.") from None


@dataclass
class QuantizedWeight:
    """Integer codes plus the grid they live on (what algorithms produce and formats store)."""

    codes: torch.Tensor  # uint8 [rows, cols] in [0, 2**bits)
    scale: torch.Tensor  # [rows, n_groups] in scale_dtype
    zero: torch.Tensor | None  # uint8 [rows, n_groups] (asymmetric) or None (symmetric)
    bits: int
    group_size: int | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.bits, self.group_size, dtype)

    @property
    def zero_full(self) -> torch.Tensor:
        """Zero points per (row, group) as int16 (the implicit ``2**(bits-1)`` when symmetric)."""
        if self.zero is None:
            return torch.full(self.scale.shape, 1 << (self.bits - 1), dtype=torch.int16, device=self.scale.device)
        return self.zero.to(torch.int16)


def group_width(cols: int, group_size: int | None) -> int:
    """Columns per group of a row of ``cols`` (the whole row for per-channel grids, ``None`` or wider than the row)."""
    return cols if group_size is None or group_size <= 0 or group_size >= cols else group_size


def num_groups(cols: int, group_size: int | None) -> int:
    """Groups per row; the last one is ragged when ``group_size`` does not divide ``cols``."""
    g = group_width(cols, group_size)
    return -(-cols // g)


def group_reduce(w: torch.Tensor, group_size: int | None, op: str) -> torch.Tensor:
    """Reduce each (row, group) of ``w[rows, cols]`` with ``op`` in {"amax", "amin", "sum"}."""
    rows, cols = w.shape
    g = group_width(cols, group_size)
    full = (cols // g) * g
    fn = {"amax": torch.amax, "amin": torch.amin, "sum": torch.sum}[op]
    parts = []
    if full:
        parts.append(fn(w[:, :full].reshape(rows, cols // g, g), dim=-1))
    if full < cols:
        parts.append(fn(w[:, full:], dim=-1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def expand_groups(t: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """Broadcast per-group values ``t[rows, n_groups]`` to ``[rows, cols]``."""
    g = group_width(cols, group_size)
    return t.repeat_interleave(g, dim=1)[:, :cols]


def _qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    maxq = (1 << bits) - 1
    if symmetric:
        scale = 2 * torch.maximum(xmax.abs(), xmin.abs()) / maxq
    else:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        scale = (xmax - xmin) / maxq
    scale = _rounded_scale(scale, scale_dtype)
    if symmetric:
        return scale, None
    return scale, torch.round(-xmin / scale.float()).clamp(0, maxq).to(torch.uint8)


def _rounded_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``scale_dtype``, its magnitude at least the dtype's ``tiny`` (rounding can hit 0), sign kept."""
    tiny = torch.finfo(scale_dtype).tiny
    sign = torch.where(scale < 0, -1.0, 1.0)
    out = (scale.abs().clamp(min=tiny) * sign).to(scale_dtype)
    return torch.where(out != 0, out, (sign * tiny).to(scale_dtype))


def _signed_scales(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> list[torch.Tensor]:
    """Symmetric scales that map the group's extreme weight exactly onto the lowest code or the highest one."""
    ext = torch.where(xmax.abs() >= xmin.abs(), xmax, xmin)
    half = float(1 << (bits - 1))
    return [_rounded_scale(-ext / half, scale_dtype), _rounded_scale(ext / (half - 1), scale_dtype)]


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    clip: str = "minmax",
    clip_grid: int = 20,
    clip_min_ratio: float = 0.5,
    norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points when asymmetric) of ``w[rows, cols]``.

    ``clip="mse"`` shrinks each group's range by the factor in ``[clip_min_ratio, 1]`` that minimises
    ``sum |w - Q(w)|**norm`` over the group (the search GPTQ and llm-compressor call MSE observer); symmetric
    grids also try, at every factor, the two signed scales that put the (shrunk) extreme on the lowest or the
    highest code, so the result is never worse than the positive-scale search and uses the extra negative code;
    ``importance[cols]`` weights each column's error in that sum (calibrated methods pass the input's
    second moment, the diagonal of the layer Hessian: what llama.cpp's importance matrix weights by).
    """
    w = w.float()
    xmin = group_reduce(w, group_size, "amin")
    xmax = group_reduce(w, group_size, "amax")
    scale, zero = _qparams_from_range(xmin, xmax, bits, symmetric, scale_dtype)
    if clip == "minmax":
        return scale, zero
    if clip != "mse":
        raise ValueError(f"clip={clip!r} is not supported; use 'minmax' or 'mse'.")
    weight = None if importance is None else importance.float().reshape(1, -1)
    best_err = _group_error(w, scale, zero, bits, group_size, norm, weight)
    for i in range(0, clip_grid + 1):
        ratio = 1.0 - (1.0 - clip_min_ratio) * i / clip_grid
        candidates = [] if i == 0 else [_qparams_from_range(xmin * ratio, xmax * ratio, bits, symmetric, scale_dtype)]
        if symmetric:
            candidates += [(s, None) for s in _signed_scales(xmin * ratio, xmax * ratio, bits, scale_dtype)]
        for s, z in candidates:
            err = _group_error(w, s, z, bits, group_size, norm, weight)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s, scale)
            if zero is not None:
                zero = torch.where(better, z, zero)
    return scale, zero


def _group_error(w, scale, zero, bits, group_size, norm, weight=None) -> torch.Tensor:
    q = quantize(w, scale, zero, bits, group_size)
    err = (dequantize(q, scale, zero, bits, group_size) - w).abs().pow(norm)
    if weight is not None:
        err = err * weight
    return group_reduce(err, group_size, "sum")


def _zero_full(zero: torch.Tensor | None, bits: int, rows: int, cols: int, group_size, device) -> torch.Tensor:
    if zero is None:
        return torch.full((rows, cols), float(1 << (bits - 1)), device=device)
    return expand_groups(zero.float(), cols, group_size)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int | None
) -> torch.Tensor:
    """Codes ``uint8[rows, cols]`` of ``w`` on the given grid."""
    rows, cols = w.shape
    s = expand_groups(scale.float(), cols, group_size)
    z = _zero_full(zero, bits, rows, cols, group_size, w.device)
    return torch.clamp(torch.round(w.float() / s) + z, 0, (1 << bits) - 1).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``codes[rows, cols]`` to ``dtype`` (computed in float32, then cast)."""
    rows, cols = codes.shape
    s = expand_groups(scale.float(), cols, group_size)
    z = _zero_full(zero, bits, rows, cols, group_size, codes.device)
    return ((codes.float() - z) * s).to(dtype)


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    clip: str = "minmax",
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight (data-free)."""
    scale, zero = compute_qparams(w, bits, group_size, symmetric, scale_dtype, clip=clip)
    codes = quantize(w, scale, zero, bits, group_size)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size)
