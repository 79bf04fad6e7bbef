"""Keep-masks from importance scores: unstructured (exact count) and N:M (exact pattern).

Every function takes ``scores[rows, cols]`` (higher = more important, e.g. ``|W|`` for magnitude,
``|W| * ||X||`` for Wanda) and returns a ``bool`` keep-mask of the same shape. Counts are exact: a
sparsity ``s`` over ``n`` weights prunes exactly ``round(s * n)`` of them, so the sparsity a config asks
for is the sparsity the checkpoint has. Ties are broken by position (stable sort), so masks are
deterministic.
"""

from __future__ import annotations

import math

import torch

from ..spec import MAX_NM_M, LayerSpec

__all__ = [
    "mask_for_spec",
    "check_sparsity",
    "lowest_k_mask",
    "nm_mask",
    "pad_to_groups",
    "prune_count",
    "split_count",
    "unstructured_mask",
    "validate_nm",
]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """``sparsity`` as a float in ``[0, 1)``, or a ``ValueError`` naming it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"{name}={sparsity!r} must be a number in [0, 1), e.g. 0.5 to prune half of the weights.")
    return float(sparsity)


def validate_nm(n: int, m: int) -> tuple[int, int]:
    """Check an N:M pattern (keep ``n`` of every ``m`` consecutive weights, ``1 <= n < m``)."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"N:M pattern {n!r}:{m!r} needs integers, e.g. 2:4.")
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern {n}:{m} needs 1 <= N < M (keep N of every M consecutive weights), e.g. 2:4.")
    if m > MAX_NM_M:
        raise ValueError(f"N:M pattern {n}:{m} has M={m}; hfcompress supports M <= {MAX_NM_M}.")
    return n, m


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights a sparsity prunes out of ``numel``: ``round(sparsity * numel)``."""
    return int(round(check_sparsity(sparsity) * numel))


def split_count(total: int, sizes: list[int] | torch.Tensor) -> torch.Tensor:
    """Split ``total`` over parts of the given ``sizes`` proportionally, as integers summing to ``total``.

    Largest-remainder apportionment: part ``i`` gets ``floor(total * size_i / sum)`` plus one for the
    parts with the largest remainders (ties to the first parts). No part exceeds its size.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.int64)
    whole = int(sizes.sum())
    if not 0 <= total <= whole:
        raise ValueError(f"total={total} must lie in [0, {whole}] (the sum of the sizes).")
    if whole == 0:
        return torch.zeros_like(sizes)
    exact = sizes.double() * total / whole
    base = exact.floor().to(torch.int64)
    rest = total - int(base.sum())
    if rest:
        order = torch.argsort(-(exact - base.double()), stable=True)
        base[order[:rest]] += 1
    return base


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly the ``k`` lowest entries of ``scores`` (any shape; ties by position)."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k={k} must lie in [0, {scores.numel()}] (the number of scores).")
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        s = torch.nan_to_num(scores.float(), nan=-math.inf).reshape(-1)
        keep.view(-1)[torch.argsort(s, stable=True)[:k]] = False
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask pruning the lowest-scored ``round(sparsity * numel)`` entries of ``scores``.

    ``per_row=False`` compares all entries of the matrix (layer-wise magnitude, SparseGPT blocks);
    ``per_row=True`` compares entries within each row (Wanda's per-output comparison group) and spreads
    the exact count over the rows (they differ by at most one).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [rows, cols], got shape {tuple(scores.shape)}.")
    rows, cols = scores.shape
    k = prune_count(rows * cols, sparsity)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if k == 0:
        return keep
    if not per_row:
        return lowest_k_mask(scores, k)
    s = torch.nan_to_num(scores.float(), nan=-math.inf)
    counts = split_count(k, [cols] * rows).to(scores.device)
    order = torch.argsort(s, dim=1, stable=True)
    prune = torch.arange(cols, device=scores.device).unsqueeze(0) < counts.unsqueeze(1)
    keep.scatter_(1, order, ~prune)
    return keep


def pad_to_groups(t: torch.Tensor, m: int, value: float | bool | int = 0) -> torch.Tensor:
    """``t[rows, cols]`` padded on the right to a multiple of ``m`` columns with ``value``."""
    pad = -t.shape[1] % m
    if not pad:
        return t
    fill = torch.full((t.shape[0], pad), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, fill], dim=1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores of every ``m`` consecutive columns of each row.

    When ``cols`` is not a multiple of ``m``, the last group is shorter and keeps ``min(n, len)`` entries
    (as if padded with pruned zeros).
    """
    validate_nm(n, m)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [rows, cols], got shape {tuple(scores.shape)}.")
    rows, cols = scores.shape
    s = torch.nan_to_num(scores.float(), nan=-math.inf, neginf=-math.inf)
    # Real -inf scores must still beat padding: map them to the lowest finite value first.
    s = torch.where(torch.isinf(s) & (s < 0), torch.full_like(s, torch.finfo(torch.float32).min), s)
    g = pad_to_groups(s, m, -math.inf).reshape(rows, -1, m)
    order = torch.argsort(g, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, -1)[:, :cols]


def mask_for_spec(scores: torch.Tensor, spec: LayerSpec, per_row: bool = False) -> torch.Tensor:
    """Keep-mask with exactly the sparsity/pattern of ``spec`` (all-true when the spec does not prune)."""
    nm = spec.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    if not spec.sparse:
        return torch.ones_like(scores, dtype=torch.bool)
    return unstructured_mask(scores, spec.sparsity, per_row=per_row)
