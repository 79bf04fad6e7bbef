"""Size-budgeted, non-uniform compression: which level each module gets so the checkpoint fits a budget.

::

    result = hfcompress.search_allocation(model, HfCompressConfig(method="gptq"), budget="3.5bits", tokenizer=tok)
    print(result.summary())
    model = hfcompress.oneshot(model, result.config, tokenizer=tok)     # or from_pretrained(..., quantization_config=)

* :mod:`.budget`: budgets (``"3.5bits"``, ``"120MB"``, a fraction of bf16) and exact stored bytes;
* :mod:`.levels`: candidate levels and the :class:`LevelDatabase` (each module compressed once per level);
* :mod:`.evolution`: the one-shot allocation baseline and the EvoPress-style search scored by KL divergence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calibration.data import check_token_ids, model_calibration_batches
from ..config import HfCompressConfig
from ..plan.targets import resolve_layers
from .budget import Budget, ModelBytes, model_bytes, parse_budget, stored_bytes
from .evolution import KLFitness, SearchResult, evolutionary_search, greedy_allocation
from .levels import DEFAULT_LEVELS, LevelDatabase, _at_level, build_level_database, level_name, parse_level

__all__ = [
    "DEFAULT_LEVELS",
    "Budget",
    "KLFitness",
    "LevelDatabase",
    "ModelBytes",
    "SearchResult",
    "build_level_database",
    "evolutionary_search",
    "greedy_allocation",
    "level_name",
    "model_bytes",
    "parse_budget",
    "parse_level",
    "search_allocation",
    "stored_bytes",
]


def _windows(model: nn.Module, dataset, tokenizer, count: int, seq_len: int, seed: int, **data_kwargs) -> torch.Tensor:
    batches = model_calibration_batches(
        dataset, tokenizer, tokenizer_from=getattr(getattr(model, "config", None), "_name_or_path", None),
        num_samples=count, seq_len=seq_len, seed=seed, batch_size=count, **data_kwargs,
    )  # fmt: skip
    check_token_ids(batches, model)
    ids = torch.cat([b["input_ids"] for b in batches])
    if ids.shape[0] < count:
        raise ValueError(f"the data gives {ids.shape[0]} windows of {seq_len} tokens; the search needs {count} (num_samples + fitness_samples).")
    return ids[:count]


def search_allocation(
    model: nn.Module,
    config: HfCompressConfig,
    budget: str | int | float,
    dataset: Any = None,
    *,
    tokenizer=None,
    levels=DEFAULT_LEVELS,
    database: LevelDatabase | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    fitness_samples: int = 16,
    fitness_seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    generations: int = 200,
    offspring: int = 16,
    survivors: int = 4,
    time_limit: float | None = None,
    show_progress: bool = True,
    **data_kwargs: Any,
) -> SearchResult:
    """Find per-module quantization levels for ``model`` so its whole checkpoint fits ``budget``.

    Args:
        model: the dense model (not modified).
        config: the method and its arguments (``rtn``, ``gptq``, ``quantease``, ``blocktune``...), targets, and the
            settings levels leave alone (symmetric, scale dtype, clip).
        budget: ``"3.5bits"`` (average over all the model's weights, embeddings included), ``"120MB"``, bytes, or
            a fraction of the bf16 size; every stored byte counts (:mod:`.budget`).
        dataset, tokenizer: calibration text as for :func:`hfcompress.oneshot` (default: the offline Wikipedia
            summaries); ``num_samples`` windows of ``seq_len`` calibrate the levels, ``fitness_samples`` further
            windows (their first ``fitness_seq_len`` tokens) score candidates.
        levels: the levels to choose from (``"w4g64"``, ``"w8"``...), when no ``database`` is given.
        database: a :class:`LevelDatabase` from an earlier call (``result`` of :func:`build_level_database`): reused,
            so several budgets cost one database.
        generations, offspring, survivors, time_limit, seed: the search (:func:`evolutionary_search`).
        data_kwargs: ``text_column``, ``dataset_config``, ``split``.

    Returns a :class:`SearchResult`; ``result.config`` compresses the model to the found levels.
    """
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an HfCompressConfig, got {type(config).__name__}.")
    for arg, value in (("num_samples", num_samples), ("fitness_samples", fitness_samples), ("seq_len", seq_len), ("fitness_seq_len", fitness_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}={value!r} must be a positive integer.")
    if fitness_seq_len > seq_len:
        raise ValueError(f"fitness_seq_len={fitness_seq_len} exceeds seq_len={seq_len}; the fitness windows are cut from calibration-sized windows.")
    plan = resolve_layers(model, config)
    if database is not None and sorted(database.names) != sorted(plan):
        raise ValueError("database was built for other modules than config targets; build it with the same config and model.")
    ids = _windows(model, dataset, tokenizer, num_samples + fitness_samples, seq_len, seed, **data_kwargs)
    calibration = [{"input_ids": ids[i : i + batch_size]} for i in range(0, num_samples, batch_size)]
    fitness_windows = ids[num_samples:, :fitness_seq_len]
    if database is None:
        database = build_level_database(model, config, levels, calibration, show_progress=show_progress)
        database_seconds = database.seconds
    else:
        database_seconds = 0.0
    parsed = parse_budget(budget, database.sizes)
    result = evolutionary_search(
        model, _with_common_level(config, database), database, parsed, fitness_windows, generations=generations,
        offspring=offspring, survivors=survivors, time_limit=time_limit, seed=seed, show_progress=show_progress,
    )  # fmt: skip
    result.seconds["database"] = database_seconds
    return result


def _with_common_level(config: HfCompressConfig, db: LevelDatabase) -> HfCompressConfig:
    """``config`` whose default bits/group size are the database's middle level, so the pinned overrides stay few
    and the config stands on its own even when ``config.bits`` was left unset."""
    return _at_level(config, next(iter(db.modules[db.levels[len(db.levels) // 2]].values())).spec)
