"""Reading safetensors checkpoints without loading them: tensor headers, with clear errors on damage."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import torch

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of one ``.safetensors`` file, checked against the file size."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"Checkpoint file {path} is truncated ({size} bytes): no safetensors header. Re-save or re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"Checkpoint file {path} is truncated: its header needs {n} bytes, the file has {size - 8}.")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"Checkpoint file {path} has a corrupt safetensors header ({exc}).") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end > size:
        raise ValueError(
            f"Checkpoint file {path} is truncated: its tensors need {8 + n + data_end} bytes, the file has {size}. "
            "Re-save or re-download it."
        )
    return header


@dataclass
class TensorIndex:
    """Name -> (shape, dtype) over all shards of a checkpoint."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)

    def module_tensors(self, module_name: str, model: torch.nn.Module | None = None) -> dict:
        """Tensors stored under ``module_name.`` (also with the model's base prefix added or removed)."""
        prefixes = [module_name + "."]
        base = getattr(model, "base_model_prefix", "") if model is not None else ""
        if base:
            if module_name.startswith(base + "."):
                prefixes.append(module_name[len(base) + 1 :] + ".")
            else:
                prefixes.append(f"{base}.{module_name}.")
        for prefix in prefixes:
            found = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}
            if found:
                return found
        return {}


    def renamed_for(self, model: torch.nn.Module, key_mapping: dict[str, str] | None = None) -> "TensorIndex":
        """Keys renamed as transformers' loader renames them for ``model`` (checkpoints keep legacy names)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model, key_mapping, None)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        if not renamings and not converters:
            return self
        return TensorIndex({rename_source_key(k, renamings, converters)[0]: v for k, v in self.tensors.items()})


def read_tensor_index(files: list[str] | None) -> TensorIndex:
    index = TensorIndex()
    for path in files or []:
        if not str(path).endswith(".safetensors"):
            continue
        for name, info in read_header(path).items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"Tensor {name!r} in {path} has unsupported dtype {info['dtype']!r}.")
            index.tensors[name] = (tuple(info["shape"]), dtype)
    return index
