"""Export to GGUF, the file llama.cpp runs, written with the ``gguf`` package.

One ``.gguf`` file holds the architecture's hyper-parameters (:mod:`.arch`), the tokenizer and chat template
(:mod:`.vocab`) and every tensor: quantized layers as the ggml block type their grid is (:mod:`.blocks`: Q4_0,
Q5_0, Q8_0 from symmetric group-32 codes with float16 scales, Q4_1/Q5_1 from asymmetric ones whose minima
float16 holds), norms and biases in float32, and the weights hfcompress kept dense in their own dtype (or
``dense_type``). A tied embedding is written once, as ``token_embd``; llama.cpp uses it as the output head.

The file records ``general.quantized_by = "hfcompress"`` and ``hfcompress.exact`` (whether every tensor is
hfcompress's own weight bit for bit).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from ..._version import __version__
from ..base import ExportError, ExportReport, LayerExport, weight_error
from ..source import ExportSource
from .arch import architecture_of, qk_row_order, write_metadata
from .blocks import encodable, encode_exact, exact_type, inexact_reason
from .vocab import write_vocab

__all__ = ["DENSE_TYPES", "QUANT_TYPES", "export_gguf", "is_our_gguf"]

TARGET = "gguf"
#: types a quantized layer can be written as (exactly when its grid is that type, else with requantize=True)
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
#: types the weights hfcompress kept dense can be written as (float types are lossless for their own dtype)
DENSE_TYPES = ("F32", "F16", "BF16") + QUANT_TYPES
_TORCH_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_MARK = b"hfcompress.version"
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}  # fmt: skip


def is_our_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file hfcompress wrote (its header carries ``hfcompress.version``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"GGUF") and _MARK in head


def _check_type(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in allowed:
        raise ValueError(
            f"{name}={value!r} is not supported; use one of {list(allowed)} (K-quants have no exact map from our grids "
            "and the gguf package has no encoder for them: run llama-quantize on a BF16 export for those)."
        )
    return value.upper()


def _fix_for(layer, qtype: str) -> str:
    spec = layer.spec
    natural = exact_type(layer)
    if natural is None:
        return "compress with HfCompressConfig.for_export('gguf-q4_0') (4-bit symmetric, group 32) or 'gguf-q8_0'"
    if natural != qtype:
        return f"ask for gguf_type={natural!r}, or compress with HfCompressConfig.for_export('gguf-{qtype.lower()}')"
    if spec.group_size != 32:
        return "use group_size=32"
    if spec.scale_dtype != "float16":
        return "use scale_dtype='float16'"
    return "use symmetric=True (exported as Q4_0/Q5_0/Q8_0)"


def _tokenizer_folder(tokenizer, source: ExportSource, scratch: Path) -> Path:
    if tokenizer is None:
        if source.folder is None:
            raise ValueError("GGUF files carry their tokenizer and this model has no folder to take it from; pass tokenizer=.")
        return Path(source.folder)
    if isinstance(tokenizer, (str, os.PathLike)):
        return Path(tokenizer)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(scratch)
        return scratch
    raise TypeError(f"tokenizer must be a tokenizer, a folder or None, not {type(tokenizer).__name__}.")


def _quantize(w: torch.Tensor, qtype: str) -> tuple[np.ndarray, torch.Tensor]:
    kind = gguf.GGMLQuantizationType[qtype]
    data = gguf.quants.quantize(w.float().numpy(), kind)
    back = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, kind))).reshape(w.shape)
    return data, back


def _dense_entry(
    key: str, tensor: torch.Tensor, target: str, order: torch.Tensor | None, arch, dense_type: str | None
) -> tuple[str, np.ndarray, str, LayerExport]:
    """How one dense tensor is written: lossless in its dtype (norms in float32), or re-quantized to ``dense_type``."""
    w = tensor.detach().float()
    if arch.norm_plus_one and key.endswith("norm.weight"):
        w = w + 1.0
    if order is not None:
        w = w[order]
    if w.dim() == 1:
        qtype, result = "F32", LayerExport(key, target, "F32", exact=True, source="dense")
        if arch.norm_plus_one and key.endswith("norm.weight") and not torch.equal((w - 1.0), tensor.float()):
            result.exact, result.reason = False, "norm + 1 rounded in float32"
        return target, w.numpy(), qtype, result
    qtype = dense_type or _TORCH_TYPES.get(tensor.dtype, "F32")
    result = LayerExport(key, target, qtype, exact=True, source="dense")
    if qtype == "F32":
        data = w.numpy()
    elif qtype in ("F16", "BF16"):
        cast = tensor.detach().to(torch.float16 if qtype == "F16" else torch.bfloat16)
        cast = cast[order] if order is not None else cast
        if not torch.equal(cast.float(), w):
            result.exact, result.reason = False, f"{tensor.dtype} weights rounded to {qtype}"
            result.rel_error, result.max_abs_error = weight_error(w, cast.float())
        data = cast.contiguous().view(torch.uint8 if qtype == "BF16" else torch.float16).numpy()
        if qtype == "BF16":
            data = data.reshape(w.shape[0], -1)
    else:
        data, back = _quantize(w, qtype)
        result.exact, result.reason = False, f"dense weight re-quantized to {qtype} (dense_type)"
        result.rel_error, result.max_abs_error = weight_error(w, back)
    return target, data, qtype, result


def export_gguf(
    source: ExportSource,
    path: Path,
    *,
    tokenizer=None,
    gguf_type: str | None = None,
    dense_type: str | None = None,
    requantize: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Write ``source`` as one GGUF file at ``path`` (a temporary file the caller renames into place).

    Every layer is checked before anything is written.
    """
    config = source.config
    arch = architecture_of(config)
    gguf_type = _check_type("gguf_type", gguf_type, QUANT_TYPES)
    dense_type = _check_type("dense_type", dense_type, DENSE_TYPES)
    if source.other_compressed:
        name, fmt = next(iter(source.other_compressed.items()))
        raise ExportError(name, f"it is stored in the sparse format {fmt!r}; GGUF has no sparse block types",
                          "export a model compressed without sparsity", TARGET)  # fmt: skip
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], int(config.num_hidden_layers))
    report = ExportReport(target=TARGET, output=str(path))

    def gguf_name(key: str) -> str:
        new = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"tensor {key!r} has no GGUF name in llama.cpp's {arch.gguf_name} architecture; it cannot be exported.")
        return new

    def row_order(key: str, rows: int) -> torch.Tensor | None:
        if not arch.permute_qk:
            return None
        if ".self_attn.q_proj." in key:
            return qk_row_order(rows, n_head)
        if ".self_attn.k_proj." in key:
            return qk_row_order(rows, n_kv)
        return None

    # ---- plan every tensor (all refusals happen here, before the file is touched)
    plan: list[tuple[str, np.ndarray, str, LayerExport]] = []
    quant_types: list[str] = []
    for name, layer in source.quantized.items():
        key = f"{name}.weight"
        qtype = gguf_type or exact_type(layer) or "Q8_0"
        reason = inexact_reason(layer, qtype)
        if reason and not requantize:
            raise ExportError(name, reason, _fix_for(layer, qtype), TARGET)
        rows = row_order(key, layer.rows)
        result = LayerExport(name, gguf_name(key), qtype, exact=not reason)
        if reason:
            ours = layer.dequantize(torch.float32)
            ours = ours[rows] if rows is not None else ours
            if encodable(layer, qtype):  # our codes and scales kept, only float16-rounded minima
                data = encode_exact(layer, qtype, rows)
                back = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])).reshape(ours.shape)
            else:
                data, back = _quantize(ours, qtype)
            result.rel_error, result.max_abs_error = weight_error(ours, back)
            result.reason = reason
        else:
            data = encode_exact(layer, qtype, rows)
        plan.append((result.target_name, data, qtype, result))
        quant_types.append(qtype)
    for key, tensor in source.dense.items():
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {key!r} is {tensor.dtype}; GGUF export writes floating tensors only.")
        if key == "lm_head.weight" and arch.norm_plus_one:
            continue  # Gemma ties its head to the embedding; llama.cpp has no output tensor for it
        order = row_order(key, tensor.shape[0])
        plan.append(_dense_entry(key, tensor, gguf_name(key), order, arch, dense_type))

    # ---- write
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.tok-", dir=path.parent) as scratch:
        folder = _tokenizer_folder(tokenizer, source, Path(scratch))
        writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
        writer.add_string(_MARK.decode(), __version__)
        writer.add_string("general.quantized_by", "hfcompress")
        writer.add_bool("hfcompress.exact", all(r.exact for *_, r in plan))
        name = str(getattr(config, "_name_or_path", "") or getattr(source.model, "name_or_path", "") or "model")
        write_metadata(writer, config, arch, Path(name).name or "model")
        main = max(set(quant_types), key=quant_types.count) if quant_types else _TORCH_TYPES.get(source.dense_dtype(), "F32")
        writer.add_file_type(int(_FILE_TYPES[main]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, folder, int(config.vocab_size))
        for target, data, qtype, result in plan:
            raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(target, data, raw_dtype=raw)
            report.layers.append(result)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    report.nbytes = path.stat().st_size
    return report
