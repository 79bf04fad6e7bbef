"""``magnitude``: data-free pruning of the smallest ``|w|``, optionally followed by round-to-nearest.

Layer-wise by default: the ``round(sparsity * numel)`` smallest weights of each matrix are pruned
(N:M: the ``M - N`` smallest of every ``M`` consecutive inputs). Global magnitude (one threshold over all
layers) and LAMP are per-layer allocations (:mod:`hfcompress.sparsity.allocation`,
``method_args={"allocation": "global"}`` or ``"lamp"``) that set each layer's sparsity before this
layer-wise step. Needing no data, it also runs inside ``from_pretrained(..., quantization_config=...)``.
"""

from __future__ import annotations

import torch

from ..formats.base import CompressedWeight
from ..grid import quantize_rtn, scale_torch_dtype
from ..sparsity.masks import mask_for_spec
from ..spec import LayerSpec
from .base import Method, register_method
from .options import method_options

__all__ = ["magnitude_compress", "masked_weight"]


def masked_weight(weight: torch.Tensor, keep: torch.Tensor, spec: LayerSpec) -> CompressedWeight:
    """Zero the pruned weights and, when ``spec`` quantizes, round the kept ones to the grid.

    Scales come from the kept weights only (pruned zeros lie on every grid and never widen a range), and
    pruned weights stay exactly zero after quantization.
    """
    w = weight.float() * keep
    if not spec.quantized:
        return CompressedWeight(weight=w, mask=keep)
    q = quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, scale_torch_dtype(spec.scale_dtype), spec.clip)
    return CompressedWeight(weight=q.dequantize(torch.float32) * keep, quantized=q, mask=keep)


def magnitude_compress(weight: torch.Tensor, spec: LayerSpec) -> CompressedWeight:
    """Prune ``weight[rows, cols]`` by magnitude to ``spec``'s sparsity/pattern, then quantize if ``spec.bits``."""
    weight = weight.float()
    keep = mask_for_spec(weight.abs(), spec, per_row=False)
    return masked_weight(weight, keep, spec)


register_method(
    Method(
        name="magnitude",
        data_free=True,
        quantizes=True,
        prunes=True,
        description="Magnitude pruning (layer-wise; global/LAMP through allocation), unstructured or N:M, "
        "optionally followed by RTN; needs no data, runs during from_pretrained.",
        compress=magnitude_compress,
        check_args=lambda args: method_options("magnitude", args, {}, allocation=True),
    )
)
