"""``rtn``: data-free round-to-nearest quantization on the shared grid."""

from __future__ import annotations

import torch

from ..formats.base import CompressedWeight
from ..grid import quantize_rtn, scale_torch_dtype
from ..spec import LayerSpec
from .base import Method, register_method


def rtn_compress(weight: torch.Tensor, spec: LayerSpec) -> CompressedWeight:
    """Quantize ``weight[rows, cols]`` to ``spec.bits`` with round-to-nearest."""
    if spec.bits is None:
        raise ValueError("method='rtn' quantizes weights: set bits (2, 3, 4, 5, 6 or 8).")
    q = quantize_rtn(weight, spec.bits, spec.group_size, spec.symmetric, scale_torch_dtype(spec.scale_dtype), spec.clip)
    return CompressedWeight(weight=q.dequantize(torch.float32), quantized=q)


register_method(
    Method(
        name="rtn",
        data_free=True,
        quantizes=True,
        prunes=False,
        description="Round-to-nearest integer quantization; needs no data, runs during from_pretrained.",
        compress=rtn_compress,
    )
)
