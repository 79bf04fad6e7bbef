"""``blocktune``: a layer-wise start (QuantEase or GPTQ), then each block's scales tuned on its output.

Layer by layer the method is ``quantease`` (or ``gptq`` with ``start="gptq"``, faster); once a block's
layers are quantized, the calibration pipeline hands the block to
:func:`~hfcompress.algorithms.block_tune.tune_block_scales`, which fits the quantization scales (and the
block's normalisation gains) to the uncompressed model's block output. Codes, zero points and the
stored format are those of the layer-wise method, so a ``blocktune`` checkpoint loads like any other.

``method_args``: those of the starting method, ``start`` (``"quantease"``), and the ``tune_*`` keys of
:class:`~hfcompress.algorithms.block_tune.BlockTuneOptions`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.base import CompressedWeight
from ..spec import LayerSpec
from . import Method, register_method
from .block_tune import TUNE_DEFAULTS, BlockTuneOptions
from .gptq import check_method_args, gptq_compress_layer
from .quantease import QUANTEASE_DEFAULTS, quantease_compress_layer

__all__ = ["BLOCKTUNE_DEFAULTS", "blocktune_compress_layer", "blocktune_options"]

BLOCKTUNE_DEFAULTS: dict[str, Any] = {**QUANTEASE_DEFAULTS, "start": "quantease", **TUNE_DEFAULTS}
_STARTS = ("quantease", "gptq")


def _checked(method_args: dict[str, Any]) -> dict[str, Any]:
    args = check_method_args("blocktune", method_args, BLOCKTUNE_DEFAULTS)
    if args["start"] not in _STARTS:
        raise ValueError(f"method_args start={args['start']!r} is not a layer-wise start of 'blocktune'; choose one of {list(_STARTS)}.")
    if args["start"] == "gptq" and any(k in method_args for k in ("sweeps", "cd_damp")):
        raise ValueError("method_args sweeps/cd_damp only apply to start='quantease'; remove them or use start='quantease'.")
    return args


def blocktune_options(method_args: dict[str, Any]) -> BlockTuneOptions:
    """The block-tuning options of ``method_args`` (all of them validated, so errors come before any work)."""
    return BlockTuneOptions.from_method_args(_checked(method_args))


def blocktune_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """``compress_layer`` of method ``"blocktune"``: the layer-wise start (tuning happens per block)."""
    args = _checked(method_args)
    start = args.pop("start")
    layer_args = {k: v for k, v in args.items() if k not in TUNE_DEFAULTS}
    if start == "gptq":
        layer_args.pop("sweeps"), layer_args.pop("cd_damp")
        return gptq_compress_layer(weight, stats, spec, layer_args)
    return quantease_compress_layer(weight, stats, spec, layer_args)


register_method(
    Method(
        name="blocktune",
        data_free=False,
        quantizes=True,
        prunes=False,
        description="QuantEase per layer, then each block's quantization scales tuned on its output against the dense model (lowest error, slowest).",
        needs=frozenset({"hessian"}),
        compress_layer=blocktune_compress_layer,
        tune_options=blocktune_options,
        check_args=blocktune_options,
    )
)
