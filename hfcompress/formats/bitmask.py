"""``bitmask``: unstructured sparse weights as kept values plus a packed bitmask, optionally quantized.

Tensors per compressed module (``rows x cols`` is the 2-D view of the weight, ``nnz`` the number of
kept weights, taken in row-major order):

=====================  ========================================  =============================================
name                   dtype / shape                             content
=====================  ========================================  =============================================
``weight_bitmask``     uint8 ``[rows, ceil(cols/8)]``            keep-mask, 1 bit per weight (bit ``j % 8`` of
                                                                 byte ``j // 8`` of its row = column ``j``)
``weight_values``      float ``[nnz]``                           unquantized specs: kept values, in the dtype
                                                                 of the dense weight (bf16 for SmolLM2);
                                                                 updated values are rounded to it
``weight_packed``      uint8 ``[ceil(nnz*bits/8)]``              quantized specs: codes of the kept weights as
                                                                 one bit stream (:mod:`.bitpack` layout)
``weight_scale``       as in ``packed``                          quantized specs: the grid of the ``packed``
``weight_zero_point``  as in ``packed``                          format, groups over the original columns
=====================  ========================================  =============================================

At 50 % sparsity a bf16 weight costs ``0.5 * 16 + 1 = 9`` bits; with 4-bit codes and g64 fp16 scales
``0.5 * 4 + 1 + 0.25 = 3.25`` bits. Row ``r``'s values start at ``popcount(bitmask[:r])``, so rows decode
alone. Pruned weights decode to exactly zero.
"""

from __future__ import annotations

import torch

from ..grid import dequantize, num_groups
from ..spec import LayerSpec
from . import get_format, register_format
from .base import CompressedWeight, TensorSpec, WeightFormat
from ..bitpack import pack_codes, packed_row_bytes, unpack_codes


def _keep_mask(cw: CompressedWeight) -> torch.Tensor:
    if cw.mask is not None:
        mask = cw.mask.bool()
        if cw.weight is not None and bool((cw.weight[~mask] != 0).any()):
            raise ValueError("CompressedWeight.mask prunes weights that are not zero in CompressedWeight.weight.")
        return mask
    return cw.weight != 0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool[rows, cols]`` to ``uint8[rows, ceil(cols/8)]``."""
    return pack_codes(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    return unpack_codes(packed, 1, cols).bool()


@register_format("bitmask")
class BitmaskFormat(WeightFormat):
    """Values (or packed integer codes) of the kept weights plus a 1-bit-per-weight keep-mask."""

    priority = 10

    def selects(self, spec: LayerSpec) -> bool:
        """Unstructured sparsity."""
        return spec.sparse and spec.nm is None

    value_tensors = ("weight_values",)

    def expected_tensors(self, shape2d: tuple[int, int], spec: LayerSpec) -> dict[str, TensorSpec]:
        rows, cols = shape2d
        out: dict[str, TensorSpec] = {"weight_bitmask": ((rows, packed_row_bytes(cols, 1)), torch.uint8)}
        if spec.quantized:
            grid = get_format("packed").expected_tensors(shape2d, spec)
            grid.pop("weight_packed")
            out.update(grid)
            out["weight_packed"] = ((None,), torch.uint8)
        else:
            out["weight_values"] = ((None,), None)
        return out

    def encode(self, cw: CompressedWeight, spec: LayerSpec) -> dict[str, torch.Tensor]:
        mask = _keep_mask(cw)
        out = {"weight_bitmask": pack_mask(mask)}
        if spec.quantized:
            q = cw.quantized
            if q is None:
                raise ValueError("format 'bitmask' with bits set needs CompressedWeight.quantized (integer codes).")
            out.update(get_format("packed").encode(cw, spec))
            kept = q.codes[mask]
            out["weight_packed"] = pack_codes(kept.reshape(1, -1), q.bits).reshape(-1)
        else:
            dtype = cw.dtype or torch.float32
            values = cw.weight[mask]
            stored = values.to(dtype)  # reconstructed (SparseGPT/ADMM) values round to the storage dtype
            out["weight_values"] = stored.contiguous()
        return out

    def decode(self, tensors, spec, shape2d, dtype):
        rows, cols = shape2d
        mask = unpack_mask(tensors["weight_bitmask"], cols)
        nnz = int(mask.sum())
        if spec.quantized:
            stored = tensors["weight_packed"]
            if stored.numel() != packed_row_bytes(nnz, spec.bits):
                raise ValueError(
                    f"format 'bitmask': weight_packed holds {stored.numel()} bytes but the bitmask keeps {nnz} weights "
                    f"({packed_row_bytes(nnz, spec.bits)} bytes at {spec.bits} bits); the checkpoint is corrupt."
                )
            kept = unpack_codes(stored.reshape(1, -1), spec.bits, nnz).reshape(-1)
            codes = torch.zeros(rows, cols, dtype=torch.uint8, device=mask.device)
            codes[mask] = kept
            zero = None
            if not spec.symmetric:
                zero = unpack_codes(tensors["weight_zero_point"], spec.bits, num_groups(cols, spec.group_size))
            w = dequantize(codes, tensors["weight_scale"], zero, spec.bits, spec.group_size, torch.float32)
            return (w * mask).to(dtype)
        values = tensors["weight_values"]
        if values.numel() != nnz:
            raise ValueError(
                f"format 'bitmask': weight_values holds {values.numel()} values but the bitmask keeps {nnz}; "
                "the checkpoint is corrupt."
            )
        out = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        out[mask] = values.to(dtype)
        return out
