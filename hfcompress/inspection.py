"""What a saved checkpoint folder holds, read from ``config.json`` and the safetensors headers.

:func:`inspect_checkpoint` never loads the weights: it builds the model's skeleton on the meta device,
resolves which modules the saved :class:`~hfcompress.HfCompressConfig` compresses (exactly as the
reload path does), validates their stored tensors against the format, and sizes everything from the
headers. With ``measure=True`` it also decodes one compressed layer at a time to count the zeros
actually stored (the realised sparsity), keeping memory at one layer.

The result has the schema of :func:`hfcompress.compression_report` plus the checkpoint's identity, so
model cards and ``hfcompress inspect`` treat a folder and an in-memory model alike.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import SAFETENSORS_DTYPES, check_stored_keys, loader_renaming, read_header, read_index, read_tensor_index, shard_paths
from .config import QUANT_METHOD, HfCompressConfig
from .integrity import verify_files

__all__ = ["checkpoint_files", "inspect_checkpoint", "layer_groups", "load_saved_config"]

def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder, validated (see :func:`hfcompress.checkpoint.shard_names`)."""
    return shard_paths(folder)


def load_saved_config(folder: str | os.PathLike):
    """The transformers config of a saved folder, with a clear error when it is not a model folder."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a folder written by save_pretrained or `hfcompress compress`.")
    return AutoConfig.from_pretrained(folder)


def _hfcompress_config(model_config) -> HfCompressConfig | None:
    qc = getattr(model_config, "quantization_config", None)
    if qc is None:
        return None
    if isinstance(qc, HfCompressConfig):
        return qc
    if isinstance(qc, dict):
        if qc.get("quant_method") != QUANT_METHOD:
            return None
        return HfCompressConfig.from_dict(dict(qc))
    return None


def _skeleton(model_config) -> torch.nn.Module:
    """The model of a config with every tensor on the meta device (no memory, no init)."""
    import transformers

    archs = getattr(model_config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        if cls is not None:
            return cls(model_config)
        return transformers.AutoModel.from_config(model_config)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def inspect_checkpoint(
    folder: str | os.PathLike, measure: bool = False, show_progress: bool = False, verify: bool = True
) -> dict[str, Any]:
    """Per-layer format, bits, group size, sparsity and bytes of a saved (compressed or dense) checkpoint.

    Args:
        folder: a folder written by ``save_pretrained`` (or ``hfcompress compress``).
        measure: also decode each compressed layer (one at a time) and report ``zero_fraction``, the share of
            exact zeros in its stored weight: the realised sparsity, or codes that round to zero.
        show_progress: a tqdm bar over the layers.
        verify: run the checks ``from_pretrained`` runs before loading, without loading: every tensor against
            its recorded checksum and config.json against the config the tensors were written for
            (:mod:`hfcompress.integrity`), every lossless payload's chunk checksums, and stored tensors against
            the tensors the model needs. ``False`` reads only the headers.

    Returns:
        ``{"folder", "architecture", "model_type", "quantization_config" (dict or None), "compressed",
        "layers": [...], "compressed_bytes", "other_bytes", "total_bytes", "compressed_params",
        "bf16_bytes"}``; each layer has ``name, format, shape, bits, group_size, sparsity, nbytes,
        bits_per_weight`` (bytes as stored in the files, i.e. after the lossless stage when the checkpoint
        uses it), ``memory_nbytes`` (decoded, as held in memory) and ``zero_fraction`` when measured.
        ``bf16_bytes`` is the size of the same model with every floating tensor, compressed layers
        included, stored densely in bfloat16; ``lossless`` tells whether the files hold coded tensors.

    Raises:
        FileNotFoundError: no config.json or no safetensors weights.
        ValueError: the stored tensors do not match what the config says (damaged or foreign checkpoint).
    """
    folder = Path(folder)
    model_config = load_saved_config(folder)
    files = checkpoint_files(folder)
    from .formats import lossless as lossless_format

    file_of: dict[str, Path] = {}
    stored_bytes: dict[str, int] = {}  # stored name -> bytes in the file
    for path in files:
        for name, info in read_header(path).items():
            if name == "__metadata__":
                continue
            file_of[name] = path
            stored_bytes[name] = _nbytes(tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8))
    total = sum(stored_bytes.values())
    qconfig = _hfcompress_config(model_config)
    # Tensor names as the model sees them (lossless payloads resolved to the shape/dtype they decode to).
    stored_of = {lossless_format.original_key(k) or k: k for k in stored_bytes}
    index = read_tensor_index([str(f) for f in files], read_index(folder))
    index = lossless_format.resolve_index(index, [str(f) for f in files], bool(getattr(qconfig, "lossless", False)))
    model = _skeleton(model_config) if qconfig is not None else None
    if qconfig is not None and verify:
        verify_files(files, qconfig, checksums=True, rename=loader_renaming(model))
        _verify_payloads(files)
    report: dict[str, Any] = {
        "folder": str(folder),
        "verified": bool(qconfig is not None and verify),
        "architecture": (getattr(model_config, "architectures", None) or [None])[0],
        "model_type": getattr(model_config, "model_type", None),
        "quantization_config": qconfig.to_dict() if qconfig is not None else None,
        "compressed": qconfig is not None,
        "lossless": any(k != v for k, v in stored_of.items()),
        "layers": [],
    }
    layers: list[dict[str, Any]] = []
    in_layers: set[str] = set()  # model-side names of the compressed layers' tensors
    if qconfig is not None:
        layers, in_layers = _compressed_layers(folder, model, qconfig, index, stored_bytes, stored_of, file_of, measure, show_progress)
        if verify:
            check_stored_keys(model, list(index.tensors))
    compressed = sum(layer["nbytes"] for layer in layers)
    params = sum(math.prod(layer["shape"]) for layer in layers)
    other_bf16 = sum(
        2 * math.prod(shape) if dtype.is_floating_point else _nbytes(shape, dtype)
        for name, (shape, dtype) in index.tensors.items()
        if name not in in_layers
    )
    report.update(
        layers=layers,
        compressed_bytes=compressed,
        other_bytes=total - compressed,
        total_bytes=total,
        compressed_params=params,
        bf16_bytes=other_bf16 + 2 * params,
    )
    return report


def _compressed_layers(
    folder: Path, model, qconfig, index, stored_bytes: dict[str, int], stored_of: dict[str, str],
    file_of: dict[str, Path], measure: bool, show_progress: bool,
) -> tuple[list[dict[str, Any]], set[str]]:
    """The report entry of every compressed layer, and the model-side names of the tensors they hold."""
    from .modules import compressed_twin, set_submodule
    from .plan.targets import resolve_layers

    layers = []
    in_layers: set[str] = set()
    renamed = index.renamed_for(model)
    original = dict(zip(renamed.tensors, index.tensors)) if len(renamed.tensors) == len(index.tensors) else {}
    plan = resolve_layers(model, qconfig)
    for name, spec in tqdm(plan.items(), total=len(plan), desc="inspect", unit="layer", disable=not show_progress):
        dense = model.get_submodule(name)
        twin = compressed_twin(dense, spec)
        found = renamed.module_tensors(name, model)
        if not found:
            raise ValueError(
                f"{folder}: the config compresses {name!r} but the checkpoint stores no tensors for it; the "
                "checkpoint is damaged or was written with another config."
            )
        twin.init_empty(found, where=name)
        set_submodule(model, name, twin)
        keys = _stored_names(name, found, model, original)
        in_layers.update(keys)
        numel = math.prod(twin.dense_shape)
        nbytes = sum(stored_bytes[stored_of[k]] for k in keys if k in stored_of)
        layer = {
            "name": name, "format": twin.format_name, "shape": list(twin.dense_shape), "bits": spec.bits,
            "group_size": spec.group_size, "sparsity": spec.effective_sparsity, "nbytes": nbytes,
            "bits_per_weight": 8 * nbytes / numel, "memory_nbytes": twin.compressed_nbytes(),
        }  # fmt: skip
        if measure:
            layer["zero_fraction"] = _zero_fraction(twin, name, found, model, original, file_of, stored_of)
        layers.append(layer)
    return layers, in_layers


def _verify_payloads(files: list[Path]) -> None:
    """Chunk checksums of every lossless payload (no decoding), naming the file and tensor on damage."""
    from .checkpoint import data_start
    from .formats.lossless import original_key
    from .lossless.codec import verify_payload

    for path in files:
        header = read_header(path)
        start = data_start(path)
        with open(path, "rb") as f:
            for name, info in header.items():
                if name == "__metadata__" or original_key(name) is None:
                    continue
                begin, end = info["data_offsets"]
                f.seek(start + begin)
                verify_payload(f.read(end - begin), where=f"{name} in {path}")


def _stored_names(name: str, found: dict, model, original: dict) -> set[str]:
    """The checkpoint keys of one compressed module's tensors (as written in the file)."""
    out = set()
    base = getattr(model, "base_model_prefix", "")
    prefixes = [name + "."]
    if base and name.startswith(base + "."):
        prefixes.append(name[len(base) + 1 :] + ".")
    elif base:
        prefixes.append(f"{base}.{name}.")
    for short in found:
        for prefix in prefixes:
            out.add(original.get(prefix + short, prefix + short))
    return out


def _zero_fraction(twin, name: str, found: dict, model, original: dict, file_of: dict, stored_of: dict) -> float:
    from safetensors import safe_open

    from .lossless.codec import decode_tensor

    prefixes = [name + "."]
    base = getattr(model, "base_model_prefix", "")
    if base and name.startswith(base + "."):
        prefixes.append(name[len(base) + 1 :] + ".")
    elif base:
        prefixes.append(f"{base}.{name}.")
    tensors = {}
    for short in found:
        for prefix in prefixes:
            key = original.get(prefix + short, prefix + short)
            stored = stored_of.get(key)
            if stored in file_of:
                with safe_open(str(file_of[stored]), framework="pt") as f:
                    tensor = f.get_tensor(stored)
                tensors[short] = tensor if stored == key else decode_tensor(tensor, where=stored)
                break
    twin.set_compressed(tensors, where=name)
    weight = twin.dequantize_weight(torch.float32)
    fraction = float((weight == 0).sum()) / weight.numel()
    twin.init_empty(found, where=name)  # drop the decoded layer again
    return fraction


_INDEX_PART = re.compile(r"(?<=\.)\d+(?=\.)")


def layer_groups(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers grouped by role: the name with block indices replaced by ``*`` (``model.layers.*.mlp.up_proj``).

    Each group: ``group, count, format, bits, group_size, sparsity, params, nbytes, bits_per_weight``; a
    setting that differs inside a group is reported as ``"mixed"``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for layer in layers:
        groups.setdefault(_INDEX_PART.sub("*", layer["name"]), []).append(layer)
    out = []
    for key, members in groups.items():
        params = sum(math.prod(m["shape"]) for m in members)
        nbytes = sum(m["nbytes"] for m in members)

        def same(field: str):
            values = {json.dumps(m[field]) for m in members}
            return members[0][field] if len(values) == 1 else "mixed"

        out.append({
            "group": key, "count": len(members), "format": same("format"), "bits": same("bits"),
            "group_size": same("group_size"), "sparsity": same("sparsity"), "params": params, "nbytes": nbytes,
            "bits_per_weight": 8 * nbytes / params if params else 0.0,
        })  # fmt: skip
    return out
