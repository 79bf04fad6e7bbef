"""Tensor <-> lossless payload: chunking, the payload header, checksums and parallel decoding.

A payload is one ``uint8`` tensor (stored in safetensors next to, or instead of, the tensor it encodes).
All integers are little-endian.

==========  =====================  ==========================================================
bytes       field                  content
==========  =====================  ==========================================================
4           magic                  ``b"HFCL"``
1           version                ``1``
1           dtype                  code from :data:`~hfcompress.lossless.planes.DTYPE_CODES`
1           layout                 0 bytes, 1 float (see :mod:`hfcompress.lossless.planes`)
1           ndim                   number of dimensions
8 * ndim    shape                  u64 each
8           chunk_elems            elements per chunk (the last chunk may be shorter)
4           n_chunks               ``ceil(numel / chunk_elems)``
1           n_planes               1 (bytes) or 2 (float)
per chunk   records                per plane: method u8 (0 raw, 1 DEFLATE) and stored size u32;
                                   then the CRC-32 of the chunk's original element bytes (u32)
                                   and the CRC-32 of the chunk's stored bytes, all planes (u32)
4           header CRC-32          of every header byte before it
...         data                   chunk by chunk, plane by plane, the stored bytes
==========  =====================  ==========================================================

Every chunk decodes on its own (so chunks decode in parallel threads, and a reader can decode part of a
tensor). A chunk's stored bytes are checked against their CRC-32 before decoding (any damage to the file
raises, even where the decoder would not notice), and the decoded bytes against the original's CRC-32
after (a decoder fault cannot go unnoticed either): a damaged or truncated payload raises
:class:`LosslessFormatError` and never yields wrong values.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import coder, planes

MAGIC = b"HFCL"
VERSION = 1
#: default elements per chunk: 256 Ki elements (512 KiB of bfloat16), small enough to spread a layer over threads
DEFAULT_CHUNK_ELEMS = 1 << 18
_MAX_CHUNK_ELEMS = 1 << 30
#: bounds on what a header may declare (checked before anything is allocated)
MAX_NDIM = 32
MAX_NUMEL = 1 << 48
_FIXED = struct.Struct("<4sBBBB")


class LosslessFormatError(ValueError):
    """A lossless payload is corrupt, truncated or was written by an incompatible version."""


@dataclass(frozen=True)
class ChunkRecord:
    methods: tuple[int, ...]
    sizes: tuple[int, ...]
    crc: int  # of the decoded element bytes
    stored_crc: int  # of the stored bytes of all planes, in order


@dataclass(frozen=True)
class PayloadInfo:
    """What a payload header says (parsing it reads no data)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: int
    chunk_elems: int
    chunks: tuple[ChunkRecord, ...]
    header_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        return sum(sum(c.sizes) for c in self.chunks)

    @property
    def nbytes(self) -> int:
        """Size of the whole payload."""
        return self.header_bytes + self.data_bytes

    @property
    def raw_nbytes(self) -> int:
        """Size of the tensor it decodes to."""
        return self.numel * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------- threads
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_THREAD_PREFIX = "hfcompress-lossless"


def default_threads() -> int:
    """Decoding threads: ``$HFCOMPRESS_THREADS`` or the CPUs this process may use."""
    env = os.environ.get("HFCOMPRESS_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"HFCOMPRESS_THREADS={env!r} must be a positive integer.") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_THREAD_PREFIX)
        return _POOL


def _run(fn, items: list, threads: int | None) -> list:
    threads = default_threads() if threads is None else threads
    # Inline when asked, when there is nothing to share, or from one of our own workers (no nested waits).
    if threads <= 1 or len(items) <= 1 or threading.current_thread().name.startswith(_THREAD_PREFIX):
        return [fn(i) for i in items]
    return list(_pool(threads).map(fn, items))


# ---------------------------------------------------------------------------------------------- encode
def encode_tensor(tensor: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS, threads: int | None = None) -> torch.Tensor:
    """Encode ``tensor`` into a lossless payload (a 1-D ``uint8`` CPU tensor).

    Args:
        tensor: any shape; dtype bfloat16, float16, float32, uint8, int8, bool or float8.
        chunk_elems: elements per independently decodable chunk.
        threads: encoding threads (default :func:`default_threads`).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}.")
    if not planes.supported(tensor.dtype):
        raise ValueError(
            f"tensor dtype {tensor.dtype} cannot be coded losslessly; supported: "
            f"{[str(d) for d in planes.DTYPE_CODES]}."
        )
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or not 1 <= chunk_elems <= _MAX_CHUNK_ELEMS:
        raise ValueError(f"chunk_elems={chunk_elems!r} must be an integer in [1, {_MAX_CHUNK_ELEMS}].")
    dtype = tensor.dtype
    x = planes.as_uint_array(tensor.detach().cpu())
    n = x.size
    starts = list(range(0, n, chunk_elems))

    def encode_chunk(start: int):
        part = x[start : start + chunk_elems]
        coded = [coder.encode_plane(p) for p in planes.split(part, dtype)]
        return coded, coder.crc32(part), coder.crc32(b"".join(data for _, data in coded))

    results = _run(encode_chunk, starts, threads)
    widths = planes.plane_widths(dtype)
    head = bytearray(_FIXED.pack(MAGIC, VERSION, planes.DTYPE_CODES[dtype], planes.layout_of(dtype), tensor.dim()))
    head += struct.pack(f"<{tensor.dim()}Q", *tensor.shape)
    head += struct.pack("<QIB", chunk_elems, len(starts), len(widths))
    for coded, crc, stored_crc in results:
        for method, data in coded:
            head += struct.pack("<BI", method, len(data))
        head += struct.pack("<II", crc, stored_crc)
    head += struct.pack("<I", coder.crc32(bytes(head)))
    out = bytearray(head)
    for coded, _, _ in results:
        for _, data in coded:
            out += data
    return torch.frombuffer(out, dtype=torch.uint8) if out else torch.empty(0, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- parse
def _as_bytes(payload) -> memoryview:
    if isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise LosslessFormatError(
                f"a lossless payload is a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}."
            )
        payload = payload.detach().cpu().contiguous().numpy()
    if isinstance(payload, np.ndarray):
        return memoryview(payload.reshape(-1).view(np.uint8)).cast("B")
    return memoryview(payload).cast("B")


def header_prefix_size(first: bytes, where: str = "payload") -> int:
    """Bytes needed to read dtype and shape, given at least the first 8 bytes of a payload."""
    _check_fixed(first, where)
    return _FIXED.size + 8 * first[7]


def _check_fixed(buf, where: str) -> None:
    if len(buf) < _FIXED.size:
        raise LosslessFormatError(f"{where}: lossless payload is truncated ({len(buf)} bytes, no header).")
    magic, version, dtype_code, layout, ndim = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise LosslessFormatError(f"{where}: not a lossless payload (field 'magic' is {bytes(magic)!r}, expected {MAGIC!r}).")
    if version != VERSION:
        raise LosslessFormatError(
            f"{where}: lossless payload field 'version' is {version}, not supported by this hfcompress (reads version "
            f"{VERSION}); upgrade hfcompress."
        )
    if dtype_code not in planes.CODE_DTYPES:
        raise LosslessFormatError(f"{where}: lossless payload field 'dtype' has unknown code {dtype_code}.")
    if ndim > MAX_NDIM:
        raise LosslessFormatError(f"{where}: lossless payload field 'ndim' is {ndim}; at most {MAX_NDIM} dimensions are supported.")


def peek_dtype_shape(prefix: bytes, where: str = "payload") -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape from the first :func:`header_prefix_size` bytes of a payload (every field checked)."""
    _check_fixed(prefix, where)
    ndim = prefix[7]
    need = _FIXED.size + 8 * ndim
    if len(prefix) < need:
        raise LosslessFormatError(f"{where}: lossless payload is truncated inside its header (field 'shape').")
    shape = tuple(int(s) for s in struct.unpack_from(f"<{ndim}Q", prefix, _FIXED.size))
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > MAX_NUMEL:
            raise LosslessFormatError(
                f"{where}: lossless payload field 'shape'={list(shape)} declares more than {MAX_NUMEL} elements; the "
                "header is damaged."
            )
    return planes.CODE_DTYPES[prefix[5]], shape


def read_info(payload, where: str = "payload") -> PayloadInfo:
    """Parse and verify (CRC) a payload header; raises :class:`LosslessFormatError` naming the field when damaged.

    Every count is bounded by the payload's own length before anything is allocated: the chunk table must fit
    in the payload, the declared element count must match the chunk count, raw planes must store exactly
    their bytes, and a DEFLATE plane cannot declare more output than :data:`coder.MAX_INFLATE_RATIO` times its
    stored size.
    """
    buf = _as_bytes(payload)
    dtype, shape = peek_dtype_shape(bytes(buf[: _FIXED.size + 8 * 255]), where)
    layout = buf[6]
    if layout != planes.layout_of(dtype):
        raise LosslessFormatError(f"{where}: lossless payload field 'layout' is {layout}, which does not match its dtype {dtype}.")
    pos = _FIXED.size + 8 * len(shape)
    try:
        chunk_elems, n_chunks, n_planes = struct.unpack_from("<QIB", buf, pos)
        pos += 13
        widths = planes.plane_widths(dtype)
        if n_planes != len(widths):
            raise LosslessFormatError(f"{where}: lossless payload field 'n_planes' is {n_planes}; {dtype} needs {len(widths)}.")
        rec = struct.Struct("<" + "BI" * n_planes + "II")
        if len(buf) < pos + n_chunks * rec.size + 4:
            raise LosslessFormatError(
                f"{where}: lossless payload field 'n_chunks'={n_chunks} needs a chunk table longer than the payload "
                f"({len(buf)} bytes); the payload is truncated or its header damaged."
            )
        chunks = []
        for _ in range(n_chunks):
            vals = rec.unpack_from(buf, pos)
            pos += rec.size
            fields = vals[:-2]
            chunks.append(ChunkRecord(tuple(fields[0::2]), tuple(fields[1::2]), vals[-2], vals[-1]))
        (crc,) = struct.unpack_from("<I", buf, pos)
    except struct.error:
        raise LosslessFormatError(f"{where}: lossless payload is truncated inside its header.") from None
    if coder.crc32(buf[:pos]) != crc:
        raise LosslessFormatError(f"{where}: lossless payload header is corrupt (field 'header_crc' does not match).")
    info = PayloadInfo(dtype, shape, layout, chunk_elems, tuple(chunks), pos + 4)
    numel = info.numel
    if not 1 <= chunk_elems <= _MAX_CHUNK_ELEMS:
        raise LosslessFormatError(f"{where}: lossless payload field 'chunk_elems'={chunk_elems} is outside [1, {_MAX_CHUNK_ELEMS}].")
    if n_chunks != (numel + chunk_elems - 1) // chunk_elems:
        raise LosslessFormatError(
            f"{where}: lossless payload field 'n_chunks'={n_chunks} is inconsistent with 'shape' ({numel} elements in "
            f"chunks of {chunk_elems})."
        )
    start = 0
    for i, record in enumerate(chunks):
        count = min(chunk_elems, numel - start)
        start += count
        for plane, (method, size, width) in enumerate(zip(record.methods, record.sizes, widths)):
            need = count * width
            if method == coder.METHOD_RAW and size != need:
                raise LosslessFormatError(
                    f"{where}: chunk {i} plane {plane} is stored raw in {size} bytes but holds {need}; the header is damaged."
                )
            if method == coder.METHOD_DEFLATE and need > coder.MAX_INFLATE_RATIO * size + 64:
                raise LosslessFormatError(
                    f"{where}: chunk {i} plane {plane} declares {need} bytes from a {size}-byte DEFLATE stream, more "
                    "than DEFLATE can expand to; the header is damaged or crafted."
                )
            if method not in (coder.METHOD_RAW, coder.METHOD_DEFLATE):
                raise LosslessFormatError(f"{where}: chunk {i} plane {plane} has unknown coding method {method}.")
    if len(buf) != info.nbytes:
        what = "truncated" if len(buf) < info.nbytes else "longer than its header says"
        raise LosslessFormatError(
            f"{where}: lossless payload is {what} ({len(buf)} bytes, header says {info.nbytes}); the checkpoint file is "
            "damaged. Re-download or re-convert it."
        )
    return info


def verify_payload(payload, where: str = "payload") -> PayloadInfo:
    """Check a payload without decoding it: header CRC, sizes, and every chunk's CRC-32 of its stored bytes.

    Costs one CRC pass over the payload (no inflate, no output); raises :class:`LosslessFormatError` naming
    ``where`` and the chunk when anything is off. Used where decoding is deferred (``lossless_decode="lazy"``),
    so that a damaged file is still refused while loading.
    """
    buf = _as_bytes(payload)
    info = read_info(buf, where)
    pos = info.header_bytes
    for i, rec in enumerate(info.chunks):
        size = sum(rec.sizes)
        if coder.crc32(buf[pos : pos + size]) != rec.stored_crc:
            raise LosslessFormatError(
                f"{where}: chunk {i} of the lossless payload fails its checksum (stored bytes); the checkpoint file "
                "is damaged. Re-download or re-convert it."
            )
        pos += size
    return info


# ---------------------------------------------------------------------------------------------- decode
def decode_tensor(payload, threads: int | None = None, where: str = "payload") -> torch.Tensor:
    """Decode a payload back into the exact tensor it was made from (CPU, contiguous).

    Raises :class:`LosslessFormatError` (naming ``where``) if any header field, stored byte or checksum is off.
    """
    buf = _as_bytes(payload)
    info = read_info(buf, where)
    dtype, n = info.dtype, info.numel
    w = dtype.itemsize
    out = np.empty(n, dtype=planes._UINT[w])
    widths = planes.plane_widths(dtype)
    jobs = []
    pos, start = info.header_bytes, 0
    for i, rec in enumerate(info.chunks):
        count = min(info.chunk_elems, n - start)
        spans = []
        for size in rec.sizes:
            spans.append(buf[pos : pos + size])
            pos += size
        jobs.append((i, start, count, rec, spans))
        start += count

    def decode_chunk(job) -> None:
        i, start, count, rec, spans = job
        stored_crc = 0
        for span in spans:
            stored_crc = coder.crc32(span, stored_crc)
        if stored_crc != rec.stored_crc:
            raise LosslessFormatError(
                f"{where}: chunk {i} of the lossless payload fails its checksum (stored bytes); the checkpoint file "
                "is damaged. Re-download or re-convert it."
            )
        try:
            parts = [coder.decode_plane(m, s, count * pw) for m, s, pw in zip(rec.methods, spans, widths)]
        except coder.PlaneDecodeError as exc:
            raise LosslessFormatError(f"{where}: chunk {i} of the lossless payload is corrupt: {exc}.") from None
        dst = out[start : start + count]
        planes.merge(parts, dtype, dst)
        if coder.crc32(dst) != rec.crc:
            raise LosslessFormatError(
                f"{where}: chunk {i} of the lossless payload fails its checksum (decoded bytes); the data or the "
                "decoder is faulty. Re-download or re-convert it, and report it if it persists."
            )

    _run(decode_chunk, jobs, threads)
    return torch.from_numpy(out.view(_NP_SIGNED[w])).view(dtype).reshape(info.shape)


_NP_SIGNED = {1: np.uint8, 2: np.int16, 4: np.int32}
