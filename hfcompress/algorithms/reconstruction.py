"""ADMM weight reconstruction for a sparsity mask ("Fast and Optimal Weight Update for Pruned LLMs", Boža 2024).

For a layer with Hessian ``H`` (``X X^T`` up to a constant), the best weights on a fixed support ``S``
minimise ``tr((W - B) H (W - B)^T)`` subject to ``B = 0`` off ``S``. ADMM splits ``B`` (unconstrained,
closed form) and ``Z`` (projected onto the mask):

    B <- (W H + rho (Z - U)) (H + rho I)^-1
    Z <- mask * (B + U)
    U <- U + B - Z

Columns are first normalised by ``sqrt(diag H)`` (so ``rho`` is relative and ``|B + U|`` is Wanda's
score), ``H`` is diagonalised once, and every ``(H + rho I)^-1`` after a change of ``rho`` costs one
``[cols, cols]`` product. ``rho`` grows geometrically so ``B`` and ``Z`` meet. :func:`admm_update`
improves the weights for a given mask (e.g. SparseGPT's or Wanda's); :func:`admm_prune` also chooses
the mask, raising the sparsity gradually (cubic schedule) and re-selecting it from ``|B + U|`` while
the weights adapt, which is the paper's strongest variant.
"""

from __future__ import annotations

import torch

from ..spec import LayerSpec
from .hessian import prepare_hessian
from ..sparsity.masks import mask_for_spec

__all__ = ["admm_prune", "admm_update"]


class _Solver:
    """``(H + rho I)^-1`` for many ``rho`` from one eigendecomposition of the normalised Hessian."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor, damp: float) -> None:
        h = h.double()
        h = h + torch.eye(h.shape[0], dtype=h.dtype) * (damp * float(torch.diagonal(h).mean()))
        self.norm = torch.diagonal(h).sqrt()
        hn = h / self.norm.unsqueeze(0) / self.norm.unsqueeze(1)
        evals, self.vecs = torch.linalg.eigh(hn)
        self.evals = evals.clamp(min=0)
        self.vecs_f = self.vecs.float()
        self.wn = (w.double() * self.norm).float()
        self.wh = (self.wn.double() @ hn).float()

    def inverse(self, rho: float) -> torch.Tensor:
        return ((self.vecs / (self.evals + rho)) @ self.vecs.T).float()


def _iterate(solver: _Solver, mask_at, iters: int, rho: float, growth: float, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = solver.wn.clone()
    u = torch.zeros_like(z)
    mask = None
    inv = solver.inverse(rho)
    for t in range(iters):
        b = (solver.wh + rho * (z - u)) @ inv
        new_mask = mask_at(t, b + u)
        if new_mask is not None:
            mask = new_mask
        z = (b + u) * mask
        u = u + b - z
        if (t + 1) % every == 0:
            rho *= growth
            inv = solver.inverse(rho)
    return z, mask


@torch.no_grad()
def admm_update(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    iters: int = 20,
    rho: float = 0.1,
    growth: float = 1.3,
    every: int = 3,
    damp: float = 0.01,
) -> torch.Tensor:
    """Weights ``[rows, cols]`` supported on ``keep`` that (approximately) minimise the layer's output error."""
    if iters < 1:
        raise ValueError(f"iters={iters} must be a positive integer.")
    w, h, dead = prepare_hessian(weight, hessian, torch.float32)
    solver = _Solver(w, h, damp)
    keep = keep.bool() & ~dead.unsqueeze(0)
    z, _ = _iterate(solver, lambda t, v: keep if t == 0 else None, iters, rho, growth, every)
    return (z / solver.norm.float()) * keep


@torch.no_grad()
def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: LayerSpec,
    iters: int = 30,
    mask_iters: int | None = None,
    rho: float = 0.1,
    growth: float = 1.3,
    every: int = 3,
    gradual: bool = True,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose a mask of ``spec``'s sparsity/pattern and its weights; returns ``(weight, keep)``.

    The mask is re-selected from ``|B + U|`` (per output row, or per N:M group) every ``every`` iterations
    during the first ``mask_iters`` (default: two thirds of ``iters``); with ``gradual`` and an
    unstructured spec the sparsity rises along ``s * (1 - (1 - t / mask_iters)^3)``. The remaining
    iterations refine the weights on the final mask.
    """
    if iters < 1:
        raise ValueError(f"iters={iters} must be a positive integer.")
    w, h, dead = prepare_hessian(weight, hessian, torch.float32)
    solver = _Solver(w, h, damp)
    mask_iters = max(1, (2 * iters) // 3 if mask_iters is None else mask_iters)
    steps = list(range(0, mask_iters, every))
    gradual = gradual and spec.nm is None

    def mask_at(t: int, v: torch.Tensor) -> torch.Tensor | None:
        if t not in steps:
            return None
        s = spec
        if gradual and t != steps[-1]:
            frac = (steps.index(t) + 1) / len(steps)
            s = spec.with_updates(sparsity=spec.sparsity * (1 - (1 - frac) ** 3))
        return mask_for_spec(v.abs(), s, per_row=True)

    z, mask = _iterate(solver, mask_at, iters, rho, growth, every)
    return (z / solver.norm.float()) * mask, mask
