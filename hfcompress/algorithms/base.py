"""The method contract (:class:`Method`) and the registry of methods (``method=`` of the config)."""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..formats.base import CompressedWeight
from ..registry import Registry
from ..spec import LayerSpec

if TYPE_CHECKING:
    from ..calibration.stats import LayerStats

#: statistics a calibrated method may ask the pipeline for
STAT_KINDS = frozenset({"hessian", "act_sq", "dense_cross"})


@dataclass(frozen=True)
class Method:
    name: str
    data_free: bool
    quantizes: bool
    prunes: bool
    description: str
    compress: Callable[[torch.Tensor, LayerSpec], CompressedWeight] | None = None
    #: calibration statistics ``compress_layer`` reads: a subset of :data:`STAT_KINDS`
    needs: frozenset[str] = field(default_factory=frozenset)
    #: calibrated methods: ``(weight2d float32 [rows, cols], LayerStats, LayerSpec, method_args) -> CompressedWeight``
    compress_layer: Callable[[torch.Tensor, "LayerStats", LayerSpec, dict[str, Any]], CompressedWeight] | None = None
    #: calibrated methods with block-output scale tuning: ``method_args -> BlockTuneOptions`` (validating them)
    tune_options: Callable[[dict[str, Any]], Any] | None = None
    #: ``method_args -> None``: raises ``ValueError``/``TypeError`` for an unknown key or a bad value; ``None``: the
    #: method takes no arguments
    check_args: Callable[[dict[str, Any]], Any] | None = None

    def validate(self, method_args: dict[str, Any]) -> None:
        """Refuse unknown or badly valued ``method_args`` (called when a config is built)."""
        if self.check_args is not None:
            self.check_args(method_args)
        elif method_args:
            raise ValueError(
                f"method={self.name!r} takes no method_args, got {sorted(method_args)}; remove them "
                "(see the method's documentation for what it accepts)."
            )


#: the methods, by name; the built-in ones load on first lookup
METHODS: Registry[Method] = Registry(
    "method",
    "method",
    builtins={
        "rtn": "hfcompress.algorithms.rtn",
        "gptq": "hfcompress.algorithms.gptq",
        "quantease": "hfcompress.algorithms.quantease",
        "blocktune": "hfcompress.algorithms.blocktune",
        "magnitude": "hfcompress.algorithms.magnitude",
        "wanda": "hfcompress.algorithms.wanda",
        "sparsegpt": "hfcompress.algorithms.sparsegpt",
        "admm": "hfcompress.algorithms.admm",
    },
)


def register_method(method: Method) -> Method:
    """Register ``method`` under ``method.name`` (checked: data-free methods need ``compress``, calibrated ones
    ``compress_layer``, ``needs`` a subset of :data:`STAT_KINDS`)."""
    if method.data_free and method.compress is None:
        raise ValueError(f"Data-free method {method.name!r} needs a compress function.")
    if not method.data_free and method.compress_layer is None:
        raise ValueError(f"Calibrated method {method.name!r} (data_free=False) needs a compress_layer function.")
    unknown = set(method.needs) - STAT_KINDS
    if unknown:
        raise ValueError(f"Method {method.name!r} needs unknown statistics {sorted(unknown)}; choose from {sorted(STAT_KINDS)}.")
    object.__setattr__(method, "needs", frozenset(method.needs))
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    """The method called ``name`` (``ValueError`` listing the choices otherwise)."""
    return METHODS.get(name)


def available_methods() -> list[str]:
    """The sorted names of every registered method."""
    return METHODS.names()


__all__ = ["METHODS", "STAT_KINDS", "Method", "available_methods", "get_method", "register_method"]
