"""Per-layer sparsity allocation that honours a global target exactly: uniform, global magnitude, LAMP, OWL.

Chosen with ``method_args={"allocation": ...}`` on any pruning method (unstructured sparsity only):

* ``"uniform"`` (default): every layer gets the config's ``sparsity``.
* ``"global"``: one magnitude threshold over all targeted layers (global magnitude pruning).
* ``"lamp"``: the layer-adaptive magnitude score of Lee et al. (2021), ``w_u^2 / sum_{|w_v| >= |w_u|} w_v^2``,
  thresholded globally, so no layer is emptied as global magnitude tends to do.
* ``"owl"``: outlier-weighted layer-wise sparsity (Yin et al., 2024): a block's share of Wanda outliers
  (``|W| * ||X|| > owl_threshold * mean``, on the dense model's calibration activations) sets its density,
  spread linearly over ``[s - owl_lambda, s + owl_lambda]`` around the target ``s``.

Whatever the scores, the result is turned into integer pruned counts per layer summing to exactly
``round(s * total weights)`` (each layer capped at ``max_sparsity``); a layer's sparsity is recorded as
``count / numel``, which the mask functions turn back into exactly ``count``. This module is the math;
:func:`hfcompress.plan.allocation.allocate_layer_specs` applies it to a model and
:func:`hfcompress.plan.allocation.allocated_config` pins the result in the config's ``overrides`` so the
checkpoint reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

import math
import re

import torch

from .masks import check_sparsity

__all__ = [
    "ALLOCATIONS",
    "ALLOCATION_ARGS",
    "allocation_of",
    "block_of",
    "apportion",
    "global_counts",
    "lamp_scores",
    "owl_sparsities",
]

_BLOCK = re.compile(r"^(.*?\.\d+)\.")




def apportion(wanted: dict[str, float], sizes: dict[str, int], total: int, max_sparsity: float = 1.0) -> dict[str, int]:
    """Integer counts near ``wanted`` (clipped to ``[0, max_sparsity * size]``) that sum to exactly ``total``.

    The clipped wishes are shifted by one common offset found by bisection (water filling), then rounded
    by largest remainder, so the allocation's shape is kept and the sum is exact.
    """
    names = list(wanted)
    cap = torch.tensor([math.floor(max_sparsity * sizes[n]) for n in names], dtype=torch.float64)
    want = torch.tensor([wanted[n] for n in names], dtype=torch.float64)
    if total > cap.sum():
        raise ValueError(
            f"Cannot prune {total} weights with each layer capped at max_sparsity={max_sparsity:g} "
            f"({int(cap.sum())} at most); raise method_args['max_sparsity'] or lower the sparsity."
        )

    def filled(shift: float) -> torch.Tensor:
        return torch.minimum(torch.clamp(want + shift, min=0), cap)

    lo, hi = -float(want.max()) - 1, float(cap.max()) + float(want.abs().max()) + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if filled(mid).sum() < total:
            lo = mid
        else:
            hi = mid
    counts = filled(hi)
    base = counts.floor()
    rest = int(total - base.sum())
    if rest > 0:
        room = (base < cap).double()
        order = torch.argsort(-((counts - base) + room * 2 - 2), stable=True)  # fractional parts, full layers last
        base[order[:rest]] += 1
    elif rest < 0:  # pragma: no cover - bisection overshoot by rounding
        order = torch.argsort(counts - base, stable=True)
        base[order[: -rest]] -= 1
    out = {n: int(c) for n, c in zip(names, base.tolist())}
    assert sum(out.values()) == total
    return out


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores of a weight, sorted ascending (flattened): ``a_i / sum_{j >= i} a_j`` over sorted ``a = w^2``."""
    a = torch.sort(weight.detach().double().reshape(-1).pow(2)).values
    tail = torch.flip(torch.cumsum(torch.flip(a, [0]), 0), [0])
    return torch.where(tail > 0, a / tail.clamp(min=1e-300), torch.zeros_like(a)).float()


def global_counts(sorted_scores: dict[str, torch.Tensor], total: int, caps: dict[str, int]) -> dict[str, int]:
    """How many of each layer's lowest (non-negative) scores one global threshold prunes, exactly ``total``.

    ``sorted_scores`` are 1-D ascending. Bisection runs on the bit patterns of float32 (monotonic for
    non-negative values), so the threshold is exact; ties at the threshold go to the layers in order.
    """
    names = list(sorted_scores)

    def count(t: float, right: bool) -> list[int]:
        v = torch.tensor([t], dtype=torch.float32)
        return [min(caps[n], int(torch.searchsorted(sorted_scores[n], v, right=right))) for n in names]

    if total > sum(caps.values()):
        raise ValueError(f"Cannot prune {total} weights: the layers' caps allow {sum(caps.values())}.")
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf as int32 bit patterns
    as_float = lambda i: torch.tensor([i], dtype=torch.int32).view(torch.float32).item()  # noqa: E731
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(count(as_float(mid), True)) >= total:
            hi = mid
        else:
            lo = mid + 1
    t = as_float(lo)
    below = count(t, False)
    upto = count(t, True)
    rest = total - sum(below)
    out = {}
    for n, b, u in zip(names, below, upto):
        take = min(rest, u - b)
        out[n] = b + take
        rest -= take
    return out


def owl_sparsities(
    outlier_ratio: dict[str, float], target: float, lam: float
) -> dict[str, float]:
    """OWL's per-block sparsity: density rises linearly with the outlier ratio over a ``2 * lam`` range."""
    names = list(outlier_ratio)
    r = torch.tensor([outlier_ratio[n] for n in names], dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - target)
    return {n: float(1 - d) for n, d in zip(names, density.tolist())}


#: ``method_args`` every pruning method accepts: they drive the per-layer allocation that runs before it
ALLOCATION_ARGS = {"allocation": "uniform", "owl_lambda": 0.08, "owl_threshold": 5.0, "max_sparsity": 0.99}
#: values of ``method_args["allocation"]`` (see this module's docstring)
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


def block_of(name: str) -> str:
    """The transformer block a module belongs to (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``)."""
    match = _BLOCK.match(name)
    return match.group(1) if match else name
