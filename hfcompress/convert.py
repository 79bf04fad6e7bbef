"""Streaming conversion of an existing Hugging Face checkpoint into its lossless twin.

:func:`convert_checkpoint` reads a safetensors checkpoint folder one tensor at a time (memory-mapped),
entropy-codes each tensor worth it, and writes the same shards with ``<name>_lossless`` payloads, without
building the model in transformers, so memory stays near the size of the largest tensor whatever the
size of the checkpoint. ``config.json`` gets ``quantization_config = HfCompressConfig(lossless=True)``
(or ``lossless=True`` added to an existing hfcompress config); every other file (tokenizer, generation
config, sentence-transformers folders, ...) is copied. The result reloads with plain
``AutoModel*.from_pretrained(dst)`` after ``import hfcompress`` and holds bit-identical weights.

The output folder is written under a temporary name next to ``dst`` and renamed into place at the end,
so an interrupted or failed conversion never leaves a folder that looks finished.

Command line: ``hfcompress convert SRC -o DST [--dtype bfloat16] [--overwrite]`` (:mod:`hfcompress.cli.convert`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from .checkpoint import DTYPE_NAMES, INDEX_NAME, SAFETENSORS_DTYPES, data_start, read_header, read_index, read_tensor_index, shard_names
from .integrity import CHECKSUMS_KEY, IntegrityError, checksum_metadata, tensor_record
from .outputs import OutputFolder, copy_contained
from .config import QUANT_METHOD, HfCompressConfig
from .formats import lossless as fmt
from .lossless import codec
from .storage.loader import METADATA_KEY

_CAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _shards(src: Path) -> list[str]:
    """The source's shard names, validated (plain names inside ``src``, index and shards in agreement)."""
    names = shard_names(src)
    read_tensor_index([str(src / n) for n in names], read_index(src))
    return names


def _lossless_config(config: dict, dtype: str | None) -> dict:
    config = dict(config)
    qc = config.get("quantization_config")
    if qc is None:
        config["quantization_config"] = HfCompressConfig(lossless=True).to_dict()
    elif qc.get("quant_method") == QUANT_METHOD:
        if qc.get("lossless"):
            raise ValueError("The checkpoint is already lossless (quantization_config.lossless=True); nothing to convert.")
        if dtype is not None:
            raise ValueError(
                f"dtype={dtype!r} casts dense checkpoints only; this one is compressed by hfcompress (its scales must "
                "keep their dtype). Leave dtype out."
            )
        new = HfCompressConfig.from_dict({**qc, "lossless": True})
        config["quantization_config"] = new.to_dict()
    else:
        raise ValueError(
            f"The checkpoint is quantized with quant_method={qc.get('quant_method')!r}; hfcompress can only add its "
            "lossless stage to dense checkpoints or to its own. Convert the original dense checkpoint instead."
        )
    if dtype is not None:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    return config


def _write_safetensors(dst: Path, entries: list[tuple[str, str, list[int], int]], data_path: Path, metadata: dict) -> None:
    """Write header + the data already streamed to ``data_path`` (entries: name, dtype, shape, nbytes, in order)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(dst, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        shutil.copyfileobj(data, out, 1 << 24)
        out.flush()
        os.fsync(out.fileno())


def _read_tensors(path: Path):
    """Yield ``(name, tensor)`` of a safetensors file one at a time, each read into its own buffer.

    Plain reads instead of a memory map keep the process's resident memory at one tensor, however large
    the shard (mapped pages of a big file would all count as resident once touched).
    """
    header = read_header(path)  # validated: a truncated or corrupt file fails here, before any work
    start = data_start(path)
    with open(path, "rb") as f:
        items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in items:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"Checkpoint file {path} is truncated inside tensor {name!r}. Re-save or re-download it.")
            tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])


def _convert_shard(
    src: Path, dst: Path, work: Path, cast: torch.dtype | None, chunk_elems: int, threads: int | None,
    stamp: HfCompressConfig, source_records: dict[str, list] | None,
) -> dict[str, str]:
    """Code one shard tensor by tensor; returns the stored names (for the index).

    A source written by hfcompress is verified tensor by tensor against its recorded checksums as it is read, so
    damage is never carried into the twin; the twin's shards record the checksums of what they store.
    """
    entries = []
    records: dict[str, list] = {}
    data_path = work / (dst.name + ".data")
    metadata = {k: v for k, v in (read_header(src).get("__metadata__") or {}).items() if not k.startswith("hfcompress_")}
    with open(data_path, "wb") as data:
        for name, tensor in _read_tensors(src):
            if source_records is not None:
                want = source_records.get(name)
                if want is None or tensor_record(tensor) != want:
                    raise IntegrityError(
                        f"{src}: tensor {name!r} does not match the checksum recorded when it was written; the source "
                        "is damaged or was modified. Restore it before converting."
                    )
            if cast is not None and tensor.is_floating_point() and tensor.dtype != cast:
                tensor = tensor.to(cast)
            stored, value = fmt.encode_one(name, tensor, chunk_elems=chunk_elems, threads=threads)
            value = value.contiguous()
            nbytes = value.numel() * value.element_size()
            if nbytes:
                data.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            entries.append((stored, DTYPE_NAMES[value.dtype], list(value.shape), nbytes))
            records[stored] = tensor_record(value)
            del tensor, value
    metadata.setdefault("format", "pt")
    metadata[METADATA_KEY] = "1"
    metadata.update(checksum_metadata(records, stamp))
    _write_safetensors(dst, entries, data_path, metadata)
    data_path.unlink()
    return {stored: dst.name for stored, *_ in entries}


def _source_records(src: Path, shards: list[str]) -> dict[str, list] | None:
    """The checksum records of a source written by hfcompress (``None`` for a plain Hugging Face checkpoint)."""
    merged: dict[str, list] = {}
    found = False
    for shard in shards:
        raw = (read_header(src / shard).get("__metadata__") or {}).get(CHECKSUMS_KEY)
        if raw is not None:
            found = True
            merged.update(json.loads(raw))
    return merged if found else None


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = None,
    chunk_elems: int = codec.DEFAULT_CHUNK_ELEMS,
    threads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the lossless twin of the checkpoint folder ``src`` to ``dst`` and return ``dst``.

    Args:
        src: a Hugging Face model folder with ``config.json`` and safetensors weights (sharded or not), dense
            or compressed by hfcompress.
        dst: the folder to create (must not exist unless ``overwrite``).
        dtype: ``"bfloat16"`` or ``"float16"`` casts floating tensors first (e.g. a float32 checkpoint to the
            bf16 most models are served in; the cast itself is not lossless). ``None`` keeps every bit.
        chunk_elems: elements per independently decodable chunk.
        threads: coding threads per tensor (default: the CPUs this process may use).
        overwrite: replace an existing ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"src={str(src)!r} is not a Hugging Face model folder (no config.json).")
    if dtype is not None and dtype not in _CAST_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_CAST_DTYPES)} or None (keep every bit).")
    output = OutputFolder(dst, sources=[src], overwrite=overwrite, kind="checkpoint", what="dst")
    shards = _shards(src)
    config = _lossless_config(json.loads((src / "config.json").read_text()), dtype)
    stamp = HfCompressConfig.from_dict(config["quantization_config"])
    source_records = _source_records(src, shards)
    if source_records is None and (json.loads((src / "config.json").read_text()).get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        raise IntegrityError(f"{src} is an hfcompress checkpoint without checksums; re-save it with this version of hfcompress first.")
    with output as tmp:
        work = tmp / ".work"
        work.mkdir()
        weight_map: dict[str, str] = {}
        for shard in shards:
            weight_map.update(
                _convert_shard(src / shard, tmp / shard, work, _CAST_DTYPES.get(dtype), chunk_elems, threads, stamp, source_records)
            )
        work.rmdir()
        if (src / INDEX_NAME).exists():
            index = json.loads((src / INDEX_NAME).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = sum(os.path.getsize(tmp / s) for s in shards)
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_contained(src, tmp, skip=set(shards) | {INDEX_NAME, "config.json"})
    return dst
