"""``nm``: N:M sparse weights as the N kept values of every M plus pattern-rank metadata.

Tensors per compressed module (``G = ceil(cols / M)`` groups per row; a short last group is padded with
pruned slots; ``k = ceil(log2 C(M, N))`` bits per group, see :mod:`hfcompress.sparsity.nm_index`):

=====================  ========================================  =============================================
name                   dtype / shape                             content
=====================  ========================================  =============================================
``weight_nm_index``    uint8 ``[rows, ceil(G*k/8)]``             pattern rank of each group, bit-packed per row
``weight_values``      float ``[rows, G*N]``                     unquantized specs: kept values in column
                                                                 order, in the dtype of the dense weight
``weight_packed``      uint8 ``[rows, ceil(G*N*bits/8)]``        quantized specs: their codes, bit-packed
``weight_scale``       as in ``packed``                          quantized specs: the ``packed`` grid, groups
``weight_zero_point``  as in ``packed``                          over the original (dense) columns
=====================  ========================================  =============================================

2:4 with bf16 values costs ``8 + 0.75 = 8.75`` bits per weight; with 4-bit codes and g64 fp16 scales
``2 + 0.75 + 0.25 = 3`` bits. Every shape is fixed by the spec, so a truncated checkpoint is caught
from its header before anything loads.
"""

from __future__ import annotations

import torch

from ..grid import dequantize, num_groups
from ..spec import LayerSpec
from ..sparsity.masks import pad_to_groups
from ..sparsity.nm_index import nm_groups, nm_index_row_bytes, pack_nm_index, pattern_ranks, patterns_from_ranks, unpack_nm_index
from . import get_format, register_format
from .base import CompressedWeight, TensorSpec, WeightFormat
from .bitmask import _keep_mask
from ..bitpack import pack_codes, packed_row_bytes, unpack_codes


def _nm(spec: LayerSpec) -> tuple[int, int]:
    if spec.nm is None:
        raise ValueError(f"format 'nm' needs sparsity_structure='N:M' (e.g. '2:4'), got {spec.sparsity_structure!r}.")
    return spec.nm


def _gather_kept(t: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Entries of ``t[rows, cols]`` at the ``n`` kept slots of each group, in column order ``[rows, G*n]``."""
    rows = t.shape[0]
    tg = pad_to_groups(t, m, 0).reshape(rows, -1, m)
    kg = pad_to_groups(keep, m, False).reshape(rows, -1, m)
    idx = torch.argsort((~kg).to(torch.int8), dim=-1, stable=True)[..., :n]  # kept slots first, in order
    return torch.gather(tg, -1, idx).reshape(rows, -1)


def _scatter_kept(values: torch.Tensor, keep: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    rows = values.shape[0]
    kg = pad_to_groups(keep, m, False).reshape(rows, -1, m)
    idx = torch.argsort((~kg).to(torch.int8), dim=-1, stable=True)[..., :n]
    out = torch.zeros(rows, kg.shape[1], m, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx, values.reshape(rows, -1, n))
    return out.reshape(rows, -1)[:, :cols]


@register_format("nm")
class NMFormat(WeightFormat):
    """Kept values (or their packed integer codes) of an N:M sparse weight plus per-group pattern ranks."""

    priority = 20

    def selects(self, spec: LayerSpec) -> bool:
        """N:M sparsity (before the unstructured bitmask)."""
        return spec.nm is not None

    value_tensors = ("weight_values",)

    def expected_tensors(self, shape2d: tuple[int, int], spec: LayerSpec) -> dict[str, TensorSpec]:
        rows, cols = shape2d
        n, m = _nm(spec)
        kept = nm_groups(cols, m) * n
        out: dict[str, TensorSpec] = {"weight_nm_index": ((rows, nm_index_row_bytes(cols, n, m)), torch.uint8)}
        if spec.quantized:
            grid = get_format("packed").expected_tensors(shape2d, spec)
            grid["weight_packed"] = ((rows, packed_row_bytes(kept, spec.bits)), torch.uint8)
            out.update(grid)
        else:
            out["weight_values"] = ((rows, kept), None)
        return out

    def _full_mask(self, keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored pattern (groups completed to exactly ``n`` slots) as a mask over padded columns."""
        ranks = pattern_ranks(keep, n, m)
        return ranks, patterns_from_ranks(ranks, n, m, keep.shape[1] + (-keep.shape[1] % m))

    def encode(self, cw: CompressedWeight, spec: LayerSpec) -> dict[str, torch.Tensor]:
        n, m = _nm(spec)
        rows, cols = cw.weight.shape
        ranks, slots = self._full_mask(_keep_mask(cw), n, m)
        slots = slots[:, :cols]
        out = {"weight_nm_index": pack_nm_index(ranks, n, m)}
        if spec.quantized:
            q = cw.quantized
            if q is None:
                raise ValueError("format 'nm' with bits set needs CompressedWeight.quantized (integer codes).")
            out.update(get_format("packed").encode(cw, spec))
            # completed slots hold the code of zero, so they decode to exactly zero like pruned weights
            zero_code = torch.full_like(q.codes, 1 << (q.bits - 1)) if q.zero is None else _expand_zero(q, cols)
            codes = torch.where(cw.mask.bool() if cw.mask is not None else cw.weight != 0, q.codes, zero_code)
            kept = _gather_kept(codes, slots, n, m)
            out["weight_packed"] = pack_codes(kept, q.bits)
        else:
            dtype = cw.dtype or torch.float32
            values = _gather_kept(cw.weight, slots, n, m)
            stored = values.to(dtype)  # reconstructed (SparseGPT/ADMM) values round to the storage dtype
            out["weight_values"] = stored.contiguous()
        return out

    def decode(self, tensors, spec, shape2d, dtype):
        rows, cols = shape2d
        n, m = _nm(spec)
        ranks = unpack_nm_index(tensors["weight_nm_index"], n, m, cols)
        slots = patterns_from_ranks(ranks, n, m, nm_groups(cols, m) * m)
        if spec.quantized:
            kept = unpack_codes(tensors["weight_packed"], spec.bits, nm_groups(cols, m) * n)
            codes = _scatter_kept(kept, slots, n, m, cols)
            zero = None
            if not spec.symmetric:
                zero = unpack_codes(tensors["weight_zero_point"], spec.bits, num_groups(cols, spec.group_size))
            w = dequantize(codes, tensors["weight_scale"], zero, spec.bits, spec.group_size, torch.float32)
            return (w * slots[:, :cols]).to(dtype)
        return _scatter_kept(tensors["weight_values"].to(dtype), slots, n, m, cols)


def _expand_zero(q, cols: int) -> torch.Tensor:
    from ..grid import expand_groups

    return expand_groups(q.zero, cols, q.group_size).to(q.codes.dtype)
