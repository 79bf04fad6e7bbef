"""YAML recipes: a file that maps 1:1 onto :class:`~hfcompress.HfCompressConfig`.

A recipe's top-level keys are exactly the config's fields (``quant_method: hfcompress`` may be
present or left out)::

    # int4 RTN, down_proj kept at 8 bits
    method: rtn
    bits: 4
    group_size: 128
    overrides:
      - targets: ["re:mlp\\\\.down_proj$"]
        bits: 8
        group_size: null

``load_recipe(path)`` validates it (unknown keys and bad values raise with the key named);
``save_recipe(config, path)`` writes ``config.to_dict()`` so that ``load_recipe`` returns an equal config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config import QUANT_METHOD, HfCompressConfig
from .outputs import write_file_atomic

__all__ = ["config_from_recipe", "load_recipe", "recipe_from_config", "recipe_to_yaml", "save_recipe"]


def config_from_recipe(recipe: dict[str, Any], source: str = "recipe") -> HfCompressConfig:
    """Build the config a recipe mapping describes; errors name the key, the value and the source."""
    if not isinstance(recipe, dict):
        raise ValueError(f"{source} must be a YAML mapping of HfCompressConfig fields, got {type(recipe).__name__}.")
    fields = dict(recipe)
    quant_method = fields.pop("quant_method", QUANT_METHOD)
    if quant_method != QUANT_METHOD:
        raise ValueError(f"{source}: quant_method={quant_method!r} is not an hfcompress recipe (expected {QUANT_METHOD!r}).")
    unknown = sorted(set(fields) - set(HfCompressConfig._FIELDS))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown}; a recipe's keys are the HfCompressConfig fields: "
            f"{', '.join(HfCompressConfig._FIELDS)}."
        )
    try:
        return HfCompressConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def recipe_from_config(config: HfCompressConfig) -> dict[str, Any]:
    """The recipe mapping of a config (its ``to_dict()``)."""
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an HfCompressConfig, got {type(config).__name__}.")
    return config.to_dict()


def recipe_to_yaml(config: HfCompressConfig) -> str:
    """The YAML text of a config's recipe (keys in the config's field order)."""
    return yaml.safe_dump(recipe_from_config(config), sort_keys=False, default_flow_style=None)


def load_recipe(path: str | os.PathLike) -> HfCompressConfig:
    """Read a YAML recipe file into a validated :class:`HfCompressConfig`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist.")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    return config_from_recipe(recipe, source=f"recipe {str(path)!r}")


def save_recipe(config: HfCompressConfig, path: str | os.PathLike) -> Path:
    """Write ``config`` as a YAML recipe (atomically) and return the path."""
    path = Path(path)
    text = recipe_to_yaml(config)
    return write_file_atomic(path, text)
