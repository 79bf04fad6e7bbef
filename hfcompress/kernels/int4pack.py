"""``int4pack``: PyTorch's packed-int4 weight-only matmul (the tinygemm kernels), CPU and CUDA.

The kernel computes ``y = x @ W^T`` with ``W[n, k] = (u[n, k] - 8) * s[g, n] + c[g, n]`` for 4-bit ``u``, a
uniform group size ``g`` in {32, 64, 128, 256} and bfloat16 ``x``/``s``/``c`` (float32 accumulation):
``torch.ops.aten._weight_int4pack_mm_for_cpu`` on CPU (weights converted once by
``_convert_weight_to_int4pack_for_cpu``) and ``_weight_int4pack_mm`` on CUDA. Our weights map onto it exactly:

* **Codes of 2-4 bits** are one nibble plane ``u``. With ``q`` decoding to ``(q - z) * s``: when every
  ``q - z`` lies in ``[-8, 8)`` (symmetric grids; asymmetric ones of 2-3 bits), ``u = q - z + 8`` and ``c = 0``;
  otherwise (4-bit asymmetric) ``u = q`` and ``c = (8 - z) * s``.
* **Codes of 5-8 bits** are two nibble planes of ``u = 16 hi + lo``, concatenated along the input: the kernel
  sees a ``2K``-wide weight ``[hi | lo]`` with scales ``[16 s | s]`` and input ``[x | x]``, so one call with one
  float32 accumulation computes ``16 (hi - 8) s + (lo - 8) s + c = (u - 136) s + c``. When every ``q - z`` fits
  ``[-128, 128)`` (always, but for some 8-bit asymmetric grids) ``u = q - z + 128`` and ``c = 8 s``; otherwise
  ``u = q`` and ``c = (136 - z) s``.
* A constant ``c`` not exactly representable in bfloat16 goes into the kernel rounded, and the rounding
  residual is added exactly in float32 per group (``sum_k x[k] * residual``), so no rounding of a zero point
  enters the result beyond the kernel's own bfloat16 output.
* **Ragged and odd groups**: our groups (any ``group_size``, a shorter last group) become uniform kernel groups
  by splitting (kernel size dividing ``group_size``) and zero-padding the input width (see
  :func:`~hfcompress.kernels.codes.kernel_groups`); exact. A ``group_size`` that is not a multiple of 32
  (e.g. 40 or 48) cannot be split and the path reports it unsupported (``auto`` then picks another path).
* **Rows** are padded to the kernel's multiple (16 on CPU, 8 on CUDA) with zero weights; outputs are sliced.

The stored ``weight_packed`` codes (format ``packed``, CPU) are released after conversion and rebuilt exactly
from the kernel layout when needed (the conversion is a fixed nibble permutation, inverted generically), so
memory holds the weight once. Error bound: ``2**-6 * (|x| @ |W|^T + |b|)`` (bfloat16 compute, see
:func:`~hfcompress.kernels.base.error_bound`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bitpack import pack_codes
from ..grid import expand_groups
from .base import Prepared, QuantizedLinearPath, register_path
from .codes import expand_to_kernel_groups, invert_nibble_layout, kernel_groups, module_codes

GROUP_SIZES = (32, 64, 128, 256)
_ROW_MULTIPLE = {"cpu": 16, "cuda": 8}


def _ops_available(device_type: str) -> bool:
    names = {
        "cpu": ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
        "cuda": ("_weight_int4pack_mm", "_convert_weight_to_int4pack"),
    }.get(device_type)
    return names is not None and all(hasattr(torch.ops.aten, n) for n in names)


def _converter(device_type: str, cols: int):
    """``codes uint8 [rows, cols] -> kernel weight`` for this device."""
    if device_type == "cpu":

        def convert_cpu(codes: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)

        convert_cpu.layout_key = "int4pack-cpu"
        return convert_cpu
    inner_k_tiles = next(t for t in (8, 4, 2) if cols % (t * 16) == 0)

    def convert(codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.uint8)
        packed = (c[:, 0::2] << 4 | c[:, 1::2]).contiguous()  # tinygemm CUDA: even column in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)

    convert.layout_key = f"int4pack-cuda-{inner_k_tiles}"
    return convert


def _mm(device_type: str):
    if device_type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu
    return torch.ops.aten._weight_int4pack_mm


@register_path
class Int4PackPath(QuantizedLinearPath):
    name = "int4pack"
    description = "PyTorch packed-int4 weight-only matmul (CPU/CUDA tinygemm); 2-8-bit codes, bfloat16 compute"

    devices = tuple(_ROW_MULTIPLE)

    def missing_ops(self, device_type: str) -> str | None:
        return None if _ops_available(device_type) else f"the packed-int4 {device_type} ops"

    def unsupported_grid(self, module: nn.Module, device: torch.device) -> str | None:
        spec = module.spec
        cols = module.shape2d[1]
        if kernel_groups(cols, spec.group_size, GROUP_SIZES, self._col_multiple(device, cols)) is None:
            return f"group_size={spec.group_size} is not a multiple of 32 (kernel groups are 32, 64, 128 or 256 wide)"
        return None

    @staticmethod
    def _col_multiple(device: torch.device, cols: int) -> int:
        return 32 if device.type == "cuda" else 2

    def prepare(
        self, module: nn.Module, device: torch.device, release: bool = True, dtype: torch.dtype | None = None
    ) -> Prepared:
        self.require(module, device)
        mc = module_codes(module)
        rows, cols = module.shape2d
        bits, dev = mc.bits, device.type
        groups = kernel_groups(cols, mc.group_size, GROUP_SIZES, self._col_multiple(device, cols))
        two_planes = bits > 4
        # ---- the integer weight u (and its constant c) ---------------------------------------------------
        # W = (q - z) s. The kernel sees u = q + shift in [0, 16) (one plane) or [0, 256) (two planes) and computes
        # (u - centre) s + c s; so c = centre - z - shift. When every q - z fits the kernel's signed range, the
        # shift moves each group's zero point onto the kernel's centre code and c is 0 (one plane) or 8 (two
        # planes, the 136 - 128 of splitting u), both exact; otherwise shift = 0 and c = centre - z.
        centre_code = 128 if two_planes else 8
        q = mc.codes.to(torch.int16)
        zero = mc.zero_full  # int16 [rows, n_groups]
        signed = q - expand_groups(zero, cols, mc.group_size)
        fits = bool(signed.min() >= -centre_code) and bool(signed.max() < centre_code)
        shift = (centre_code - zero) if fits else torch.zeros_like(zero)  # per (row, group)
        u = q + expand_groups(shift, cols, mc.group_size)
        const = (136 if two_planes else 8) - zero - shift
        sb = mc.scale.to(torch.bfloat16).float()  # the kernel's scales
        exact_const = const.float() * sb  # exact in float32: a small integer times a bfloat16
        # The kernel adds c rounded to bfloat16 (so its output is the weight's own magnitude, not a large value
        # cancelled afterwards); the rounding residual, if any, is added exactly in float32 per group.
        kernel_const = exact_const.to(torch.bfloat16).float()
        residual = exact_const - kernel_const
        # ---- pad rows / columns, expand to kernel groups ------------------------------------------------------
        row_mult = _ROW_MULTIPLE[dev]
        rows_p = -(-rows // row_mult) * row_mult
        cols_p = groups.padded_cols
        fill = 136 if two_planes else 8  # pad value of u: a zero weight (its scale is 0 anyway)
        u_p = torch.full((rows_p, cols_p), fill, dtype=torch.int16, device=u.device)
        u_p[:rows, :cols] = u
        s_k = torch.zeros(rows_p, groups.count, dtype=torch.float32, device=u.device)
        s_k[:rows] = expand_to_kernel_groups(sb, groups)
        c_k = torch.zeros_like(s_k)
        c_k[:rows] = expand_to_kernel_groups(kernel_const, groups)
        r_k = torch.zeros_like(s_k)
        r_k[:rows] = expand_to_kernel_groups(residual, groups)
        if two_planes:
            planes = torch.cat([u_p >> 4, u_p & 15], dim=1).to(torch.uint8)  # [rows_p, 2 * cols_p]
            plane_scale = torch.cat([16 * s_k, s_k], dim=1)
            plane_const = torch.cat([torch.zeros_like(c_k), c_k], dim=1)
        else:
            planes, plane_scale, plane_const = u_p.to(torch.uint8), s_k, c_k
        scale_zeros = torch.stack([plane_scale.t(), plane_const.t()], dim=-1).to(torch.bfloat16).contiguous().to(device)
        has_residual = bool(r_k.any())
        correction = r_k.t().contiguous().to(device) if has_residual else None  # float32 [n_kernel_groups, rows_p]
        convert = _converter(dev, planes.shape[1])
        weight = convert(planes.to(device))
        mm = _mm(dev)
        gsize, in_features = groups.size, cols

        def run(x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            x2 = x.reshape(-1, in_features)
            if cols_p != in_features:
                x2 = F.pad(x2, (0, cols_p - in_features))
            xb = x2.to(torch.bfloat16)
            xk = torch.cat([xb, xb], dim=1) if two_planes else xb.contiguous()
            y = mm(xk, weight, gsize, scale_zeros)
            if correction is not None:
                sums = xb.float().reshape(xb.shape[0], -1, gsize).sum(-1)  # [M, n_kernel_groups]
                y = (y.float() + sums @ correction).to(x.dtype)
            else:
                y = y.to(x.dtype)
            if rows_p != rows:
                y = y[:, :rows]
            bias = module._parameters.get("bias")
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.reshape(*shape[:-1], rows)

        detail = (
            f"kernel groups of {gsize}"
            + (f", input padded {cols}->{cols_p}" if cols_p != cols else "")
            + (f", rows padded {rows}->{rows_p}" if rows_p != rows else "")
            + (", 2 nibble planes" if two_planes else "")
            + (", float32 zero-point residual" if has_residual else "")
        )
        prepared = Prepared(self.name, device, run, compute_dtype=torch.bfloat16, detail=detail)
        prepared.weight, prepared.scale_zeros, prepared.correction = weight, scale_zeros, correction
        if release and dev == "cpu" and module.format_name == "packed":
            self._release(module, prepared, convert, weight, rows, cols, rows_p, bits, shift, mc.group_size, two_planes)
        return prepared

    @staticmethod
    def _release(module, prepared, convert, weight, rows, cols, rows_p, bits, shift, group_size, two_planes) -> None:
        """Let the kernel layout be the only copy of the codes; ``restore`` rebuilds ``weight_packed`` exactly."""
        original = module._buffers["weight_packed"]
        width = weight.shape[1] * 2 if weight.dtype == torch.uint8 else None

        def restore() -> dict[str, torch.Tensor]:
            planes = invert_nibble_layout(convert, weight, rows_p, width).to(torch.int16)
            if two_planes:
                half = width // 2
                u = planes[:, :half] << 4 | planes[:, half:]
            else:
                u = planes
            codes = (u[:rows, :cols] - expand_groups(shift, cols, group_size)).to(torch.uint8)
            return {"weight_packed": pack_codes(codes, bits)}

        if width is None:  # not the CPU byte layout: keep the stored codes
            return
        rebuilt = restore()["weight_packed"]
        if not torch.equal(rebuilt, original):  # never drop what cannot be rebuilt bit for bit
            return
        prepared.take_over(("weight_packed",), restore)
