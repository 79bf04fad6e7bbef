"""``admm``: gradual ADMM pruning with optimal weight update (Boža, 2024), optionally jointly quantized.

The mask is chosen while the weights adapt (see :func:`hfcompress.algorithms.reconstruction.admm_prune`): the
sparsity rises along a cubic schedule and the mask is re-selected from the normalised ADMM iterate
(Wanda's score of the updated weights), then the weights are solved on the final mask. With ``bits``
the sparse result is quantized by SparseGPT/GPTQ's error-compensating pass on that fixed mask.

``method_args``: ``iters`` (45), ``mask_iters`` (0: two thirds of ``iters``), ``rho`` (0.3, relative to the
normalised Hessian), ``growth`` (1.3: factor on ``rho`` every ``every``=5 iterations), ``gradual``
(True), ``damp`` (0.01), ``block_size`` (128, for the quantization pass), plus the allocation settings.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.base import CompressedWeight
from .reconstruction import admm_prune
from ..spec import LayerSpec
from .base import Method, register_method
from .options import method_options
from .sparsegpt import sparsegpt_prune

DEFAULTS: dict[str, Any] = {
    "iters": 45, "mask_iters": 0, "rho": 0.3, "growth": 1.3, "every": 5, "gradual": True, "damp": 0.01,
    "block_size": 128,
}  # fmt: skip

__all__ = ["admm_compress_layer"]


def admm_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """Calibrated-method entry point (see :mod:`hfcompress.algorithms`)."""
    o = method_options("admm", method_args, DEFAULTS, allocation=True)
    if stats.hessian is None:
        raise ValueError("method='admm' needs the layer Hessian (LayerStats.hessian).")
    if not spec.sparse:
        return sparsegpt_prune(weight, stats.hessian, spec, o["block_size"], o["damp"])
    w, keep = admm_prune(
        weight, stats.hessian, spec, iters=o["iters"], mask_iters=o["mask_iters"] or None, rho=o["rho"],
        growth=o["growth"], every=o["every"], gradual=o["gradual"], damp=o["damp"],
    )  # fmt: skip
    if not spec.quantized:
        return CompressedWeight(weight=w, mask=keep)
    return sparsegpt_prune(w, stats.hessian, spec, o["block_size"], o["damp"], keep=keep)


register_method(
    Method(
        name="admm",
        data_free=False,
        quantizes=True,
        prunes=True,
        description="Gradual ADMM pruning with optimal weight update (mask and weights found jointly), "
        "unstructured or N:M; jointly quantized with a GPTQ pass on the final mask when bits is set.",
        needs=frozenset({"hessian"}),
        compress_layer=admm_compress_layer,
        check_args=lambda args: method_options("admm", args, DEFAULTS, allocation=True),
    )
)
