"""Byte planes: how a tensor's elements are split into one entropy-coded plane and raw planes, and merged back.

Two layouts (the ``layout`` byte of a payload, see :mod:`hfcompress.lossless.codec`):

* ``LAYOUT_BYTES`` (0), for 1-byte dtypes (``uint8`` packed codes, ``int8``, ``bool`` masks, float8): the
  elements themselves are the symbols of one plane.
* ``LAYOUT_FLOAT`` (1), for ``bfloat16``, ``float16`` and ``float32``: each element, read as a little-endian
  unsigned integer of ``w`` bytes, is rotated left by one bit, which moves the sign bit to the bottom. The
  top byte of the rotated value is plane 0 (for bfloat16 and float32 exactly the 8-bit exponent; for float16
  the 5-bit exponent and the 3 highest mantissa bits) and is entropy-coded; the other ``w - 1`` bytes
  (mantissa and sign, close to uniformly distributed) form plane 1, ``w - 1`` bytes per element in
  little-endian order. Merging undoes both steps exactly, so every bit pattern (NaN payloads, infinities,
  subnormals, -0.0) survives.
"""

from __future__ import annotations

import numpy as np
import torch

LAYOUT_BYTES = 0
LAYOUT_FLOAT = 1

#: dtype <-> the code stored in a payload header (never renumber: files depend on it)
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float32: 3,
    torch.uint8: 10,
    torch.int8: 11,
    torch.bool: 12,
    torch.float8_e4m3fn: 13,
    torch.float8_e5m2: 14,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_FLOAT_WIDTH = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
_UINT = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_TORCH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def supported(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` can be coded losslessly."""
    return dtype in DTYPE_CODES


def layout_of(dtype: torch.dtype) -> int:
    return LAYOUT_FLOAT if dtype in _FLOAT_WIDTH else LAYOUT_BYTES


def plane_widths(dtype: torch.dtype) -> tuple[int, ...]:
    """Bytes per element of each plane (plane 0 is the one worth entropy coding)."""
    w = dtype.itemsize
    return (1, w - 1) if layout_of(dtype) == LAYOUT_FLOAT else (1,)


def as_uint_array(t: torch.Tensor) -> np.ndarray:
    """The elements of a CPU tensor as a flat little-endian unsigned-integer numpy array (no copy if contiguous)."""
    w = t.dtype.itemsize
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat.view(_TORCH_INT[w]).numpy().view(_UINT[w])


def split(x: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    """Planes of ``x`` (a flat uint array of ``dtype``'s width): ``[coded plane, raw plane]`` or ``[bytes]``."""
    if layout_of(dtype) == LAYOUT_BYTES:
        return [x]
    w = dtype.itemsize
    bits = 8 * w
    r = (x << x.dtype.type(1)) | (x >> x.dtype.type(bits - 1))
    hi = (r >> r.dtype.type(bits - 8)).astype(np.uint8)
    if w == 2:
        lo = r.astype(np.uint8)  # keeps the low byte
    else:
        lo = np.ascontiguousarray(r.view(np.uint8).reshape(-1, w)[:, : w - 1]).reshape(-1)
    return [hi, lo]


def merge(planes: list[np.ndarray], dtype: torch.dtype, out: np.ndarray) -> None:
    """Write the elements whose planes are ``planes`` into ``out`` (flat uint array, same length)."""
    if layout_of(dtype) == LAYOUT_BYTES:
        out[...] = planes[0]
        return
    w = dtype.itemsize
    hi, lo = planes
    if w == 2:
        np.left_shift(hi, 8, out=out, dtype=out.dtype)
        out |= lo
    else:
        v = out.view(np.uint8).reshape(-1, w)
        v[:, w - 1] = hi
        v[:, : w - 1] = lo.reshape(-1, w - 1)
    bits = 8 * w
    tail = out >> out.dtype.type(1)
    out <<= out.dtype.type(bits - 1)
    out |= tail
