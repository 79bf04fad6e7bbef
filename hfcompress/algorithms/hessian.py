"""The layer Hessian as the Hessian-based methods (GPTQ, QuantEase, SparseGPT, ADMM) take it."""

from __future__ import annotations

import torch

__all__ = ["prepare_hessian"]


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of ``W`` and ``H`` in ``dtype`` with dead inputs neutralised, and the dead mask.

    A dead input (``H_jj <= 0``: no calibration token ever reached it) gets ``H_jj = 1`` and a zero weight
    column, as in GPTQ. Float64 for the quantization passes (GPTQ, QuantEase), float32 for the pruning ones.
    """
    w = weight.detach().to(dtype, copy=True)
    h = hessian.detach().to(dtype, copy=True)
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"The Hessian has shape {tuple(h.shape)}; expected {(w.shape[1], w.shape[1])} for a weight {tuple(w.shape)}.")
    if not torch.isfinite(h).all():
        raise FloatingPointError("The calibration Hessian has non-finite entries (inf/NaN activations in the model).")
    dead = torch.diagonal(h) <= 0
    if dead.any():
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    return w, h, dead
