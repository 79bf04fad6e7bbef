"""Candidate levels and the level database: every searched module compressed once at every level.

A *level* is a quantization setting a module may get (``"w4g64"``: 4-bit codes, groups of 64 columns;
``"w8"``: 8 bits, one scale per output channel). :func:`build_level_database` compresses the model once per
level with the config's method (RTN, GPTQ, QuantEase, blocktune...), in the ordinary layer-by-layer pipeline,
and keeps each module's compressed twin, its exact stored bytes and its measured error. A search then assembles
candidate models by swapping those twins in and out; the database serves any number of budgets.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import HfCompressConfig
from ..inference import set_inference_path
from ..modules import CompressedModule, compressed_modules
from ..oneshot import oneshot
from ..plan.targets import resolve_layers
from ..spec import LayerSpec
from .budget import ModelBytes, model_bytes, stored_bytes

__all__ = ["DEFAULT_LEVELS", "LevelDatabase", "build_level_database", "level_name", "parse_level"]

#: the levels a search picks from when none are given
DEFAULT_LEVELS = ("w2g64", "w3g64", "w4g64", "w5g64", "w6g64", "w8g64")
_LEVEL = re.compile(r"^w([0-9]+)(?:g([0-9]+))?$")


def parse_level(level: str | LayerSpec, base: LayerSpec) -> LayerSpec:
    """``"w4g64"`` / ``"w8"`` (per output channel) / a :class:`LayerSpec` -> the spec of ``base`` at that level."""
    if isinstance(level, LayerSpec):
        return base.with_updates(bits=level.bits, group_size=level.group_size)
    match = _LEVEL.match(level.strip().lower()) if isinstance(level, str) else None
    if match is None:
        raise ValueError(f"level {level!r} is not a level; write 'w<bits>g<group size>' (e.g. 'w4g64') or 'w<bits>' (one scale per row).")
    bits, group = int(match.group(1)), match.group(2)
    return base.with_updates(bits=bits, group_size=int(group) if group else None)


def level_name(spec: LayerSpec) -> str:
    return f"w{spec.bits}" + (f"g{spec.group_size}" if spec.group_size else "")


@dataclass
class LevelDatabase:
    """Each searched module compressed at each level (cheapest level first).

    ``modules[level][name]``: the compressed twin, ready to put in the model in place of ``name``;
    ``nbytes[level][name]``: what it stores; ``errors[level][name]``: its relative output error on the
    calibration inputs (relative weight error for data-free methods); ``sizes``: the model's fixed bytes,
    parameter count and searched shapes; ``seconds``: time spent building it.
    """

    levels: list[str]
    method: str
    modules: dict[str, dict[str, CompressedModule]]
    nbytes: dict[str, dict[str, int]]
    errors: dict[str, dict[str, float]]
    sizes: ModelBytes
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)

    def total_bytes(self, assignment: dict[str, int]) -> int:
        """Bytes of the whole checkpoint with module ``name`` at level index ``assignment[name]``."""
        return self.sizes.fixed + sum(self.nbytes[self.levels[i]][n] for n, i in assignment.items())

    def specs(self, assignment: dict[str, int]) -> dict[str, LayerSpec]:
        return {n: self.modules[self.levels[i]][n].spec for n, i in assignment.items()}

    def uniform(self, index: int) -> dict[str, int]:
        return {n: index for n in self.names}


def _at_level(config: HfCompressConfig, spec: LayerSpec) -> HfCompressConfig:
    """``config`` with the level's bits and group size as its defaults."""
    config = copy.deepcopy(config)
    config.bits, config.group_size = spec.bits, spec.group_size
    config.post_init()
    return config


def _relative_weight_error(dense: torch.Tensor, module: CompressedModule) -> float:
    w = dense.detach().float().reshape(dense.shape[0], -1)
    diff = module.dequantize_weight(torch.float32).reshape_as(w).to(w.device) - w
    return float(diff.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


def build_level_database(
    model: nn.Module,
    config: HfCompressConfig,
    levels: list[str | LayerSpec] | tuple[str | LayerSpec, ...] = DEFAULT_LEVELS,
    batches: list[dict[str, torch.Tensor]] | None = None,
    *,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    **oneshot_kwargs: Any,
) -> LevelDatabase:
    """Compress every module ``config`` targets once at every level (the model itself is not modified).

    Args:
        model: the dense model (as loaded; calibrated methods compute in its dtype).
        config: method, method arguments, targets and the settings levels leave alone (symmetric, scale dtype,
            clip); its ``bits``/``group_size`` are replaced by each level's.
        levels: level names (``"w4g64"``, ``"w8"``) or :class:`LayerSpec`\\ s; at least two.
        batches: calibration batches for calibrated methods (model keyword arguments).
        dtype: the dtype dense tensors are counted at (default: the checkpoint's).
        oneshot_kwargs: passed to :func:`hfcompress.oneshot` (``blocks``, ``true_sequential``).
    """
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an HfCompressConfig, got {type(config).__name__}.")
    if config.sparsity or config.sparsity_structure != "unstructured" or config.lossless:
        raise ValueError(
            "A budget search chooses quantization levels; sparsity and lossless settings are not searched yet. "
            "Leave sparsity/sparsity_structure/lossless at their defaults in the config."
        )
    if not isinstance(levels, (list, tuple)) or len(levels) < 2:
        raise ValueError(f"levels={levels!r} must list at least two levels, e.g. ['w3g64', 'w4g64', 'w8'].")
    plan = resolve_layers(model, config)
    if not plan:
        raise ValueError("config selects no module to compress; check targets/ignore.")
    specs = [parse_level(level, config.default_spec()) for level in levels]
    names = [level_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"levels={list(levels)!r} lists a level twice ({names}); give each level once.")
    sizes = model_bytes(model, list(plan), dtype)
    start = time.perf_counter()
    db = LevelDatabase(levels=[], method=config.method, modules={}, nbytes={}, errors={}, sizes=sizes, names=list(plan))
    dense_weights = {n: model.get_submodule(n).weight for n in plan}
    with tqdm(total=len(specs), desc=f"levels ({config.method})", unit="level", disable=not show_progress) as progress:
        for spec, name in zip(specs, names):
            work = copy.deepcopy(model)
            layer_specs = {n: plan[n].with_updates(bits=spec.bits, group_size=spec.group_size) for n in plan}
            _, results = oneshot(
                work, _at_level(config, spec), batches, layer_specs=layer_specs, show_progress=False, return_results=True,
                **oneshot_kwargs,
            )  # fmt: skip
            twins = compressed_modules(work)
            for n in plan:  # a search runs each twin many times: decode it once, at its first forward
                set_inference_path(twins[n], "dequant_cache")
            db.modules[name] = {n: twins[n] for n in plan}
            db.nbytes[name] = {n: stored_bytes(twins[n].spec, sizes.shapes[n]) for n in plan}
            db.errors[name] = {
                n: results[n].error if n in results and results[n].error == results[n].error else _relative_weight_error(dense_weights[n], twins[n])
                for n in plan
            }  # fmt: skip
            del work
            progress.update(1)
    order = sorted(names, key=lambda level: sum(db.nbytes[level].values()))
    db.levels = order
    db.seconds = time.perf_counter() - start
    return db
