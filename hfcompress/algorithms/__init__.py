"""Registry of compression methods (the ``method=`` of :class:`~hfcompress.HfCompressConfig`).

A method is either *data-free* (it compresses one weight on its own, so it runs while
``from_pretrained`` loads the checkpoint) or *calibrated* (it needs activations and runs through
:func:`hfcompress.oneshot`). Data-free methods provide ``compress(weight2d, spec) -> CompressedWeight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats.base import CompressedWeight
from ..spec import LayerSpec


@dataclass(frozen=True)
class Method:
    name: str
    data_free: bool
    quantizes: bool
    prunes: bool
    description: str
    compress: Callable[[torch.Tensor, LayerSpec], CompressedWeight] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"Method {method.name!r} is already registered.")
    if method.data_free and method.compress is None:
        raise ValueError(f"Data-free method {method.name!r} needs a compress function.")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method={name!r} is not a known method; choose one of {sorted(_METHODS)}.") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)


from . import rtn  # noqa: E402,F401  (registers "rtn")

__all__ = ["Method", "available_methods", "get_method", "register_method"]
