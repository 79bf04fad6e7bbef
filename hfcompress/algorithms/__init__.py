"""Registry of compression methods (the ``method=`` of :class:`~hfcompress.HfCompressConfig`).

A method is either *data-free* (it compresses one weight on its own, so it runs while
``from_pretrained`` loads the checkpoint) or *calibrated* (it needs activations and runs through
:func:`hfcompress.oneshot`). Data-free methods provide ``compress(weight2d, spec) -> CompressedWeight``.

Calibrated methods set ``data_free=False`` and provide
``compress_layer(weight2d, stats, spec, method_args) -> CompressedWeight``:

* ``weight2d``: the dense weight as float32 ``[rows, cols]`` (a copy the method may modify);
* ``stats``: a :class:`~hfcompress.calibration.stats.LayerStats` holding only what ``needs`` asks for
  (``"hessian"``: ``2/n * sum x x^T`` over the ``n`` calibration tokens, ``[cols, cols]`` float32;
  ``"act_sq"``: ``sum x**2`` per input feature, ``[cols]`` float32; ``"dense_cross"``: ``2/n * sum xd x^T``
  with ``xd`` the input of the uncompressed model, for methods that target the dense model's output,
  implies the Hessian and costs one extra block pass). Stats may be shared between modules
  that read the same input (q/k/v projections), so a method must not modify them in place;
* ``spec``: the :class:`~hfcompress.spec.LayerSpec` of this module (a per-layer override may differ from
  the config's defaults, e.g. OWL's non-uniform sparsity);
* ``method_args``: ``config.method_args`` (a dict).

Every method validates its ``method_args`` when the config is built: ``Method.check_args`` (``method_args ->
None``, raising ``ValueError``/``TypeError`` naming the key) runs in ``HfCompressConfig.post_init``, so a typo
fails before any model is touched. A method registered without ``check_args`` takes no arguments: any key is
refused.

The calibration pipeline (:mod:`hfcompress.calibration.pipeline`) collects the statistics block by
block, calls ``compress_layer`` for each targeted module and installs the result. A method that also
sets ``tune_options`` (``method_args -> BlockTuneOptions``) has each block's quantization scales tuned
afterwards on the block output against the dense model (:mod:`hfcompress.algorithms.block_tune`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..formats.base import CompressedWeight
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


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"Method {method.name!r} is already registered.")
    if method.data_free and method.compress is None:
        raise ValueError(f"Data-free method {method.name!r} needs a compress function.")
    if not method.data_free and method.compress_layer is None:
        raise ValueError(f"Calibrated method {method.name!r} (data_free=False) needs a compress_layer function.")
    unknown = set(method.needs) - STAT_KINDS
    if unknown:
        raise ValueError(f"Method {method.name!r} needs unknown statistics {sorted(unknown)}; choose from {sorted(STAT_KINDS)}.")
    object.__setattr__(method, "needs", frozenset(method.needs))
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
from . import gptq  # noqa: E402,F401  (registers "gptq")
from . import quantease  # noqa: E402,F401  (registers "quantease")
from . import blocktune  # noqa: E402,F401  (registers "blocktune")
from . import magnitude, wanda, sparsegpt, admm  # noqa: E402,F401  (sparsity methods)

__all__ = ["STAT_KINDS", "Method", "available_methods", "get_method", "register_method"]
