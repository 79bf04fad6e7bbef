"""``int8pack``: PyTorch's int8 weight-only matmul with one scale per output channel, CPU and CUDA.

``torch.ops.aten._weight_int8pack_mm(x, w, s)`` computes ``x @ (w * s[:, None])^T`` for an ``int8 [N, K]`` weight
and a bfloat16 ``x``/``s`` (float32 accumulation). It has no groups, so this path serves per-channel grids
(``group_size=None``, or a group at least as wide as the row) of any width up to 8 bits, as ``w = q - z``:
exact whenever that fits int8, i.e. always but for 8-bit asymmetric rows whose codes span more than 128 on one
side of their zero point (those layers are reported unsupported and ``auto`` runs them on ``int4pack``).
Grouped grids of 5-8 bits run on ``int4pack`` (two nibble planes) instead.

The CPU kernel needs the input width to be a multiple of 16 (other widths read out of bounds), so the input
and weight are zero-padded to it. The stored ``weight_packed`` codes are released after conversion and rebuilt
exactly from the int8 weight when needed. Error bound: ``2**-6 * (|x| @ |W|^T + |b|)`` (bfloat16 compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bitpack import pack_codes
from .base import Prepared, QuantizedLinearPath, register_path
from .codes import KernelUnsupported, module_codes

_COL_MULTIPLE = 16


@register_path
class Int8PackPath(QuantizedLinearPath):
    name = "int8pack"
    description = "PyTorch int8 weight-only matmul (per-channel scales), 2-8-bit codes, bfloat16 compute"

    devices = ("cpu", "cuda")

    def missing_ops(self, device_type: str) -> str | None:
        return None if hasattr(torch.ops.aten, "_weight_int8pack_mm") else "aten._weight_int8pack_mm"

    def unsupported_grid(self, module: nn.Module, device: torch.device) -> str | None:
        spec = module.spec
        cols = module.shape2d[1]
        if spec.group_size is not None and spec.group_size < cols:
            return f"int8pack has one scale per output channel; group_size={spec.group_size} < {cols} columns"
        return None

    def prepare(
        self, module: nn.Module, device: torch.device, release: bool = True, dtype: torch.dtype | None = None
    ) -> Prepared:
        self.require(module, device)
        mc = module_codes(module)
        rows, cols = module.shape2d
        offset = mc.zero_full[:, 0]  # int16 [rows]
        w = mc.codes.to(torch.int16) - offset[:, None]
        if w.numel() and (int(w.min()) < -128 or int(w.max()) > 127):
            raise KernelUnsupported("8-bit asymmetric codes reach further than int8 from their zero point")
        cols_p = -(-cols // _COL_MULTIPLE) * _COL_MULTIPLE
        weight = torch.zeros(rows, cols_p, dtype=torch.int8, device=w.device)
        weight[:, :cols] = w.to(torch.int8)
        weight = weight.to(device)
        scale_bf16 = mc.scale[:, 0].to(torch.bfloat16)
        scale = scale_bf16.to(device)
        in_features = cols

        def run(x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            x2 = x.reshape(-1, in_features)
            if cols_p != in_features:
                x2 = F.pad(x2, (0, cols_p - in_features))
            xb = x2.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(xb, weight, scale).to(x.dtype)
            bias = module._parameters.get("bias")
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.reshape(*shape[:-1], rows)

        detail = f"input padded {cols}->{cols_p}" if cols_p != cols else ""
        prepared = Prepared(self.name, device, run, compute_dtype=torch.bfloat16, detail=detail)
        prepared.weight, prepared.scale = weight, scale
        if release and module.format_name == "packed":
            bits = mc.bits
            original = module._buffers["weight_packed"]
            stored_device = original.device

            def restore() -> dict[str, torch.Tensor]:
                off = offset.to(weight.device)
                codes = (weight[:, :cols].to(torch.int16) + off[:, None]).to(torch.uint8)
                return {"weight_packed": pack_codes(codes, bits).to(stored_device)}

            if torch.equal(restore()["weight_packed"], original):
                prepared.take_over(("weight_packed",), restore)
        return prepared
