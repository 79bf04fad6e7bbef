"""Random access to the tensors of a (sharded) safetensors checkpoint, one tensor at a time.

:class:`CheckpointReader` reads only the headers up front (validated by
:func:`hfcompress.checkpoint.read_header`), then each tensor with a positioned read into its own buffer.
Unlike a memory map of a whole shard, this keeps the process's resident memory and address space at
the tensors actually held, however large the shards are; the operating system's page cache still
serves repeated reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME, data_start, read_index, read_tensor_index, read_header, shard_names

__all__ = ["CheckpointReader", "INDEX_NAME", "SINGLE_NAME"]


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
        self.files = shard_names(self.path)  # validated names (an index pointing outside the folder is refused)
        self.entries: dict[str, _Entry] = {}
        paths = [str(self.path / name) for name in self.files]
        read_tensor_index(paths, read_index(self.path))  # the index and the shards agree, no name stored twice
        for file in paths:
            header = read_header(file)
            start = data_start(file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.entries[key] = _Entry(file, start + begin, end - begin, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))

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
