"""The entropy coder of a byte plane: Huffman-only DEFLATE (RFC 1951), or the bytes stored raw.

Encoding uses the standard library's zlib with ``Z_HUFFMAN_ONLY`` (no LZ matches: on weight exponents the
matches of general-purpose compressors cost more than they save). Decoding uses ISA-L (the ``isal``
package), whose inflate decodes several short Huffman codes per table lookup and releases the GIL, and
falls back to the standard library's zlib when ``isal`` is not installed; both read the same streams.
A plane is stored raw when coding would not save at least :data:`MIN_SAVING` of its bytes (the
mantissa planes of float weights), which also keeps decoding of such planes at memcpy speed.
"""

from __future__ import annotations

import zlib

import numpy as np

try:  # fast path; the format does not depend on it
    from isal import igzip_lib as _igzip
    from isal import isal_zlib as _isal_zlib

    _INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, _igzip.IsalError, _isal_zlib.error)
except ImportError:  # pragma: no cover - exercised only where isal has no wheel
    _igzip = None
    _isal_zlib = None
    _INFLATE_ERRORS = (zlib.error,)

METHOD_RAW = 0
METHOD_DEFLATE = 1
#: DEFLATE's largest expansion: one stored byte decodes to at most ~1032 bytes (RFC 1951 length codes), so a
#: header that declares more output than ``MAX_INFLATE_RATIO * stored bytes`` is refused before decoding
MAX_INFLATE_RATIO = 1032
#: a plane is entropy-coded only if that saves at least this fraction of its bytes
MIN_SAVING = 0.03

#: the backend decoding DEFLATE streams in this process
DECODER = "isal" if _igzip is not None else "zlib"


class PlaneDecodeError(ValueError):
    """A coded plane is damaged (bad DEFLATE stream or wrong decoded length)."""


def order0_entropy_bits(plane: np.ndarray) -> float:
    """Order-0 (memoryless) entropy of ``plane``'s bytes, in bits per byte."""
    if plane.size == 0:
        return 0.0
    counts = np.bincount(plane.reshape(-1), minlength=256)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum())


def encode_plane(plane: np.ndarray) -> tuple[int, bytes]:
    """``(method, stored bytes)`` for one plane of uint8 symbols."""
    data = memoryview(np.ascontiguousarray(plane, dtype=np.uint8)).cast("B")
    n = len(data)
    # Cheap estimate first: skip the coder when even the order-0 entropy leaves too little to gain.
    if n == 0 or order0_entropy_bits(np.frombuffer(data, np.uint8)) > 8 * (1 - MIN_SAVING):
        return METHOD_RAW, bytes(data)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    coded = comp.compress(data) + comp.flush()
    if len(coded) > (1 - MIN_SAVING) * n:
        return METHOD_RAW, bytes(data)
    return METHOD_DEFLATE, coded


def decode_plane(method: int, stored: memoryview, n: int) -> np.ndarray:
    """The ``n`` uint8 symbols of a plane; raises :class:`PlaneDecodeError` on damage."""
    if method == METHOD_RAW:
        if len(stored) != n:
            raise PlaneDecodeError(f"raw plane holds {len(stored)} bytes, expected {n}")
        return np.frombuffer(stored, dtype=np.uint8)
    if method != METHOD_DEFLATE:
        raise PlaneDecodeError(f"unknown plane coding method {method}")
    # Never more than n + 1 bytes of output: a stream that would inflate further is refused without being
    # inflated (no memory bomb), and one that ends early or goes on past its declared end is refused too.
    try:
        if _igzip is not None:
            d = _igzip.IgzipDecompressor(flag=_igzip.DECOMP_DEFLATE, hist_bits=15)
            raw = d.decompress(stored, max_length=n + 1)
            ended, rest = d.eof, len(d.unused_data)
        else:
            d = zlib.decompressobj(-15)
            raw = d.decompress(stored, n + 1)
            ended, rest = d.eof, len(d.unconsumed_tail) + len(d.unused_data)
    except _INFLATE_ERRORS as exc:
        raise PlaneDecodeError(f"DEFLATE stream is corrupt ({exc})") from None
    if len(raw) > n:
        raise PlaneDecodeError(f"DEFLATE stream decodes to more than the {n} bytes the header declares")
    if len(raw) != n:
        raise PlaneDecodeError(f"DEFLATE stream decodes to {len(raw)} bytes, expected {n}")
    if not ended or rest:
        raise PlaneDecodeError("DEFLATE stream does not end where the header says")
    return np.frombuffer(raw, dtype=np.uint8)


def crc32(data, value: int = 0) -> int:
    """CRC-32 (the zlib polynomial) of a buffer, continuing from ``value``; ISA-L's vectorised version when available."""
    if _isal_zlib is not None:
        return _isal_zlib.crc32(data, value) & 0xFFFFFFFF
    return zlib.crc32(data, value) & 0xFFFFFFFF
