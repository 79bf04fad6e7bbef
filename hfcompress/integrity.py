"""Checksums and the config stamp that every hfcompress checkpoint carries, and their verification.

Every safetensors file hfcompress writes (``save_pretrained`` of a compressed model, ``convert_checkpoint``,
``compress_checkpoint``) holds two entries in its ``__metadata__``:

* ``hfcompress_checksums``: JSON ``{tensor name: [dtype, shape, crc32]}`` for every tensor of the checkpoint
  (all shards share one map): the CRC-32 of the tensor's bytes as stored, with the dtype and shape it was
  written with. A flipped byte, swapped tensor data, or a header edit (``BF16`` relabelled ``F16``, a shape
  changed) no longer matches its record.
* ``hfcompress_config``: the ``quantization_config`` the tensors were written for (the settings that
  decide how they decode; loading attributes such as ``lossless_decode`` excluded). A ``config.json`` edited
  afterwards (``symmetric`` flipped, ``targets`` narrowed, ``ignore`` widened) no longer matches it.

:func:`verify_files` checks both; ``from_pretrained`` runs it before any weight is loaded (opt out with
``HfCompressConfig.loading(verify_checksums=False)``), and so do ``hfcompress inspect`` and ``push``. It reads
each file once (CRC-32 through ISA-L runs at several GB/s; the page cache then serves the load).

CRC-32 detects damage and careless edits, not a deliberate forger who rewrites the records too; for that,
compare the files against a digest kept elsewhere (the Hub's LFS SHA-256).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterable, Mapping

import torch

from .checkpoint import DTYPE_NAMES, CheckpointError, data_start, read_header
from .lossless.coder import crc32

CHECKSUMS_KEY = "hfcompress_checksums"
CONFIG_KEY = "hfcompress_config"

__all__ = [
    "CHECKSUMS_KEY",
    "CONFIG_KEY",
    "IntegrityError",
    "checksum_metadata",
    "config_stamp",
    "tensor_record",
    "verify_files",
]


class IntegrityError(CheckpointError):
    """A checkpoint's tensors or config do not match what hfcompress recorded when it wrote them."""


def _crc_of_tensor(tensor: torch.Tensor) -> int:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return crc32(b"")
    return crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def tensor_record(tensor: torch.Tensor) -> list:
    """``[dtype, shape, crc32 hex]`` of a tensor as safetensors stores it."""
    return [DTYPE_NAMES[tensor.dtype], list(tensor.shape), f"{_crc_of_tensor(tensor):08x}"]


def config_stamp(config) -> str:
    """The canonical JSON of the settings that decide how a checkpoint's tensors decode."""
    data = config.to_dict()
    for name in type(config)._LOADING_ATTRIBUTES:
        data.pop(name, None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def checksum_metadata(records: Mapping[str, list], config=None) -> dict[str, str]:
    """The ``__metadata__`` entries for ``records`` (name -> :func:`tensor_record`) and the config stamp."""
    out = {CHECKSUMS_KEY: json.dumps(dict(records), sort_keys=True, separators=(",", ":"))}
    if config is not None:
        out[CONFIG_KEY] = config_stamp(config)
    return out


def _records_of(meta: dict, path: str) -> dict[str, list] | None:
    raw = meta.get(CHECKSUMS_KEY)
    if raw is None:
        return None
    try:
        records = json.loads(raw)
    except ValueError:
        records = None
    if not isinstance(records, dict):
        raise IntegrityError(f"{path}: the '{CHECKSUMS_KEY}' metadata is not a JSON object; the file is damaged.")
    return records


def _diff_fields(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: weights written with {saved.get(k)!r}, config.json says {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def verify_files(
    files: Iterable[str | os.PathLike],
    config=None,
    rename: Callable[[str], str] | None = None,
    checksums: bool = True,
) -> int:
    """Check every tensor of ``files`` against its recorded checksum, and ``config`` against the stamp.

    Args:
        files: the safetensors files of one checkpoint.
        config: the ``HfCompressConfig`` the checkpoint is loaded with (from its ``config.json``); ``None``
            skips the config check.
        rename: maps a stored tensor name to the name the model uses (transformers renames legacy keys);
            a record is looked up under the stored name first, then under the renamed one.
        checksums: ``False`` checks the config stamp only (no data is read).

    Returns the number of tensors verified. Raises :class:`IntegrityError` naming the file, the tensor and what
    differs; a checkpoint without records (not written by this version of hfcompress) is refused too, with the
    way to opt out.
    """
    files = [os.fspath(f) for f in files]
    headers = {path: read_header(path) for path in files}
    records: dict[str, list] = {}
    stamps = set()
    for path, header in headers.items():
        meta = header.get("__metadata__") or {}
        found = _records_of(meta, path)
        if found is None and checksums:
            raise IntegrityError(
                f"{path} carries no hfcompress checksums ('{CHECKSUMS_KEY}' metadata): it was not written by this "
                "version of hfcompress, or its metadata was removed. Re-save it with hfcompress, or load it without "
                "verification: from_pretrained(..., quantization_config=HfCompressConfig.loading(verify_checksums=False))."
            )
        records.update(found or {})
        if CONFIG_KEY in meta:
            stamps.add(meta[CONFIG_KEY])
    if config is not None:
        if len(stamps) > 1:
            raise IntegrityError(f"The shards of this checkpoint were written for different configs ({len(stamps)} stamps); it is damaged.")
        if not stamps and checksums:
            raise IntegrityError(f"{files[0]} carries no '{CONFIG_KEY}' metadata; it was not written by this version of hfcompress.")
        if stamps:
            saved = json.loads(next(iter(stamps)))
            current = json.loads(config_stamp(config))
            if saved != current:
                diff = "; ".join(_diff_fields(saved, current)[:4])
                raise IntegrityError(
                    f"config.json's quantization_config does not match the one these weights were written with ({diff}). "
                    "Loading would decode the tensors wrongly; restore config.json (or re-compress the model)."
                )
    if not checksums:
        return 0
    count = 0
    for path, header in headers.items():
        start = data_start(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            try:
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    record = records.get(name)
                    if record is None and rename is not None:
                        record = records.get(rename(name))
                    if record is None:
                        raise IntegrityError(
                            f"{path}: tensor {name!r} has no recorded checksum; it was added after hfcompress wrote the "
                            "checkpoint. Restore the original files."
                        )
                    if not (isinstance(record, list) and len(record) == 3):
                        raise IntegrityError(f"{path}: the checksum record of {name!r} is malformed; the metadata is damaged.")
                    dtype, shape, want = record
                    if dtype != info["dtype"] or list(shape) != list(info["shape"]):
                        raise IntegrityError(
                            f"{path}: tensor {name!r} is stored as {info['dtype']} {info['shape']} but was written as "
                            f"{dtype} {shape}; the file was modified after hfcompress wrote it. Restore the original file."
                        )
                    begin, end = info["data_offsets"]
                    got = crc32(memoryview(mapped)[start + begin : start + end]) if end > begin else crc32(b"")
                    if f"{got:08x}" != want:
                        raise IntegrityError(
                            f"{path}: tensor {name!r} fails its checksum (crc32 {got:08x}, recorded {want}); the file is "
                            "damaged or was modified. Re-download or re-save it."
                        )
                    count += 1
            finally:
                if mapped is not None:
                    mapped.close()
    return count
