"""From scores to a compressed weight: the mask a spec asks for, then (optionally) the integer grid.

Shared by the score-based pruners (magnitude, Wanda, ADMM): they differ only in the importance score
and in the comparison group (whole matrix or per output row).
"""

from __future__ import annotations

import math

import torch

from ..formats.base import CompressedWeight
from ..grid import quantize_rtn, scale_torch_dtype
from ..spec import LayerSpec
from .masks import check_sparsity, nm_mask, unstructured_mask

__all__ = ["mask_for_spec", "masked_weight"]


def mask_for_spec(scores: torch.Tensor, spec: LayerSpec, per_row: bool = False) -> torch.Tensor:
    """Keep-mask with exactly the sparsity/pattern of ``spec`` (all-true when the spec does not prune)."""
    nm = spec.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    if not spec.sparse:
        return torch.ones_like(scores, dtype=torch.bool)
    return unstructured_mask(scores, spec.sparsity, per_row=per_row)


def masked_weight(weight: torch.Tensor, keep: torch.Tensor, spec: LayerSpec) -> CompressedWeight:
    """Zero the pruned weights and, when ``spec`` quantizes, round the kept ones to the grid.

    Scales come from the kept weights only (pruned zeros lie on every grid and never widen a range), and
    pruned weights stay exactly zero after quantization.
    """
    w = weight.float() * keep
    if not spec.quantized:
        return CompressedWeight(weight=w, mask=keep)
    q = quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, scale_torch_dtype(spec.scale_dtype), spec.clip)
    return CompressedWeight(weight=q.dequantize(torch.float32) * keep, quantized=q, mask=keep)


#: ``method_args`` every pruning method accepts: they drive the per-layer allocation that runs before it
ALLOCATION_ARGS = {"allocation": "uniform", "owl_lambda": 0.08, "owl_threshold": 5.0, "max_sparsity": 0.99}
#: values of ``method_args["allocation"]`` (see :mod:`hfcompress.sparsity.allocation`)
ALLOCATIONS = ("uniform", "global", "lamp", "owl")


def allocation_of(method_args: dict | None) -> dict:
    """The allocation settings of ``method_args`` (defaults filled in, validated)."""
    args = {k: (method_args or {}).get(k, v) for k, v in ALLOCATION_ARGS.items()}
    if args["allocation"] not in ALLOCATIONS:
        raise ValueError(f"method_args['allocation']={args['allocation']!r} is not supported; use one of {ALLOCATIONS}.")
    lam = args["owl_lambda"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < 0.5:
        raise ValueError(f"method_args['owl_lambda']={lam!r} must be a number in [0, 0.5), e.g. 0.08.")
    thr = args["owl_threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or thr <= 0:
        raise ValueError(f"method_args['owl_threshold']={thr!r} must be a positive number, e.g. 5.")
    check_sparsity(args["max_sparsity"], "method_args['max_sparsity']")
    return args


def method_options(method: str, method_args: dict | None, defaults: dict) -> dict:
    """``defaults`` updated with ``method_args``; unknown keys and wrongly typed values raise ``ValueError``.

    Allocation settings (:data:`ALLOCATION_ARGS`) are accepted and dropped: they are consumed before the
    per-layer step.
    """
    method_args = dict(method_args or {})
    allowed = set(defaults) | set(ALLOCATION_ARGS)
    unknown = sorted(set(method_args) - allowed)
    if unknown:
        raise ValueError(f"method={method!r} got unknown method_args {unknown}; valid keys: {sorted(allowed)}.")
    out = dict(defaults)
    for key, default in defaults.items():
        if key not in method_args:
            continue
        value = method_args[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if ok and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"method_args[{key!r}]={value!r} for method={method!r} must be a finite number (default {default!r}).")
        if not ok:
            raise ValueError(
                f"method_args[{key!r}]={value!r} for method={method!r} must be a {type(default).__name__} "
                f"(default {default!r})."
            )
        out[key] = value
    allocation_of(method_args)  # the allocation settings' values
    return out
