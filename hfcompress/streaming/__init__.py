"""Compressing checkpoints larger than memory, block by block, resumably (see :mod:`.run`)."""

from .reader import CheckpointReader
from .run import compress_checkpoint, parse_size
from .writer import ShardWriter, partial_dir

__all__ = ["CheckpointReader", "ShardWriter", "compress_checkpoint", "parse_size", "partial_dir"]
