"""Integer codes of a compressed module and their mapping onto the integer-kernel grids.

Every quantized format (``packed``, and the quantized variants of ``bitmask``/``nm``) stores the same grid:
``weight_scale[rows, n_groups]`` and, when asymmetric, bit-packed ``weight_zero_point`` (see
:mod:`hfcompress.formats.packed`). :func:`module_codes` returns the integer codes of the *dense* weight on that
grid (pruned weights get the zero-point code, so they decode to exactly 0). The kernels need a uniform group
size from a fixed menu; :func:`kernel_groups` maps our groups (any size, a ragged last one) onto kernel groups
exactly, by splitting groups and padding the input width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..bitpack import unpack_codes
from ..grid import QuantizedWeight, dequantize, group_width, num_groups, quantize


class KernelUnsupported(ValueError):
    """A path cannot serve a module (the message says why)."""


def stored_tensors(module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in module.compressed_tensors().items() if n != "weight_shape"}


def module_codes(module) -> QuantizedWeight:
    """The integer codes of a quantized compressed module (any format on the shared grid), scales widened to float32."""
    spec = module.spec
    if not spec.quantized:
        raise KernelUnsupported(f"format {module.format_name!r} stores unquantized values (bits=None), not integer codes")
    tensors = stored_tensors(module)
    if "weight_scale" not in tensors:
        raise KernelUnsupported(f"format {module.format_name!r} does not store the integer grid (no weight_scale)")
    rows, cols = module.shape2d
    ng = num_groups(cols, spec.group_size)
    scale = tensors["weight_scale"].float()
    zero = None
    if not spec.symmetric:
        zero = unpack_codes(tensors["weight_zero_point"], spec.bits, ng)
    if module.format_name == "packed":
        codes = unpack_codes(tensors["weight_packed"], spec.bits, cols)
    else:
        # Generic: decode, then read the codes back off the grid. (q - z) * s is exact in float32 for codes of
        # at most 8 bits and float16/bfloat16 scales, so the division recovers q exactly; pruned weights are 0
        # and come back as the zero point. Checked below, so a format that is not on its grid is refused.
        dense = module.format.decode(tensors, spec, (rows, cols), torch.float32)
        codes = quantize(dense, scale, zero, spec.bits, spec.group_size)
        if not torch.equal(dequantize(codes, scale, zero, spec.bits, spec.group_size, torch.float32), dense):
            raise KernelUnsupported(f"format {module.format_name!r} does not decode onto its integer grid exactly")
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=spec.bits, group_size=spec.group_size)


@dataclass(frozen=True)
class KernelGroups:
    """Uniform kernel groups covering our groups: kernel group ``j`` uses our group ``index[j]``."""

    size: int  # kernel group size
    padded_cols: int  # input width after zero padding (a multiple of ``size``)
    index: tuple[int, ...]  # our group of each kernel group

    @property
    def count(self) -> int:
        return self.padded_cols // self.size


def kernel_groups(cols: int, group_size: int | None, sizes: tuple[int, ...], multiple: int = 1) -> KernelGroups | None:
    """Map groups of ``group_size`` columns (ragged last group allowed) onto kernel groups of one of ``sizes``.

    Exact when every kernel group lies inside one of our groups: true when the kernel size divides our group
    size, or when a row has a single group. The input is zero-padded to a multiple of the kernel size (and of
    ``multiple``) when the width is not one; the padded columns multiply zeros. Prefers the least padding, then
    the largest kernel group. ``None`` when no size fits (e.g. ``group_size=48`` with sizes 32..256).
    """
    g = group_width(cols, group_size)
    single = g == cols
    best = None
    for size in sorted(sizes, reverse=True):
        if not single and g % size:
            continue
        step = size * multiple // _gcd(size, multiple)
        padded = -(-cols // step) * step
        key = (padded, -size)
        if best is None or key < best[0]:
            best = (key, size, padded)
    if best is None:
        return None
    _, size, padded = best
    index = tuple(0 if single else min(j * size // g, num_groups(cols, group_size) - 1) for j in range(padded // size))
    return KernelGroups(size=size, padded_cols=padded, index=index)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def expand_to_kernel_groups(per_group: torch.Tensor, groups: KernelGroups) -> torch.Tensor:
    """``[rows, n_groups]`` values to ``[rows, n_kernel_groups]`` (each kernel group takes its group's value)."""
    index = torch.tensor(groups.index, dtype=torch.long, device=per_group.device)
    return per_group.index_select(1, index)


# ---------------------------------------------------------------------------------------------- layout inversion
_LAYOUT_CACHE: dict | None = None


@contextlib.contextmanager
def layout_cache() -> Iterator[None]:
    """Within the block, remember layout permutations per shape (a model repeats a few shapes many times)."""
    global _LAYOUT_CACHE
    outer = _LAYOUT_CACHE
    if outer is None:
        _LAYOUT_CACHE = {}
    try:
        yield
    finally:
        if outer is None:
            _LAYOUT_CACHE = None


def nibble_layout_index(convert, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Where each code lands in a 4-bit kernel layout: int64 ``[rows * cols]`` of nibble positions.

    ``convert(codes uint8 [rows, cols]) -> packed`` is a kernel's weight converter, a data-independent permutation
    of 4-bit codes into bytes. Feeding it the base-16 digits of every element's own index reveals the permutation
    without depending on the kernel's (undocumented, CPU-specific) layout.
    """
    key = (getattr(convert, "layout_key", id(convert)), rows, cols, str(device))
    if _LAYOUT_CACHE is not None and key in _LAYOUT_CACHE:
        return _LAYOUT_CACHE[key]
    n = rows * cols
    position = torch.arange(n, dtype=torch.int64, device=device)
    digits = max(1, -(-max(n - 1, 1).bit_length() // 4))
    where = torch.zeros(2 * _packed_bytes(convert, rows, cols, device), dtype=torch.int64, device=device)
    for d in range(digits):
        plane = ((position >> (4 * d)) & 15).to(torch.uint8).reshape(rows, cols)
        nibbles = unpack_nibbles(convert(plane))
        where |= nibbles.to(torch.int64) << (4 * d)
    # ``where[slot]`` is the element index stored at each nibble slot; invert it to element -> slot.
    out = torch.empty(n, dtype=torch.int64, device=device)
    out[where] = torch.arange(where.numel(), dtype=torch.int64, device=device)
    if _LAYOUT_CACHE is not None:
        _LAYOUT_CACHE[key] = out
    return out


def _packed_bytes(convert, rows: int, cols: int, device) -> int:
    probe = convert(torch.zeros(rows, cols, dtype=torch.uint8, device=device))
    return probe.numel() * probe.element_size()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All 4-bit fields of a packed kernel tensor (any integer dtype), low nibble first, as uint8."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(-1)


def invert_nibble_layout(convert, packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Codes ``uint8 [rows, cols]`` that ``convert`` turned into ``packed`` (checked by converting them back)."""
    index = nibble_layout_index(convert, rows, cols, packed.device)
    codes = unpack_nibbles(packed)[index].reshape(rows, cols)
    again = convert(codes)
    if not torch.equal(again.view(torch.uint8), packed.view(torch.uint8)):
        raise RuntimeError(
            "Could not invert the int4 kernel layout exactly (the converter is not a fixed permutation in this torch "
            "build); use hfcompress.set_inference_path(model, 'auto', release=False) so stored codes are kept."
        )
    return codes
