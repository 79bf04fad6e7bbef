"""Compressed ``nn.Module`` replacements and the helpers that swap them into a model."""

from __future__ import annotations

import functools

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
    """A compressed module shaped like ``module`` (bias copied, weight not yet set).

    ``module`` may be an ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` or a subclass of one (transformers' scaled
    word embeddings, learned positional embeddings, routers, "same"-padding convolutions, user classes...). A
    subclass keeps everything that makes it different: the twin is an instance of a class derived from both the
    compressed base and the subclass (:func:`twin_class`), carries the subclass's attributes, buffers, extra
    parameters and child modules, and runs the subclass's own ``forward`` on the decoded weight when the subclass
    overrides it. A module whose weight is not a floating tensor (another quantizer's layer) is refused.
    """
    cls = type(module)
    base = next((twin for dense, twin in _TWINS.items() if isinstance(module, dense)), None)
    if base is None:
        raise TypeError(f"hfcompress cannot compress a {cls.__name__}; supported: {[c.__name__ for c in _TWINS]} and their subclasses.")
    weight = module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(
            f"hfcompress cannot compress a {cls.__name__} whose weight is "
            f"{type(weight).__name__ if not isinstance(weight, torch.Tensor) else weight.dtype}, not a floating parameter "
            "(already quantized by another method?); add the module to ignore."
        )
    new = base.from_dense(module, spec)
    new.value_dtype = weight.dtype
    new._weight_dtype = weight.dtype
    if cls is not base.dense_cls:
        new.__class__ = twin_class(cls)
        _carry_subclass_state(module, new)
    return new


@functools.lru_cache(maxsize=None)
def twin_class(dense_cls: type[nn.Module]) -> type[CompressedModule]:
    """The compressed twin class of ``dense_cls`` (a subclass of ``nn.Linear``/``nn.Conv2d``/``nn.Embedding``).

    It derives from the compressed base (storage, formats, kernels) and from ``dense_cls`` (so ``isinstance`` checks
    and transformers' per-class weight initialisation, e.g. restoring Gemma's ``embed_scale``, still apply). Its
    ``forward`` is the base's fast one when ``dense_cls`` keeps the standard computation, else ``dense_cls``'s own,
    which reads the decoded ``weight``.
    """
    base = next(twin for dense, twin in _TWINS.items() if issubclass(dense_cls, dense))
    standard = base.dense_cls
    overridden = [name for name in _FORWARD_METHODS[standard] if getattr(dense_cls, name) is not getattr(standard, name)]
    # transformers initialises subclasses as before (restoring their non-persistent buffers, e.g. Gemma's embed_scale)
    namespace: dict = {"__module__": __name__, "dense_cls": dense_cls, "_dense_dtype": _weight_dtype_of, "_is_hf_initialized": False}
    if overridden:
        namespace["forward"] = dense_cls.forward
        namespace["_subclass_forward"] = True
    name = f"Compressed{dense_cls.__name__}"
    cls = type(name, (base, dense_cls), namespace)
    cls.__qualname__ = f"twin_class.<{dense_cls.__module__}.{dense_cls.__qualname__}>"
    return cls


#: the methods whose override means a subclass computes differently from its standard class
_FORWARD_METHODS = {nn.Linear: ("forward",), nn.Conv2d: ("forward", "_conv_forward"), nn.Embedding: ("forward",)}


def _weight_dtype_of(self) -> torch.dtype:
    return self.__dict__.get("_weight_dtype") or torch.float32


def _carry_subclass_state(dense: nn.Module, twin: CompressedModule) -> None:
    """Give ``twin`` what ``dense`` has beyond the standard class: attributes, buffers, parameters, child modules."""
    for key, value in dense.__dict__.items():
        if key not in twin.__dict__ and not key.startswith("_"):
            twin.__dict__[key] = value
    twin._non_persistent_buffers_set.update(dense._non_persistent_buffers_set)
    for name, buf in dense._buffers.items():
        twin._buffers.setdefault(name, buf)
    for name, param in dense._parameters.items():
        if name not in ("weight", "bias"):
            twin._parameters[name] = param
    for name, child in dense._modules.items():
        twin._modules[name] = child


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
    "twin_class",
]
