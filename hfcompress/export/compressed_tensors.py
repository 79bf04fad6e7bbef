"""Export to compressed-tensors: the checkpoint format vLLM serves and transformers loads without hfcompress.

Two layouts, chosen by ``activations``:

* ``pack-quantized`` (``activations=None``, weight-only W4A16/W8A16, any width 1-8): per Linear,
  ``weight_packed`` int32 ``[rows, ceil(cols*bits/32)]`` holds the codes as one little-endian bit stream per
  row (code ``j`` at bits ``j*bits...``), which is our ``packed`` byte stream viewed as int32;
  ``weight_scale`` ``[rows, n_groups]`` in the export dtype; ``weight_shape`` int64; asymmetric grids add
  ``weight_zero_point`` int32, the zero points bit-packed down each column (``[ceil(rows*bits/32),
  n_groups]``). compressed-tensors' codes are signed (``q - 2**(bits-1)``) and stored with that offset added
  back, so our unsigned codes are its stored bits unchanged.
* ``int-quantized`` (``activations="int8"``, W8A8): ``weight`` int8 ``q - 128`` and ``weight_scale``
  ``[rows, 1]``, for 8-bit symmetric per-channel layers; activations are quantized dynamically per token.

Exactness: compressed-tensors decodes ``(q - zero) * scale`` in the scale's dtype, and engines load scales in
the model's dtype, so a layer is exact when its scales are representable in the export dtype (the model's
dtype unless ``dtype`` is given): then both sides compute the same correctly rounded product. Ragged groups
(``cols % group_size != 0``), sparse formats, and quantized Embedding/Conv2d layers are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..bitpack import pack_codes
from ..grid import dequantize, quantize
from .base import ExportError, ExportReport, LayerExport, weight_error
from .source import ExportSource, QuantizedLayer

__all__ = ["ACTIVATIONS", "TARGET", "export_compressed_tensors", "pack_int32"]

TARGET = "compressed-tensors"
#: ``activations`` values: ``None`` (weight-only, pack-quantized) or ``"int8"`` (W8A8, int-quantized)
ACTIVATIONS = (None, "int8")
#: compressed-tensors release whose layout this writer was checked against (written as ``version``)
FORMAT_VERSION = "0.20.1"
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' int32 packing of unsigned ``codes[rows, cols]`` along rows (bit stream, no padding bits between codes)."""
    packed = pack_codes(codes, bits)  # uint8 [rows, ceil(cols*bits/8)], little-endian bit stream
    words = math.ceil(codes.shape[1] * bits / 32)
    pad = words * 4 - packed.shape[1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.contiguous().view(torch.int32)


def _strategy(layer: QuantizedLayer) -> tuple[str, int | None]:
    g = layer.spec.group_size
    if g is None or g >= layer.cols:
        return "channel", None
    return "group", g


def _refuse(layer: str, reason: str, fix: str) -> ExportError:
    return ExportError(layer, reason, fix, TARGET)


def _representable(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).to(t.dtype), t)) and bool(torch.isfinite(t.to(dtype)).all())


def _check_layer(layer: QuantizedLayer, dtype: torch.dtype, activations: str | None, requantize: bool) -> str:
    """Raise for what can never be exported; return ``""`` when exact, else why the layer must be re-quantized."""
    spec = layer.spec
    if layer.kind != "Linear":
        raise _refuse(layer.name, f"compressed-tensors engines quantize Linear layers, this is a quantized {layer.kind}",
                      "keep it dense (targets=['Linear'], the default)")  # fmt: skip
    strategy, group = _strategy(layer)
    if strategy == "group" and layer.cols % group:
        raise _refuse(
            layer.name, f"its {layer.cols} input columns are not a multiple of group_size={group} (ragged last group)",
            f"use a group_size that divides {layer.cols}, e.g. {_divisor_hint(layer.cols, group)}",
        )  # fmt: skip
    if activations == "int8" and (spec.bits != 8 or not spec.symmetric or strategy != "channel"):
        raise _refuse(
            layer.name, f"W8A8 (int-quantized) needs 8-bit symmetric per-channel weights, this layer is {spec.bits}-bit "
            f"{'symmetric' if spec.symmetric else 'asymmetric'} {strategy}",
            "compress with HfCompressConfig.for_export('compressed-tensors-w8a8')",
        )  # fmt: skip
    if not _representable(layer.scale, dtype):
        reason = (f"its {spec.scale_dtype} scales are not all representable in {_DTYPES.get(dtype, dtype)}, the dtype the "
                  "engines load scales in and compressed-tensors decodes in")  # fmt: skip
        if not requantize:
            raise _refuse(layer.name, reason, f"compress with scale_dtype={_DTYPES.get(dtype)!r}, or export with "
                          f"dtype={spec.scale_dtype!r}")  # fmt: skip
        return reason
    return ""


def _divisor_hint(cols: int, group: int) -> str:
    for g in (128, 64, 32, 16):
        if cols % g == 0 and g <= max(group, 16):
            return str(g)
    return "32" if cols % 32 == 0 else "None (per-channel)"


def _layer_tensors(layer: QuantizedLayer, dtype: torch.dtype, activations: str | None, reason: str):
    """The compressed-tensors tensors of one layer and its :class:`LayerExport`."""
    spec = layer.spec
    codes, scale, zero = layer.codes, layer.scale, layer.zero
    result = LayerExport(layer.name, layer.name, f"int{spec.bits}", exact=not reason)
    if reason:  # scales rounded to dtype; codes re-chosen on the rounded grid from our decoded weight
        ours = layer.dequantize(torch.float32)
        scale = scale.to(dtype)
        codes = quantize(ours, scale, zero, spec.bits, spec.group_size)
        theirs = dequantize(codes, scale, zero, spec.bits, spec.group_size, dtype)
        result.rel_error, result.max_abs_error = weight_error(ours, theirs.float())
        result.reason = reason
    scale = scale.to(dtype).contiguous()
    if activations == "int8":
        return {"weight": (codes.to(torch.int16) - 128).to(torch.int8), "weight_scale": scale.reshape(-1, 1)}, result
    out = {
        "weight_packed": pack_int32(codes, spec.bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor(layer.shape, dtype=torch.int64),
    }
    if zero is not None:
        out["weight_zero_point"] = pack_int32(zero.t().contiguous(), spec.bits).t().contiguous()
    return out, result


def _args(bits: int, symmetric: bool, strategy: str, group: int | None, dynamic: bool) -> dict[str, Any]:
    """One ``QuantizationArgs`` as compressed-tensors writes it; ``scale_dtype``/``zp_dtype`` are left to their
    defaults (an explicit null zero-point dtype makes compressed-tensors 0.19 expect unpacked zero points)."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None,
            "observer": None, "observer_kwargs": {}}  # fmt: skip


def _scheme(bits: int, symmetric: bool, strategy: str, group: int | None, activations: str | None) -> dict[str, Any]:
    weights = _args(bits, symmetric, strategy, group, False)
    acts = _args(8, True, "token", None, True) if activations == "int8" else None
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": None}


def quantization_config(source: ExportSource, activations: str | None) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, in the shape compressed-tensors writes it."""
    from torch import nn

    groups: dict[tuple, list[str]] = {}
    for layer in source.quantized.values():
        strategy, group = _strategy(layer)
        groups.setdefault((layer.spec.bits, layer.spec.symmetric, strategy, group), []).append(layer.name)
    single = len(groups) == 1
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        scheme = _scheme(*key, activations)
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if single else sorted(names), **scheme}
    quantized = set(source.quantized)
    ignore = sorted(
        name for name, m in source.model.named_modules() if isinstance(m, nn.Linear) and name not in quantized
    )
    return {
        "config_groups": config_groups,
        "format": "int-quantized" if activations == "int8" else "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": FORMAT_VERSION,
    }


def export_compressed_tensors(
    source: ExportSource,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    activations: str | None = None,
    requantize: bool = False,
    max_shard_size: int | str = "5GB",
    progress=None,
) -> ExportReport:
    """Write ``source`` as a compressed-tensors checkpoint into the (empty, temporary) folder ``out``.

    Every check runs before the first byte is written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r} is not supported; use None (weight-only) or 'int8' (W8A8).")
    if source.other_compressed:
        name, fmt = next(iter(source.other_compressed.items()))
        raise _refuse(name, f"it is stored in the sparse format {fmt!r}, which the compressed-tensors export does not map",
                      "export a model compressed without sparsity")  # fmt: skip
    if not source.quantized:
        raise ValueError("The model has no quantized layers; compressed-tensors export needs a model quantized by hfcompress.")
    dtype = dtype or source.dense_dtype()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; use torch.float16, torch.bfloat16 or torch.float32.")
    reasons = {name: _check_layer(layer, dtype, activations, requantize) for name, layer in source.quantized.items()}
    report = ExportReport(target=TARGET, output=str(out))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source.dense.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            if not _representable(tensor, dtype):
                if not requantize:
                    raise _refuse(name, f"this dense {tensor.dtype} tensor changes when cast to {dtype}",
                                  f"export with dtype={_DTYPES.get(tensor.dtype)!r}")  # fmt: skip
                rel, mx = weight_error(tensor.float(), tensor.to(dtype).float())
                report.layers.append(LayerExport(name, name, _DTYPES[dtype], False, "dense", rel, mx, "cast"))
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    for name, layer in source.quantized.items():
        tensors, result = _layer_tensors(layer, dtype, activations, reasons[name])
        for key, tensor in tensors.items():
            state[f"{name}.{key}"] = tensor
        report.layers.append(result)
        if progress is not None:
            progress.update(1)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}  # fmt: skip
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = source.config.to_dict()
    config["quantization_config"] = quantization_config(source, activations)
    config["dtype"] = _DTYPES[dtype]
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(source.model, "generation_config", None)
    if generation is not None and getattr(source.model, "can_generate", lambda: False)():
        generation.save_pretrained(out)
    report.nbytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    return report
