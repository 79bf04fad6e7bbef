"""Writing a checkpoint unit by unit into a work folder that survives interruptions.

The work folder ``.<out name>.partial`` sits next to the output folder. :class:`ShardWriter` writes the
tensors of each finished unit (the non-block weights, then one block after another) as one safetensors
part file (temp file + rename), then records the progress in ``progress.json`` (also temp file +
rename), so a part is either fully on disk and listed, or ignored. Memory holds one unit's tensors. A restarted run with the same settings reads ``progress.json`` and
continues after the last recorded unit; settings that differ (checkpoint, config, data) refuse to resume.

:meth:`ShardWriter.finalize` renames the shards as ``save_pretrained`` names them
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or a single
``model.safetensors``), writes ``config.json`` last, copies the source's other files (tokenizer,
generation config), removes the progress files and renames the work folder to the output folder.
Only a finished run therefore ever produces a folder under the output name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import data_start, read_header
from ..integrity import CHECKSUMS_KEY, checksum_metadata, tensor_record
from ..outputs import MARKER, OutputPathError, copy_contained, is_our_folder, move_into_place, write_file_atomic, write_marker
from .reader import INDEX_NAME, SINGLE_NAME

__all__ = ["ShardWriter", "PROGRESS_NAME", "partial_dir"]

PROGRESS_NAME = "progress.json"
_FORMAT_VERSION = 1


def partial_dir(out: Path) -> Path:
    """The work folder of an unfinished run writing ``out``."""
    return out.parent / f".{out.name}.partial"


def _write_json_atomic(path: Path, data: Any) -> None:
    write_file_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _merge_safetensors(parts: list[Path], dst: Path, metadata: dict[str, str]) -> None:
    """Concatenate safetensors files into ``dst`` by copying their data regions (no tensor is loaded); the
    checksum records of the parts are merged into the shard's metadata."""
    records: dict[str, list] = {}
    tensors: dict[str, Any] = {}
    regions = []
    offset = 0
    for part in parts:
        part_header = read_header(part)  # validated: a damaged part fails here
        records.update(json.loads((part_header.pop("__metadata__", None) or {}).get(CHECKSUMS_KEY, "{}")))
        end = 0
        for name, info in part_header.items():
            begin, stop = info["data_offsets"]
            tensors[name] = {**info, "data_offsets": [offset + begin, offset + stop]}
            end = max(end, stop)
        regions.append((part, data_start(part), end))
        offset += end
    metadata = {**metadata, CHECKSUMS_KEY: json.dumps(records, sort_keys=True, separators=(",", ":"))}
    header: dict[str, Any] = {"__metadata__": metadata, **tensors}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for part, start, length in regions:
            with open(part, "rb") as f:
                f.seek(start)
                remaining = length
                while remaining:
                    chunk = f.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise ValueError(f"{part} is truncated; delete {dst.parent} and run again.")
                    out.write(chunk)
                    remaining -= len(chunk)
    os.replace(tmp, dst)
    for part in parts:
        part.unlink()


class ShardWriter:
    """Buffered, resumable shard writing (see module docstring); only rank 0 should write."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], shard_size: int, resume: bool, metadata: dict[str, str]) -> None:
        self.out = Path(out)
        self.work = partial_dir(self.out)
        self.shard_size = int(shard_size)
        self.metadata = dict(metadata)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised as it is stored
        self.units_done = 0
        self.shards: dict[str, list[str]] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        progress = self.work / PROGRESS_NAME
        if os.path.lexists(self.work) and not is_our_folder(self.work):
            raise OutputPathError(
                f"{self.work} exists and was not written by hfcompress (no {MARKER}); it is where this run keeps its "
                "work. Move it away or choose another output name."
            )
        if self.work.exists() and resume and progress.is_file():
            state = json.loads(progress.read_text())
            if state.get("version") != _FORMAT_VERSION or state.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{self.work} holds an unfinished run with different settings (checkpoint, config, data or "
                    "number of processes); pass resume=False to start over, or rerun with the same settings."
                )
            self.units_done = int(state["units_done"])
            self.shards = {k: list(v) for k, v in state["shards"].items()}
            for name in list(os.listdir(self.work)):  # leftovers of an interrupted write
                if name.endswith(".tmp") or (name.startswith("part-") and name not in self.shards):
                    (self.work / name).unlink()
        else:
            if self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
            write_marker(self.work, "partial")
            self._save_progress()

    # ------------------------------------------------------------------ progress
    def _save_progress(self) -> None:
        state = {"version": _FORMAT_VERSION, "fingerprint": self.fingerprint, "units_done": self.units_done, "shards": self.shards}
        _write_json_atomic(self.work / PROGRESS_NAME, state)

    @property
    def buffered_units(self) -> bool:
        return bool(self._buffer)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer the tensors of one finished unit (copies detached from the model)."""
        for name, t in tensors.items():
            if name in self._buffer or any(name in names for names in self.shards.values()):
                raise RuntimeError(f"Tensor {name!r} is written twice; the model has overlapping units.")
            t = t.detach().contiguous()
            self._buffer[name] = t
            self._buffer_bytes += t.numel() * t.element_size()

    def should_flush(self) -> bool:
        """Always: every unit is written at once (memory holds one unit), shards are grouped at the end."""
        return True

    def flush(self, units_done: int) -> str | None:
        """Write the buffer as one shard and record ``units_done`` units as finished."""
        name = None
        if self._buffer:
            name = f"part-{len(self.shards):05d}.safetensors"
            tmp = self.work / (name + ".tmp")
            records = {k: tensor_record(v) for k, v in self._buffer.items()}
            save_file(self._buffer, str(tmp), metadata={**self.metadata, **checksum_metadata(records)})
            os.replace(tmp, self.work / name)
            self.shards[name] = sorted(self._buffer)
            self._buffer = {}
            self._buffer_bytes = 0
        self.units_done = units_done
        self._save_progress()
        return name

    # ------------------------------------------------------------------ the end
    def finalize(self, config_json: dict[str, Any], src: Path, overwrite: bool) -> Path:
        """Group the parts into shards of up to ``shard_size`` bytes (data copied, not loaded), name them as
        ``save_pretrained`` does, write index and config, rename into ``out``."""
        if self._buffer:
            raise RuntimeError("finalize() called with unwritten tensors; call flush() first.")
        parts = sorted(self.shards)
        groups: list[list[str]] = []
        size = 0
        for part in parts:  # consecutive units grouped into shards of up to shard_size bytes
            nbytes = os.path.getsize(self.work / part)
            if not groups or size + nbytes > self.shard_size:
                groups.append([])
                size = 0
            groups[-1].append(part)
            size += nbytes
        merged = []
        for i, group in enumerate(groups):
            name = f"shard-{i:05d}.safetensors"
            _merge_safetensors([self.work / p for p in group], self.work / name, self.metadata)
            merged.append((name, [t for p in group for t in self.shards[p]]))
        total = sum(os.path.getsize(self.work / name) for name, _ in merged)
        if len(merged) == 1:
            os.replace(self.work / merged[0][0], self.work / SINGLE_NAME)
        else:
            weight_map: dict[str, str] = {}
            for i, (name, tensors) in enumerate(merged, start=1):
                final = f"model-{i:05d}-of-{len(merged):05d}.safetensors"
                os.replace(self.work / name, self.work / final)
                weight_map.update({t: final for t in tensors})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.work / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        # tokenizer, generation config, ...: copied as they are (links leaving the source are not followed)
        copy_contained(Path(src), self.work, skip={INDEX_NAME, SINGLE_NAME, "config.json"}, skip_suffixes=(".safetensors", ".bin"))
        for name in os.listdir(self.work):
            if name == PROGRESS_NAME or name.startswith("hidden-"):
                (self.work / name).unlink()
        (self.work / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        write_marker(self.work, "checkpoint")
        move_into_place(self.work, self.out, overwrite=overwrite, what="out")
        return self.out
