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
``count / numel``, which the mask functions turn back into exactly ``count``. :func:`allocate_layer_specs`
returns ``{module: LayerSpec}``; :func:`hfcompress.oneshot` writes them into the saved config's
``overrides`` so the checkpoint reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..spec import LayerSpec
from .prune import ALLOCATIONS, allocation_of

__all__ = [
    "ALLOCATIONS",
    "allocate_layer_specs",
    "allocation_of",
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


def _block_of(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else name


@torch.no_grad()
def _outlier_ratios(model: nn.Module, names: list[str], batches: Iterable[dict], threshold: float) -> dict[str, float]:
    """Share of Wanda outliers per block, on the dense model's activations (one forward over ``batches``)."""
    from ..calibration.stats import StatsCollector

    modules = {n: model.get_submodule(n) for n in names}
    with StatsCollector(modules, {"act_sq"}) as collector:
        for batch in batches:
            model(**batch)
    counts: dict[str, list[float]] = {}
    for name in names:
        w = modules[name].weight.detach().float()
        w = w.reshape(w.shape[0], -1)
        score = w.abs() * collector.stats(name).act_sq.to(w.device).clamp(min=0).sqrt().unsqueeze(0)
        outliers = float((score > threshold * score.mean()).sum())
        acc = counts.setdefault(_block_of(name), [0.0, 0.0])
        acc[0] += outliers
        acc[1] += score.numel()
    return {block: o / n for block, (o, n) in counts.items()}


def allocate_layer_specs(
    model: nn.Module,
    plan: dict[str, LayerSpec],
    method_args: dict | None,
    batches: Callable[[], Iterable[dict]] | Iterable[dict] | None = None,
) -> dict[str, LayerSpec] | None:
    """Per-module specs for the allocation in ``method_args`` (``None`` for ``"uniform"``).

    Layers whose spec does not prune are left out. ``batches`` (model inputs, or a callable returning
    them) is needed by ``"owl"`` only.
    """
    args = allocation_of(method_args)
    kind = args["allocation"]
    if kind == "uniform":
        return None
    pruned = {n: s for n, s in plan.items() if s.sparse}
    if not pruned:
        raise ValueError(f"method_args['allocation']={kind!r} needs a sparsity to distribute; the config prunes nothing.")
    structured = sorted({s.sparsity_structure for s in pruned.values() if s.nm is not None})
    if structured:
        raise ValueError(
            f"method_args['allocation']={kind!r} redistributes unstructured sparsity; sparsity_structure={structured[0]!r} "
            "fixes every layer's pattern. Use allocation='uniform' with N:M."
        )
    sizes = {n: _numel(model, n) for n in pruned}
    total = sum(round(s.sparsity * sizes[n]) for n, s in pruned.items())
    target = total / sum(sizes.values())
    caps = {n: math.floor(args["max_sparsity"] * sizes[n]) for n in pruned}
    if kind in ("global", "lamp"):
        scores = {}
        for n in pruned:
            w = model.get_submodule(n).weight
            scores[n] = lamp_scores(w) if kind == "lamp" else torch.sort(w.detach().float().reshape(-1).abs()).values
        counts = global_counts(scores, total, caps)
        del scores
    else:  # owl
        if batches is None:
            raise ValueError("method_args['allocation']='owl' needs calibration data; run it through hfcompress.oneshot.")
        data = batches() if callable(batches) else batches
        ratios = _outlier_ratios(model, list(pruned), data, args["owl_threshold"])
        per_block = owl_sparsities(ratios, target, args["owl_lambda"])
        wanted = {n: per_block[_block_of(n)] * sizes[n] for n in pruned}
        counts = apportion(wanted, sizes, total, args["max_sparsity"])
    out = {}
    for n, spec in pruned.items():
        if counts[n] == 0 and not spec.quantized:
            raise ValueError(
                f"allocation={kind!r} leaves {n!r} unpruned and it is not quantized, so it would not be compressed; "
                "add it to the config's ignore list or pick another allocation (e.g. 'lamp')."
            )
        out[n] = spec.with_updates(sparsity=counts[n] / sizes[n])
    return out


def _numel(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()


def _pinned_names(config) -> set[str]:
    """Module names pinned by exact-name overrides (``re:^name$``), as :func:`hfcompress.oneshot` writes them."""
    names = set()
    for override in config.overrides:
        for pattern in override.get("targets", []):
            if pattern.startswith("re:^") and pattern.endswith("$") and "sparsity" in override:
                names.add(re.sub(r"\\(.)", r"\1", pattern[4:-1]))
    return names


def allocation_pending(config) -> bool:
    """Whether ``config`` asks for a non-uniform allocation not yet pinned in its overrides (exact-name entries)."""
    if not config.method_args or allocation_of(config.method_args)["allocation"] == "uniform":
        return False
    return not _pinned_names(config)


def allocated_config(model: nn.Module, config, plan=None, batches=None, layer_specs=None):
    """``(config, plan)`` with the allocation of ``config.method_args`` pinned per module in ``overrides``.

    Unchanged when the allocation is uniform, already pinned, or ``layer_specs`` were given explicitly.
    """
    from ..targets import resolve_layers

    plan = resolve_layers(model, config) if plan is None else plan
    if layer_specs or not allocation_pending(config):
        return config, plan
    specs = allocate_layer_specs(model, plan, config.method_args, batches)
    from ..oneshot import config_with_layer_specs

    return config_with_layer_specs(model, config, specs)
