"""``gather_rows``: embeddings decode only the rows a lookup needs (format ``packed``).

Rows of the ``packed`` format never share bytes and each has its own scales, so a lookup unpacks and
dequantizes just the distinct ids it touches instead of the whole table (the reference path) or a dense copy
of it (``dequant_cache``). The values equal the reference's bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..bitpack import unpack_codes
from ..grid import dequantize, num_groups
from .base import InferencePath, Prepared, register_path


@register_path
class GatherRowsPath(InferencePath):
    name = "gather_rows"
    description = "embeddings: decode only the looked-up rows (format packed; exact)"

    def unsupported(self, module: nn.Module, device: torch.device) -> str | None:
        if not hasattr(module, "num_embeddings"):
            return f"gather_rows runs Embedding layers, not {type(module).__name__}"
        if module.format_name != "packed":
            return f"gather_rows reads rows of format 'packed', not {module.format_name!r}"
        if getattr(module, "max_norm", None) is not None:
            return "gather_rows cannot renormalise rows in place (max_norm is set)"
        return None

    def prepare(
        self, module: nn.Module, device: torch.device, release: bool = True, dtype: torch.dtype | None = None
    ) -> Prepared:
        self.require(module, device)
        spec = module.spec
        cols = module.shape2d[1]
        ng = num_groups(cols, spec.group_size)

        def run(ids: torch.Tensor) -> torch.Tensor:
            flat = ids.reshape(-1)
            rows, inverse = torch.unique(flat, return_inverse=True)
            buffers = module._buffers
            codes = unpack_codes(buffers["weight_packed"].index_select(0, rows), spec.bits, cols)
            zero = None
            if not spec.symmetric:
                zero = unpack_codes(buffers["weight_zero_point"].index_select(0, rows), spec.bits, ng)
            scale = buffers["weight_scale"].index_select(0, rows)
            table = dequantize(codes, scale, zero, spec.bits, spec.group_size, module._dense_dtype())
            return table.index_select(0, inverse).reshape(*ids.shape, cols)

        return Prepared(self.name, device, run, differentiable=True)
