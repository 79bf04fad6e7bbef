"""N:M patterns as compact index metadata: one combination rank per group of M weights.

A group of ``m`` consecutive weights that keeps ``n`` of them has ``C(m, n)`` possible patterns. The
pattern is stored as its rank in the *colexicographic* order of combinations: kept positions
``c_1 < ... < c_n`` (0-based) rank as ``sum_i C(c_i, i)``. A rank takes ``ceil(log2 C(m, n))`` bits:
3 bits per group for 2:4 (0.75 bit/weight, against 1 bit for a bitmask or for two 2-bit indices),
7 bits for 4:8. Ranks are bit-packed row by row with the little-endian bit stream of
:mod:`hfcompress.bitpack`, so any row decodes alone. Converting to the 2-bit-index metadata
of sparse tensor cores is a table lookup.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..bitpack import pack_codes, packed_row_bytes, unpack_codes
from .masks import pad_to_groups, validate_nm

__all__ = [
    "nm_groups",
    "nm_index_bits",
    "nm_index_row_bytes",
    "pack_nm_index",
    "pattern_ranks",
    "patterns_from_ranks",
    "unpack_nm_index",
]

_LUT_LIMIT = 1 << 16


def nm_groups(cols: int, m: int) -> int:
    """Groups of ``m`` per row (the last one padded when ``m`` does not divide ``cols``)."""
    return -(-cols // m)


def nm_index_bits(n: int, m: int) -> int:
    """Bits of one group's pattern rank: ``ceil(log2(C(m, n)))``."""
    validate_nm(n, m)
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def nm_index_row_bytes(cols: int, n: int, m: int) -> int:
    return packed_row_bytes(nm_groups(cols, m) * nm_index_bits(n, m), 1)


@lru_cache(maxsize=64)
def _binom_table(m: int, n: int) -> torch.Tensor:
    """``table[c, i] = C(c, i)`` for ``c < m``, ``i <= n`` (int64)."""
    return torch.tensor([[math.comb(c, i) for i in range(n + 1)] for c in range(m)], dtype=torch.int64)


@lru_cache(maxsize=64)
def _pattern_lut(n: int, m: int) -> torch.Tensor | None:
    total = math.comb(m, n)
    if total > _LUT_LIMIT:
        return None
    return _unrank(torch.arange(total, dtype=torch.int64), n, m)


def pattern_ranks(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Ranks ``int64[rows, groups]`` of the N:M keep-mask ``keep[rows, cols]``.

    A group keeping fewer than ``n`` weights (zeros that happened to be pruned, or a short last group) is
    completed with its first free slots, whose stored values are zero; more than ``n`` is an error.
    """
    validate_nm(n, m)
    rows, cols = keep.shape
    g = pad_to_groups(keep.bool(), m, False).reshape(rows, -1, m)
    counts = g.sum(-1)
    if bool((counts > n).any()):
        bad = int(counts[counts > n][0])
        raise ValueError(f"keep-mask is not {n}:{m}: a group of {m} consecutive weights keeps {bad} of them (at most {n}).")
    missing = n - counts
    if bool((missing > 0).any()):
        free = ~g
        g = g | (free & (torch.cumsum(free.long(), dim=-1) <= missing.unsqueeze(-1)))
    table = _binom_table(m, n).to(keep.device)
    pos = torch.arange(m, device=keep.device).expand_as(g)
    ones_before = torch.cumsum(g.long(), dim=-1)  # 1-based index among kept positions
    terms = table[pos, ones_before.clamp(max=n)] * g
    return terms.sum(-1)


def _unrank(ranks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    table = _binom_table(m, n).to(ranks.device)
    r = ranks.clone()
    keep = torch.zeros(*ranks.shape, m, dtype=torch.bool, device=ranks.device)
    for i in range(n, 0, -1):
        c = (table[:, i] <= r.unsqueeze(-1)).sum(-1) - 1  # largest c with C(c, i) <= r
        keep.scatter_(-1, c.unsqueeze(-1), True)
        r = r - table[c, i]
    return keep


def patterns_from_ranks(ranks: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """Keep-mask ``bool[rows, cols]`` of ranks ``[rows, groups]`` (inverse of :func:`pattern_ranks`)."""
    validate_nm(n, m)
    total = math.comb(m, n)
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= total):
        raise ValueError(f"N:M index holds ranks outside [0, {total}) for {n}:{m}; the tensor is corrupt.")
    lut = _pattern_lut(n, m)
    keep = lut.to(ranks.device)[ranks] if lut is not None else _unrank(ranks, n, m)
    return keep.reshape(ranks.shape[0], -1)[:, :cols]


def pack_nm_index(ranks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bit-pack ranks ``[rows, groups]`` into ``uint8[rows, ceil(groups * bits / 8)]``."""
    bits = nm_index_bits(n, m)
    if bits <= 8:
        return pack_codes(ranks.to(torch.uint8), bits)
    shifts = torch.arange(bits, device=ranks.device, dtype=torch.int64)
    stream = ((ranks.unsqueeze(-1) >> shifts) & 1).reshape(ranks.shape[0], -1).to(torch.uint8)
    return pack_codes(stream, 1)


def unpack_nm_index(packed: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """Ranks ``int64[rows, groups]`` from :func:`pack_nm_index`'s bytes."""
    bits = nm_index_bits(n, m)
    groups = nm_groups(cols, m)
    if bits <= 8:
        return unpack_codes(packed, bits, groups).to(torch.int64)
    stream = unpack_codes(packed, 1, groups * bits).to(torch.int64).reshape(packed.shape[0], groups, bits)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (stream << shifts).sum(-1)
