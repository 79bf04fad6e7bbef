"""Exact bit-packing of small unsigned integer codes into bytes.

Layout (the on-disk contract, also in the README section "The packed format"): a 2-D tensor of codes ``[rows, cols]`` with
values in ``[0, 2**bits)`` is packed row by row into ``uint8[rows, ceil(cols * bits / 8)]``. Within a
row, code ``j`` occupies bits ``j*bits .. j*bits + bits - 1`` of the row's little-endian bit stream:
bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``. Trailing pad bits of the last byte are
zero. For 4-bit codes this means code ``2i`` is the low nibble and code ``2i+1`` the high nibble of
byte ``i``; for 2-bit codes, code ``4i + t`` sits at bits ``2t..2t+1`` of byte ``i``.

Rows never share bytes, so any row (an output channel, an embedding row) can be unpacked alone.
"""

from __future__ import annotations

import torch

__all__ = ["packed_row_bytes", "pack_codes", "unpack_codes"]

_SUPPORTED_BITS = range(1, 9)


def _check_bits(bits: int) -> None:
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} cannot be bit-packed; use an integer from 1 to 8.")


def packed_row_bytes(cols: int, bits: int) -> int:
    """Number of bytes one packed row of ``cols`` codes of ``bits`` bits occupies."""
    _check_bits(bits)
    return (cols * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (any integer dtype, 2-D, values in ``[0, 2**bits)``) into ``uint8`` rows."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, cols], got shape {tuple(codes.shape)}.")
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}.")
    rows, cols = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(
            f"codes hold values in [{int(codes.min())}, {int(codes.max())}], outside [0, {(1 << bits) - 1}] for bits={bits}."
        )
    nbytes = packed_row_bytes(cols, bits)
    c = codes.to(torch.uint8) if bits <= 8 else codes
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = nbytes * per_byte
        if padded != cols:
            c = torch.nn.functional.pad(c, (0, padded - cols))
        c = c.reshape(rows, nbytes, per_byte).to(torch.int32)
        shifts = torch.arange(0, 8, bits, device=c.device, dtype=torch.int32)
        return (c << shifts).sum(dim=-1).to(torch.uint8)
    # General widths (3, 5, 6, 7): expand to a bit stream and regroup by bytes.
    shifts = torch.arange(bits, device=c.device, dtype=torch.uint8)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)
    pad = nbytes * 8 - cols * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(rows, nbytes, 8).to(torch.int32)
    byte_shifts = torch.arange(8, device=c.device, dtype=torch.int32)
    return (stream << byte_shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8[rows, nbytes]`` to ``uint8[rows, cols]`` codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}.")
    rows, nbytes = packed.shape
    expected = packed_row_bytes(cols, bits)
    if nbytes != expected:
        raise ValueError(
            f"packed rows hold {nbytes} bytes but {cols} codes of {bits} bits need {expected}; "
            "the tensor is truncated or belongs to another shape."
        )
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(rows, nbytes * per_byte)[:, :cols]
    byte_shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(rows, nbytes * 8)[:, : cols * bits]
    stream = stream.reshape(rows, cols, bits).to(torch.int32)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream << shifts).sum(dim=-1).to(torch.uint8)
