"""``lossless``: entropy-coded tensors in a checkpoint (the storage side of ``HfCompressConfig(lossless=True)``).

The lossless stage is a storage transform: it applies to the tensors a model saves, whatever they are
(dense ``bfloat16`` weights and embeddings, the ``weight_packed`` codes and ``weight_scale`` of quantized
layers, masks), and loading restores exactly those tensors, so every module type, weight tying and the
compressed modules work unchanged.

In the safetensors files a coded tensor ``<name>`` is stored as ``<name>_lossless``: a 1-D ``uint8`` payload
(header with dtype, shape, chunk table and CRC-32 checksums, then the coded chunks; the byte layout is in
:mod:`hfcompress.lossless.codec`). A tensor stays as it is when its dtype is not supported (int32/int64
such as ``weight_shape``), when it is smaller than :data:`MIN_BYTES`, or when coding would not make it
smaller. Tied weights are stored once, as usual, and tie again on load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..checkpoint import TensorIndex, data_start, read_header, shard_paths
from ..lossless import codec, planes

#: suffix of the stored name of a coded tensor (a reserved ending: no model tensor may end with it)
LOSSLESS_SUFFIX = "_lossless"
#: tensors smaller than this many bytes are stored as they are (a payload header costs ~40 bytes)
MIN_BYTES = 4096


def lossless_key(name: str) -> str:
    """Stored name of the coded form of tensor ``name``."""
    return name + LOSSLESS_SUFFIX


def original_key(stored: str) -> str | None:
    """The tensor name a stored name decodes to, or ``None`` if ``stored`` is not a coded tensor."""
    return stored[: -len(LOSSLESS_SUFFIX)] if stored.endswith(LOSSLESS_SUFFIX) else None


def should_encode(tensor: torch.Tensor) -> bool:
    """Whether the lossless stage codes this tensor (supported dtype, big enough, materialised)."""
    return (
        isinstance(tensor, torch.Tensor)
        and not tensor.is_meta
        and planes.supported(tensor.dtype)
        and tensor.numel() * tensor.element_size() >= MIN_BYTES
    )


def encode_one(name: str, tensor: torch.Tensor, chunk_elems: int = codec.DEFAULT_CHUNK_ELEMS, threads: int | None = None):
    """``(stored name, stored tensor)`` for one tensor: its payload when coding pays off, else itself."""
    if original_key(name) is not None:
        raise ValueError(f"Tensor {name!r} ends with the reserved suffix {LOSSLESS_SUFFIX!r}; rename it before coding.")
    if not should_encode(tensor):
        return name, tensor
    payload = codec.encode_tensor(tensor, chunk_elems=chunk_elems, threads=threads)
    if payload.numel() >= tensor.numel() * tensor.element_size():
        return name, tensor
    return lossless_key(name), payload


def encode_state_dict(
    state_dict: dict[str, torch.Tensor],
    chunk_elems: int = codec.DEFAULT_CHUNK_ELEMS,
    threads: int | None = None,
    precoded: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A new state dict where every tensor worth coding is replaced by its ``<name>_lossless`` payload.

    Tensors are coded in parallel threads (one tensor per task); insertion order is kept. ``precoded`` maps
    names to payloads that are already known (tensors loaded with deferred decoding): they are stored as given.
    """
    threads = codec.default_threads() if threads is None else threads
    items = list(state_dict.items())
    precoded = precoded or {}

    def one(item):
        if item[0] in precoded:
            return lossless_key(item[0]), precoded[item[0]]
        return encode_one(item[0], item[1], chunk_elems=chunk_elems, threads=1)

    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            coded = list(pool.map(one, items))
    else:
        coded = [one(item) for item in items]
    return dict(coded)


def decode_state_dict(state_dict: dict[str, torch.Tensor], threads: int | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state_dict` (plain tensors pass through)."""
    out = {}
    for name, tensor in state_dict.items():
        orig = original_key(name)
        if orig is None:
            out[name] = tensor
        else:
            out[orig] = codec.decode_tensor(tensor, threads=threads, where=name)
    return out


# ------------------------------------------------------------------------------------------- checkpoint files
def peek_payload(path: str | os.PathLike, name: str, info: dict, start: int | None = None) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the tensor a stored payload decodes to, reading only its first bytes."""
    path = os.fspath(path)
    if info.get("dtype") != "U8" or len(info.get("shape", ())) != 1:
        raise ValueError(
            f"Tensor {name!r} in {path} ends with {LOSSLESS_SUFFIX!r} but is {info.get('dtype')} of shape "
            f"{info.get('shape')}, not a 1-D uint8 lossless payload; the file was not written by hfcompress."
        )
    start = (data_start(path) if start is None else start) + info["data_offsets"][0]
    size = info["data_offsets"][1] - info["data_offsets"][0]
    with open(path, "rb") as f:
        f.seek(start)
        first = f.read(min(size, 8))
        need = codec.header_prefix_size(first, where=f"{name} in {path}") if len(first) >= 8 else 8
        f.seek(start)
        prefix = f.read(min(size, need))
    dtype, shape = codec.peek_dtype_shape(prefix, where=f"{name} in {path}")
    return shape, dtype


def resolve_index(index: TensorIndex, files: Iterable[str] | None, lossless: bool = True) -> TensorIndex:
    """Replace the entries of coded tensors in ``index`` by the shape and dtype they decode to.

    With ``lossless=False`` (the config does not declare the stage) coded tensors are an error: loading
    would skip them and leave freshly initialised weights in their place.
    """
    coded = [k for k in index.tensors if original_key(k) is not None]
    if coded and not lossless:
        raise ValueError(
            f"The checkpoint stores lossless payloads (e.g. {coded[0]!r}) but its quantization_config has "
            "lossless=False; set \"lossless\": true in config.json (it was written by hfcompress with lossless=True)."
        )
    if not coded:
        return index
    for path in files or []:
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            continue
        header = None
        start = None
        for stored in list(index.tensors):
            orig = original_key(stored)
            if orig is None:
                continue
            if header is None:
                header = read_header(path)
                start = data_start(path)
            if stored not in header:
                continue
            index.tensors[orig] = peek_payload(path, stored, header[stored], start)
            del index.tensors[stored]
    return index


def lossless_files_summary(folder: str | os.PathLike) -> dict:
    """Counts and bytes of coded and plain tensors in a checkpoint folder (for reports and tests)."""
    coded = plain = coded_bytes = plain_bytes = decoded_bytes = 0
    for path in shard_paths(folder):
        path = os.fspath(path)
        header = read_header(path)
        start = data_start(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            if original_key(name) is not None:
                shape, dtype = peek_payload(path, name, info, start)
                coded += 1
                coded_bytes += size
                n = 1
                for s in shape:
                    n *= s
                decoded_bytes += n * dtype.itemsize
            else:
                plain += 1
                plain_bytes += size
    return {
        "coded_tensors": coded,
        "plain_tensors": plain,
        "coded_bytes": coded_bytes,
        "decoded_bytes": decoded_bytes,
        "plain_bytes": plain_bytes,
    }


__all__ = [
    "LOSSLESS_SUFFIX",
    "MIN_BYTES",
    "decode_state_dict",
    "encode_one",
    "encode_state_dict",
    "lossless_files_summary",
    "lossless_key",
    "original_key",
    "peek_payload",
    "resolve_index",
    "should_encode",
]
