"""Compressed ``nn.Module`` replacements and the helpers that swap them into a model."""

from __future__ import annotations

import torch
from torch import nn

from ..spec import LayerSpec
from .base import CompressedModule
from .layers import CompressedConv2d, CompressedEmbedding, CompressedLinear

_TWINS: dict[type[nn.Module], type[CompressedModule]] = {
    nn.Linear: CompressedLinear,
    nn.Conv2d: CompressedConv2d,
    nn.Embedding: CompressedEmbedding,
}


def compressed_twin(module: nn.Module, spec: LayerSpec) -> CompressedModule:
    """A compressed module shaped like ``module`` (bias copied, weight not yet set)."""
    for cls, twin in _TWINS.items():
        if isinstance(module, cls):
            new = twin.from_dense(module, spec)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                new.value_dtype = weight.dtype
            return new
    raise TypeError(f"hfcompress cannot compress a {type(module).__name__}; supported: {[c.__name__ for c in _TWINS]}.")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compressed_modules(model: nn.Module) -> dict[str, CompressedModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedModule)}


__all__ = [
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedLinear",
    "CompressedModule",
    "compressed_modules",
    "compressed_twin",
    "set_submodule",
]
