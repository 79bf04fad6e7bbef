"""Random access to the tensors of a (sharded) safetensors checkpoint, one tensor at a time.

:class:`CheckpointReader` reads only the headers up front (validated by
:func:`hfcompress.checkpoint.read_header`), then each tensor with a positioned read into its own buffer.
Unlike a memory map of a whole shard, this keeps the process's resident memory and address space at
the tensors actually held, however large the shards are; the operating system's page cache still
serves repeated reads.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import SAFETENSORS_DTYPES, read_header

__all__ = ["CheckpointReader", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class _Entry:
    path: str
    offset: int  # absolute file offset of the data
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class CheckpointReader:
    """Tensors of the checkpoint folder ``path`` by name (see module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if (self.path / INDEX_NAME).is_file():
            weight_map = json.loads((self.path / INDEX_NAME).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            other = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {other[:2]}: re-save it with save_pretrained(), which writes safetensors)" if other else ""
            raise FileNotFoundError(f"{self.path} holds no safetensors checkpoint ({SINGLE_NAME} or {INDEX_NAME}){hint}.")
        self.files = files
        self.entries: dict[str, _Entry] = {}
        for name in files:
            file = str(self.path / name)
            header = read_header(file)
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"Tensor {key!r} in {file} has unsupported dtype {info['dtype']!r}.")
                begin, end = info["data_offsets"]
                self.entries[key] = _Entry(file, 8 + n + begin, end - begin, dtype, tuple(info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str) -> int:
        return self.entries[name].nbytes

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, in a buffer of its own."""
        try:
            entry = self.entries[name]
        except KeyError:
            raise KeyError(f"Tensor {name!r} is not in the checkpoint {self.path}.") from None
        buf = bytearray(entry.nbytes)
        with open(entry.path, "rb") as f:
            f.seek(entry.offset)
            if f.readinto(buf) != entry.nbytes:
                raise ValueError(f"Checkpoint file {entry.path} is truncated inside tensor {name!r}. Re-save it.")
        if not buf:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)
