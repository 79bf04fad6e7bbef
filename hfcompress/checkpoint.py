"""Reading safetensors checkpoints without loading them: validated file names, headers and tensor regions.

Everything hfcompress reads from a checkpoint folder goes through here, so every reader refuses the same
damage with the same clear error (:class:`CheckpointError`, a ``ValueError``, naming the file, the tensor
and the field):

* :func:`shard_names` — the weight files of a folder: the shards ``model.safetensors.index.json`` names
  (each must be a plain file name inside the folder: no ``/``, ``\\``, ``..`` or absolute path, and present),
  else ``model.safetensors``; a folder with several ``*.safetensors`` files and no index is refused.
* :func:`read_header` — one file's header, with every field checked: JSON object, known dtype, shape of
  non-negative integers, data offsets that match ``prod(shape) * itemsize``, tensor regions that cover the
  data area exactly (no gap, no overlap) and end where the file ends (nothing appended), string metadata.
* :func:`read_tensor_index` — name -> (shape, dtype) over the shards, with every name in one shard only and
  the index (when there is one) naming exactly the tensors the shards hold.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: the safetensors library refuses headers larger than this; so do we (a bound before anything is parsed)
MAX_HEADER_BYTES = 100 * 1024 * 1024

__all__ = [
    "DTYPE_NAMES",
    "INDEX_NAME",
    "SAFETENSORS_DTYPES",
    "SINGLE_NAME",
    "CheckpointError",
    "TensorIndex",
    "data_start",
    "plain_file_name",
    "read_header",
    "read_index",
    "check_stored_keys",
    "loader_renaming",
    "read_tensor_index",
    "shard_names",
    "shard_paths",
]


class CheckpointError(ValueError):
    """A checkpoint folder or file is damaged, truncated, inconsistent or crafted; the message names it."""


# ------------------------------------------------------------------------------------------- file names
def plain_file_name(name: object, where: str) -> str:
    """``name`` if it is a plain file name (one path component inside its folder), else :class:`CheckpointError`."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: file name {name!r} is not a non-empty string.")
    if (
        "/" in name or "\\" in name or "\0" in name or name in (".", "..") or os.path.isabs(name)
        or (len(name) > 1 and name[1] == ":")
    ):  # fmt: skip
        raise CheckpointError(
            f"{where}: file name {name!r} is not a plain file name inside the checkpoint folder (no directories, "
            "'..' or absolute paths); the index is damaged or crafted."
        )
    return name


def read_index(folder: str | os.PathLike) -> dict[str, str] | None:
    """The ``weight_map`` of ``folder``'s index (tensor -> shard file name, validated), or ``None`` without index."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the index is damaged. Re-save or re-download it.") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{path} has no 'weight_map'; the index is damaged or not a safetensors index.")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: 'weight_map' must be a non-empty object mapping tensor names to shard files.")
    for tensor, shard in weight_map.items():
        plain_file_name(shard, f"{path} (weight_map[{tensor!r}])")
        if not shard.endswith(".safetensors"):
            raise CheckpointError(f"{path}: weight_map[{tensor!r}]={shard!r} is not a .safetensors file.")
    return dict(weight_map)


def shard_names(folder: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint folder, as plain names (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    weight_map = read_index(folder)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder / INDEX_NAME} names shard(s) that are missing: {missing}. Re-download them.")
        return names
    if (folder / SINGLE_NAME).is_file():
        others = sorted(p.name for p in folder.glob("*.safetensors") if p.name != SINGLE_NAME)
        if others:
            raise CheckpointError(
                f"{folder} holds {SINGLE_NAME} and other weight files {others[:3]} but no {INDEX_NAME}; which of them "
                "belong to the model is unknown. Remove the stray files or restore the index."
            )
        return [SINGLE_NAME]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) > 1 or (found and "-of-" in found[0]):
        raise CheckpointError(
            f"{folder} holds sharded weights {found[:3]} but no {INDEX_NAME}; the index is missing. Re-download it."
        )
    if found:
        return found
    other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {other[:3]}: re-save it with save_pretrained(), which writes safetensors)" if other else ""
    raise FileNotFoundError(f"{folder} holds no safetensors checkpoint ({SINGLE_NAME} or {INDEX_NAME}){hint}.")


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """:func:`shard_names` as paths."""
    return [Path(folder) / name for name in shard_names(folder)]


# ------------------------------------------------------------------------------------------- headers
def data_start(path: str | os.PathLike) -> int:
    """Offset of the data area of a safetensors file (8 + header length)."""
    with open(path, "rb") as f:
        raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"Checkpoint file {path} is truncated: no safetensors header.")
    return 8 + struct.unpack("<Q", raw)[0]


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of one ``.safetensors`` file, every field validated against the file (see module docstring)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"Checkpoint file {path} is truncated ({size} bytes): no safetensors header. Re-save or re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"Checkpoint file {path} is truncated: its header needs {n} bytes, the file has {size - 8}.")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"Checkpoint file {path} declares a {n}-byte header (limit {MAX_HEADER_BYTES}); it is damaged.")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"Checkpoint file {path} has a corrupt safetensors header ({exc}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"Checkpoint file {path}: the safetensors header is not a JSON object.")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"Checkpoint file {path}: '__metadata__' must map strings to strings.")
    regions = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"Checkpoint file {path}, tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: its header entry is not an object.")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: field 'dtype'={info.get('dtype')!r} is not a supported safetensors dtype.")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise CheckpointError(f"{where}: field 'shape'={shape!r} must be a list of non-negative integers.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: field 'data_offsets'={offsets!r} must be [begin, end] with 0 <= begin <= end.")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: field 'data_offsets' spans {offsets[1] - offsets[0]} bytes but dtype {info['dtype']} and "
                f"shape {shape} need {nbytes}; the header is damaged."
            )
        regions.append((offsets[0], offsets[1], name))
    regions.sort()
    pos = 0
    for begin, end, name in regions:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CheckpointError(f"Checkpoint file {path}, tensor {name!r}: its data region {what}; the header is damaged.")
        pos = end
    if 8 + n + pos != size:
        if 8 + n + pos > size:
            raise CheckpointError(
                f"Checkpoint file {path} is truncated: its tensors need {8 + n + pos} bytes, the file has {size}. "
                "Re-save or re-download it."
            )
        raise CheckpointError(
            f"Checkpoint file {path} has {size - 8 - n - pos} bytes after its last tensor (appended data); it is "
            "damaged or was modified. Re-save or re-download it."
        )
    return header


# ------------------------------------------------------------------------------------------- tensor index
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


def read_tensor_index(files: list[str] | None, weight_map: dict[str, str] | None = None) -> TensorIndex:
    """The tensors of ``files`` (validated headers); ``weight_map`` (a folder's index) must list exactly them."""
    index = TensorIndex()
    shard_of: dict[str, str] = {}
    for path in files or []:
        if not str(path).endswith(".safetensors"):
            continue
        for name, info in read_header(path).items():
            if name == "__metadata__":
                continue
            if name in shard_of:
                raise CheckpointError(f"Tensor {name!r} is stored twice, in {shard_of[name]} and {path}; the checkpoint is damaged.")
            shard_of[name] = os.path.basename(os.fspath(path))
            index.tensors[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
    if weight_map is not None:
        wrong = sorted(k for k in set(weight_map) | set(shard_of) if weight_map.get(k) != shard_of.get(k))
        if wrong:
            k = wrong[0]
            raise CheckpointError(
                f"The index and the shards disagree on {len(wrong)} tensor(s), e.g. {k!r}: the index says "
                f"{weight_map.get(k)!r}, the shards hold it in {shard_of.get(k)!r}. The index is damaged or stale."
            )
    return index


# ------------------------------------------------------------------------------------------- stored vs model
def loader_renaming(model, key_mapping=None):
    """``stored name -> model name`` as transformers' loader renames keys (legacy names, base-model prefix)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model, key_mapping, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        renamed, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, _ = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        return renamed

    return rename


def check_stored_keys(model: torch.nn.Module, stored: list[str], key_mapping=None) -> None:
    """Every stored tensor must land in the model and every model tensor must come from the file.

    Exceptions are transformers' own: tied weights (stored once), the patterns a model class declares in
    ``_keys_to_ignore_on_load_missing/unexpected``, the head of a checkpoint loaded into its base model and the
    new head of a base-model checkpoint loaded into a model with a head. Raises ``CheckpointError`` naming the
    tensors otherwise (e.g. an asymmetric checkpoint whose config says symmetric: its zero points would be
    dropped; targets narrowed in config.json: compressed tensors unused and the layers left random).
    """
    rename = loader_renaming(model, key_mapping)
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    landed = {rename(k): k for k in stored}
    model_has_base = bool(prefix) and hasattr(model, prefix) and isinstance(getattr(model, prefix), torch.nn.Module)
    ckpt_has_base = bool(prefix) and any(k.startswith(prefix + ".") for k in stored)

    def matches(key: str, patterns) -> bool:
        return any(re.search(p, key) for p in patterns or [])

    buffers = {name for name, _ in model.named_buffers()}
    ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    # as transformers: old checkpoints store buffers that models now recompute (non-persistent)
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        ignore_unexpected.append(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        ignore_unexpected.append(r"(^|\.)position_ids$")
    unexpected = sorted(
        orig for new, orig in landed.items()
        if new not in expected
        and new not in buffers  # a non-persistent buffer's stored value: the model recomputes it
        and not matches(orig, ignore_unexpected)
        and not (not model_has_base and ckpt_has_base and not orig.startswith(prefix + "."))  # head of a bigger model
    )  # fmt: skip
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(
        k for k in expected - set(landed)
        if not (k in tied and tied[k] in landed)
        and not matches(k, getattr(model, "_keys_to_ignore_on_load_missing", None))
        and not (model_has_base and not ckpt_has_base and not k.startswith(prefix + "."))  # new head on a base model
    )  # fmt: skip
    if unexpected:
        raise CheckpointError(
            f"The checkpoint stores {len(unexpected)} tensor(s) this model has no place for, e.g. {unexpected[:3]}: "
            "config.json's quantization_config does not describe these weights (e.g. symmetric/targets/ignore edited), "
            "or the checkpoint belongs to another model. Loading would silently drop them."
        )
    if missing:
        raise CheckpointError(
            f"The checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}: they would be left "
            "randomly initialised. The checkpoint is incomplete, or config.json's quantization_config was edited."
        )
