"""Per-layer specs of a non-uniform sparsity allocation, pinned in the config's overrides.

The math (uniform, global magnitude, LAMP, OWL) is :mod:`hfcompress.sparsity.allocation`; this module runs it on
a model (:func:`allocate_layer_specs`, with one forward pass over calibration data for OWL) and writes the
per-module result into the config as exact-name ``overrides`` (:func:`config_with_layer_specs`), so the saved
``quantization_config`` reproduces every module's spec on reload.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..algorithms import get_method
from ..calibration.stats import StatsCollector
from ..config import HfCompressConfig
from ..sparsity.allocation import allocation_of, apportion, block_of, global_counts, lamp_scores, owl_sparsities
from ..spec import LayerSpec
from .targets import resolve_layers

__all__ = ["allocate_layer_specs", "allocated_config", "allocation_pending", "config_with_layer_specs"]


@torch.no_grad()
def _outlier_ratios(model: nn.Module, names: list[str], batches: Iterable[dict], threshold: float) -> dict[str, float]:
    """Share of Wanda outliers per block, on the dense model's activations (one forward over ``batches``)."""
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
        acc = counts.setdefault(block_of(name), [0.0, 0.0])
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
        wanted = {n: per_block[block_of(n)] * sizes[n] for n in pruned}
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
    """Module names pinned by exact-name overrides (``re:^name$``), as :func:`config_with_layer_specs` writes them."""
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
    plan = resolve_layers(model, config) if plan is None else plan
    if layer_specs or not allocation_pending(config):
        return config, plan
    specs = allocate_layer_specs(model, plan, config.method_args, batches)
    return config_with_layer_specs(model, config, specs)


def config_with_layer_specs(
    model: nn.Module, config: HfCompressConfig, layer_specs: dict[str, LayerSpec] | None
) -> tuple[HfCompressConfig, dict[str, LayerSpec]]:
    """A copy of ``config`` whose ``overrides`` pin the given per-module specs, and the resulting plan.

    Each module whose spec differs from what ``config`` gives it gets an exact-name override entry
    (placed first, so it wins), so the saved ``quantization_config`` reproduces every module's spec on
    reload. Used for non-uniform allocations such as OWL's per-layer sparsity.
    """
    plan = resolve_layers(model, config)
    if not layer_specs:
        return config, plan
    if not isinstance(layer_specs, dict):
        raise TypeError(f"layer_specs must be a dict {{module name: LayerSpec}}, got {type(layer_specs).__name__}.")
    method = get_method(config.method)
    default = config.default_spec()
    entries = []
    for name, spec in layer_specs.items():
        if name not in plan:
            close = [n for n in plan if n.endswith(str(name))][:3]
            raise ValueError(
                f"layer_specs key {name!r} is not a module the config compresses"
                + (f"; did you mean {close}?" if close else "; use full module names such as those of resolve_layers().")
            )
        if not isinstance(spec, LayerSpec):
            raise TypeError(f"layer_specs[{name!r}] must be a LayerSpec, got {type(spec).__name__}.")
        if spec.quantized and not method.quantizes:
            raise ValueError(f"layer_specs[{name!r}] sets bits={spec.bits} but method={config.method!r} does not quantize.")
        if spec.sparse and not method.prunes:
            raise ValueError(f"layer_specs[{name!r}] asks for sparsity but method={config.method!r} does not prune.")
        if not (spec.quantized or spec.sparse):
            raise ValueError(f"layer_specs[{name!r}] compresses nothing; set bits and/or sparsity.")
        if spec == plan[name]:
            continue
        changed = {k: v for k, v in spec.to_dict().items() if v != getattr(default, k)}
        entries.append({"targets": [f"re:^{re.escape(name)}$"], **changed})
    if not entries:
        return config, plan
    values = config.to_dict()
    values.pop("quant_method", None)
    values["overrides"] = entries + list(config.overrides)
    new_config = HfCompressConfig(**values)
    new_plan = resolve_layers(model, new_config)
    for name, spec in layer_specs.items():
        if new_plan[name] != spec:  # pragma: no cover - guards the override mechanism itself
            raise RuntimeError(f"Could not pin the spec of {name!r} through config overrides.")
    return new_config, new_plan
