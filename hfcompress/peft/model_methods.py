"""transformers' own adapter methods on compressed models: ``model.add_adapter`` and ``model.load_adapter``.

Every model hfcompress compresses or loads carries these two methods in place of transformers' (bound to the
instance by :func:`hfcompress.bindings.install_model_methods`, which imports this module only when one is
called). Each one hands transformers a :class:`peft.LoraConfig` that knows hfcompress's compressed Linear
layer (:func:`~hfcompress.peft.register_compressed_lora`), then calls transformers' own method, so:

* ``model.add_adapter(LoraConfig(...))`` puts :class:`~hfcompress.peft.CompressedLoraLinear` layers (masked
  updates on sparse bases, exact merges) on the targeted compressed modules, and PEFT's ``lora.Linear`` on
  dense ones, exactly as :func:`hfcompress.peft.get_peft_model` does;
* ``model.load_adapter(folder)`` reads the adapter's config and the layer policy that
  :func:`hfcompress.peft.save_adapter` recorded next to it, so the loaded adapter computes what was trained.

A config the caller already registered (``register_compressed_lora(config, quant_aware=True)``) keeps its
policy. Adapters of other PEFT types go to transformers unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig
from torch import nn

from ..modules import CompressedLinear
from .api import _read_policy, decode_once, expand_all_linear
from .layer import check_lora_config, register_compressed_lora

__all__ = ["add_adapter", "load_adapter"]


def _knows_compressed_layers(config: LoraConfig) -> bool:
    return CompressedLinear in (getattr(config, "_custom_modules", None) or {})


def _prepared(config: Any, model: nn.Module, policy: dict[str, Any] | None = None) -> Any:
    """``config`` made ready for ``model``'s compressed layers (LoRA only; other configs are returned as they are)."""
    if not isinstance(config, LoraConfig):
        return config
    if not _knows_compressed_layers(config):
        register_compressed_lora(config, **(policy or {}))
    config = expand_all_linear(config, model)
    check_lora_config(model, config, config._custom_modules[CompressedLinear].quant_aware)
    return config


def add_adapter(model: nn.Module, adapter_config: PeftConfig, adapter_name: str | None = None, **kwargs: Any) -> Any:
    """transformers' ``model.add_adapter`` for a compressed model (see the module docstring)."""
    config = _prepared(adapter_config, model)
    with decode_once(model):
        return type(model).add_adapter(model, config, adapter_name, **kwargs)


def _local_adapter_folder(peft_model_id: Any) -> Path | None:
    if isinstance(peft_model_id, (str, os.PathLike)) and (Path(peft_model_id) / "adapter_config.json").is_file():
        return Path(peft_model_id)
    return None


def load_adapter(model: nn.Module, peft_model_id: str | os.PathLike | None = None, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``model.load_adapter`` for a compressed model (see the module docstring).

    With a local adapter folder and no ``peft_config``, the config and the recorded layer policy are read from
    the folder; an explicit ``peft_config`` is used as given (registered with the default policy if it is not
    registered yet). Adapters on the Hub load with the default policy unless ``peft_config`` says otherwise.
    """
    if args:
        raise TypeError(
            "load_adapter on a compressed model takes peft_model_id positionally and everything else by keyword "
            f"(got {len(args) + 1} positional arguments); write e.g. model.load_adapter(path, adapter_name='a')."
        )
    folder = _local_adapter_folder(peft_model_id)
    config = kwargs.pop("peft_config", None)
    policy = None
    if config is None and folder is not None:
        config = PeftConfig.from_pretrained(str(folder))
        policy = _read_policy(folder)
    elif config is None and peft_model_id is not None:
        download = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        config = PeftConfig.from_pretrained(str(peft_model_id), **download)
    if config is not None:
        kwargs["peft_config"] = _prepared(config, model, policy)
    with decode_once(model):
        return type(model).load_adapter(model, str(peft_model_id) if peft_model_id is not None else None, **kwargs)
