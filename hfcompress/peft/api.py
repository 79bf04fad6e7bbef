"""The user-facing LoRA workflow on compressed models: wrap, save, load, merge.

::

    from peft import LoraConfig
    from hfcompress import peft as hpeft

    model = AutoModelForCausalLM.from_pretrained("smollm2-sparse50")        # a compressed checkpoint
    lora = hpeft.get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    ...train (transformers.Trainer works)...
    hpeft.save_adapter(lora, "adapter")                                      # a normal PEFT adapter folder
    lora = hpeft.load_adapter(AutoModelForCausalLM.from_pretrained("smollm2-sparse50"), "adapter")
    merged, report = hpeft.merge_and_unload(lora)                            # mask kept, codes on the base grid
    merged.save_pretrained("smollm2-sparse50-tuned")                         # compressed format, reloads as usual

The plain PEFT and transformers calls build the same layer with the default policy: ``peft.get_peft_model(model,
LoraConfig(...))``, ``PeftModel.from_pretrained(model, path)``, ``model.add_adapter(config)`` and
``model.load_adapter(path)`` (the last one reads the recorded policy too); see :mod:`hfcompress.bindings`.
These functions take the policy as arguments and check the config before PEFT wraps anything.

The adapter folder is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``) plus a small
``hfcompress_lora.json`` recording the layer policy (masked update, quantization-aware training, merge
grid), which :func:`load_adapter` reads so the reloaded adapter computes exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import peft
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from torch import nn

from ..modules import CompressedModule
from .layer import CompressedLoraLinear, check_lora_config, register_compressed_lora
from .merge import MergeReport
from ..outputs import write_file_atomic

__all__ = [
    "POLICY_FILE",
    "compressed_lora_layers",
    "decode_once",
    "expand_all_linear",
    "get_peft_model",
    "load_adapter",
    "lora_policy",
    "merge_and_unload",
    "save_adapter",
]

#: file written next to adapter_config.json with the hfcompress layer policy
POLICY_FILE = "hfcompress_lora.json"
_POLICY_KEYS = ("mask_update", "quant_aware", "merge_grid")
_DEFAULT_POLICY = {"mask_update": True, "quant_aware": False, "merge_grid": "base"}


def compressed_lora_layers(model: nn.Module) -> dict[str, CompressedLoraLinear]:
    """``{module name: layer}`` of the hfcompress LoRA layers in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLoraLinear)}


def lora_policy(model: nn.Module) -> dict[str, Any]:
    """The policy (``mask_update``, ``quant_aware``, ``merge_grid``) of the model's hfcompress LoRA layers."""
    policies = {tuple(getattr(layer, k) for k in _POLICY_KEYS) for layer in compressed_lora_layers(model).values()}
    if not policies:
        return dict(_DEFAULT_POLICY)
    if len(policies) > 1:
        raise ValueError(f"The model mixes hfcompress LoRA layer policies {sorted(policies)}; use one policy per model.")
    return dict(zip(_POLICY_KEYS, policies.pop()))


def get_peft_model(
    model: nn.Module,
    config: LoraConfig,
    *,
    mask_update: bool = True,
    quant_aware: bool = False,
    merge_grid: str = "base",
    **kwargs: Any,
) -> PeftModel:
    """``peft.get_peft_model`` for a compressed model: registers the compressed LoRA layer, then wraps.

    ``kwargs`` go to :func:`peft.get_peft_model` (``adapter_name``, ...). See
    :func:`~hfcompress.peft.register_compressed_lora` for the policy arguments.
    """
    register_compressed_lora(config, mask_update=mask_update, quant_aware=quant_aware, merge_grid=merge_grid)
    expand_all_linear(config, model)
    check_lora_config(model, config, quant_aware)
    with decode_once(model):
        return peft.get_peft_model(model, config, **kwargs)


@contextmanager
def decode_once(model: nn.Module) -> Iterator[None]:
    """While PEFT wraps a model, decode each compressed module's weight once instead of at every read.

    PEFT looks at a target's ``.weight`` many times while replacing it (for its device), and a compressed
    module decodes its weight at every read. Inside this context each module keeps its last decoded weight
    until another module decodes, so memory stays at one decoded layer. Values are the real decoded weights.
    """
    last: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    modules = [m for m in model.modules() if isinstance(m, CompressedModule)]

    def cached(module: CompressedModule):
        decode = module.dequantize_weight

        def dequantize_weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
            key = (id(module), dtype)
            if key not in last:
                last.clear()
                last[key] = decode(dtype)
            return last[key]

        return dequantize_weight

    for m in modules:
        m.__dict__["dequantize_weight"] = cached(m)  # instance attribute, shadows the method until exit
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("dequantize_weight", None)
        last.clear()


def expand_all_linear(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """Resolve ``target_modules="all-linear"`` to the names of the model's Linear modules, compressed ones included,
    leaving out the output head (the model's output embeddings), as PEFT's own shorthand does; the names let
    :func:`~hfcompress.peft.layer.check_lora_config` see the targets before PEFT wraps them. Other values are left as
    they are.
    """
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == "all-linear"):
        return config
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and ".lora_" not in f".{name}"  # compressed ones too
    }
    if not names:
        raise ValueError("target_modules='all-linear' found no Linear modules in the model.")
    config.target_modules = names
    return config


def save_adapter(peft_model: PeftModel, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``peft_model.save_pretrained(path)`` plus :data:`POLICY_FILE`; returns the folder.

    The folder is a normal PEFT adapter: any PEFT loader reads it. The policy file is written atomically.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}.")
    path = Path(path)
    policy = lora_policy(peft_model)
    peft_model.save_pretrained(str(path), **kwargs)
    write_file_atomic(path / POLICY_FILE, json.dumps(policy, indent=2))
    return path


def _read_policy(path: Path) -> dict[str, Any]:
    file = path / POLICY_FILE
    if not file.is_file():
        return dict(_DEFAULT_POLICY)
    data = json.loads(file.read_text())
    unknown = set(data) - set(_POLICY_KEYS)
    if unknown:
        raise ValueError(f"{file} has unknown key(s) {sorted(unknown)}; expected {list(_POLICY_KEYS)}.")
    return {**_DEFAULT_POLICY, **data}


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    mask_update: bool | None = None,
    quant_aware: bool | None = None,
    merge_grid: str | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Load a saved LoRA adapter onto a (re)loaded compressed model; returns the :class:`peft.PeftModel`.

    The policy defaults to the one recorded in ``path``'s :data:`POLICY_FILE` (PEFT's defaults otherwise);
    explicit arguments override it. ``kwargs`` go to :meth:`peft.PeftModel.from_pretrained`.
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} has no adapter_config.json; pass the folder written by save_adapter/save_pretrained.")
    config = PeftConfig.from_pretrained(str(path))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{path} holds a {type(config).__name__} adapter; hfcompress.peft loads LoRA adapters.")
    policy = _read_policy(path)
    for key, value in (("mask_update", mask_update), ("quant_aware", quant_aware), ("merge_grid", merge_grid)):
        if value is not None:
            policy[key] = value
    register_compressed_lora(config, **policy)
    with decode_once(model):
        return PeftModel.from_pretrained(
            model, str(path), adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )


def merge_and_unload(
    peft_model: PeftModel,
    *,
    safe_merge: bool = False,
    adapter_names: list[str] | None = None,
    progressbar: bool = False,
) -> tuple[nn.Module, MergeReport]:
    """Merge the adapters into the compressed base and drop the LoRA layers; returns ``(model, report)``.

    Sparse bases keep their exact masks; quantized bases are re-quantized on their grid; the
    :class:`~hfcompress.peft.merge.MergeReport` gives the per-layer error against the exact merged weight.
    The returned model still saves in the compressed format (``model.save_pretrained(out)``).
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}.")
    layers = compressed_lora_layers(peft_model)
    prefix = "base_model.model."
    merged = peft_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
    report = MergeReport()
    for name, layer in layers.items():
        seen = set()
        for rep in layer.merge_reports.values():
            if id(rep) in seen:
                continue
            seen.add(id(rep))
            report.layers.append(dataclasses.replace(rep, name=name.removeprefix(prefix)))
    return merged, report
