"""``wanda``: pruning by weight magnitude times input norm (Sun et al., 2024), no weight update.

The score of ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, with ``||X_j||_2^2 = sum_t x_tj^2`` over the
calibration tokens (``LayerStats.act_sq``). Unstructured sparsity compares scores within each output row
(the paper's comparison group; the exact layer count is spread over the rows), N:M within every group
of ``M`` inputs of a row. With ``bits`` the kept weights are then rounded to the grid (RTN, scales from
kept weights). Needs only the activation norms, so calibration is one cheap pass.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.base import CompressedWeight
from ..sparsity.masks import mask_for_spec
from .magnitude import masked_weight
from .options import method_options
from ..spec import LayerSpec
from .base import Method, register_method

__all__ = ["wanda_compress_layer", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, act_sq: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(act_sq)`` broadcast over rows."""
    if act_sq.shape != (weight.shape[1],):
        raise ValueError(f"act_sq has shape {tuple(act_sq.shape)}, expected ({weight.shape[1]},) for a weight of shape {tuple(weight.shape)}.")
    return weight.float().abs() * act_sq.float().clamp(min=0).sqrt().unsqueeze(0)


def wanda_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """Calibrated-method entry point (see :mod:`hfcompress.algorithms`)."""
    method_options("wanda", method_args, {}, allocation=True)
    if stats.act_sq is None:
        raise ValueError("method='wanda' needs the input norms (LayerStats.act_sq).")
    keep = mask_for_spec(wanda_scores(weight, stats.act_sq), spec, per_row=True)
    return masked_weight(weight, keep, spec)


register_method(
    Method(
        name="wanda",
        data_free=False,
        quantizes=True,
        prunes=True,
        description="Wanda: prune the smallest |W| * ||X|| per output row (unstructured) or per N:M group; "
        "no weight update; RTN on the kept weights when bits is set.",
        needs=frozenset({"act_sq"}),
        compress_layer=wanda_compress_layer,
        check_args=lambda args: method_options("wanda", args, {}, allocation=True),
    )
)
