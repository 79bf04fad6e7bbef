"""``packed``: integer codes bit-packed into bytes, with per-group scales and zero points.

Tensors stored per compressed module (``rows x cols`` is the 2-D view of the weight: ``[out, in]`` for
Linear, ``[out, in/groups*kh*kw]`` for Conv2d, ``[num_embeddings, dim]`` for Embedding):

=====================  ========================================  ========================================
name                   dtype / shape                             content
=====================  ========================================  ========================================
``weight_packed``      uint8 ``[rows, ceil(cols*bits/8)]``       codes, :mod:`~hfcompress.bitpack`
``weight_scale``       scale_dtype ``[rows, n_groups]``          one scale per (row, group)
``weight_zero_point``  uint8 ``[rows, ceil(n_groups*bits/8)]``   asymmetric only: bit-packed zero points
``weight_shape``       int64 ``[ndim]``                          the original weight shape
=====================  ========================================  ========================================

``n_groups = ceil(cols / group_size)`` (1 when per-channel). A weight decodes to
``(code - zero) * scale`` with ``zero = 2**(bits-1)`` when symmetric (see :mod:`hfcompress.grid`).
"""

from __future__ import annotations

import torch

from ..grid import dequantize, num_groups, scale_torch_dtype
from ..spec import LayerSpec
from . import register_format
from .base import CompressedWeight, TensorSpec, WeightFormat
from ..bitpack import pack_codes, packed_row_bytes, unpack_codes


@register_format("packed")
class PackedFormat(WeightFormat):
    """Codes bit-packed row by row, one scale (and zero point) per group."""

    priority = 0

    def selects(self, spec: LayerSpec) -> bool:
        """Dense quantized weights."""
        return spec.quantized and not spec.sparse

    def expected_tensors(self, shape2d: tuple[int, int], spec: LayerSpec) -> dict[str, TensorSpec]:
        rows, cols = shape2d
        ng = num_groups(cols, spec.group_size)
        out: dict[str, TensorSpec] = {
            "weight_packed": ((rows, packed_row_bytes(cols, spec.bits)), torch.uint8),
            "weight_scale": ((rows, ng), scale_torch_dtype(spec.scale_dtype)),
        }
        if not spec.symmetric:
            out["weight_zero_point"] = ((rows, packed_row_bytes(ng, spec.bits)), torch.uint8)
        return out

    def encode(self, cw: CompressedWeight, spec: LayerSpec) -> dict[str, torch.Tensor]:
        q = cw.quantized
        if q is None:
            raise ValueError("format 'packed' stores quantized weights; the spec has bits=None.")
        out = {"weight_packed": pack_codes(q.codes, q.bits), "weight_scale": q.scale.contiguous()}
        if q.zero is not None:
            out["weight_zero_point"] = pack_codes(q.zero, q.bits)
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], spec: LayerSpec, shape2d: tuple[int, int]):
        """Codes, scale and zero points (unpacked) of a stored weight."""
        rows, cols = shape2d
        codes = unpack_codes(tensors["weight_packed"], spec.bits, cols)
        zero = None
        if not spec.symmetric:
            zero = unpack_codes(tensors["weight_zero_point"], spec.bits, num_groups(cols, spec.group_size))
        return codes, tensors["weight_scale"], zero

    def decode(self, tensors, spec, shape2d, dtype):
        codes, scale, zero = self.unpack(tensors, spec, shape2d)
        return dequantize(codes, scale, zero, spec.bits, spec.group_size, dtype)
