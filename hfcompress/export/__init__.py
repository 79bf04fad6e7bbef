"""Export compressed models to the formats serving engines load: compressed-tensors (vLLM) and GGUF (llama.cpp).

::

    from hfcompress.export import export
    export("smollm2-w4g32", "smollm2-ct", to="compressed-tensors")       # a folder vLLM serves
    export("smollm2-q4_0", "smollm2-q4_0.gguf", to="gguf")                # a file llama.cpp runs

Our codes and scales are carried over unchanged: an exact export decodes, in the engine's own decoder, to
exactly the weights hfcompress decodes. What a target cannot hold exactly is refused with an
:class:`ExportError` (layer, reason, fix) unless ``requantize=True``. Which configurations export exactly is
in the README ("Export"); :meth:`hfcompress.HfCompressConfig.for_export` builds them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from ..grid import scale_torch_dtype
from ..outputs import OutputFile, OutputFolder
from .base import ExportError, ExportReport, LayerExport
from .source import ExportSource, load_source

__all__ = ["TARGETS", "ExportError", "ExportReport", "ExportSource", "LayerExport", "export", "load_source"]

#: export targets: name -> what it writes
TARGETS = {
    "compressed-tensors": "a checkpoint folder in compressed-tensors' pack-quantized / int-quantized format (vLLM, transformers)",
    "gguf": "one GGUF file (llama.cpp)",
}

def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return scale_torch_dtype(value)  # the one name -> dtype table (float16, bfloat16, float32)
    except (ValueError, TypeError):
        raise ValueError(f"dtype={value!r} is not supported; use 'float16', 'bfloat16' or 'float32' (or the torch dtype).") from None


def export(
    src,
    output: str | os.PathLike,
    to: str,
    *,
    tokenizer=None,
    requantize: bool = False,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    activations: str | None = None,
    gguf_type: str | None = None,
    dense_type: str | None = None,
    progress: bool = False,
    **options: Any,
) -> ExportReport:
    """Export a compressed model to a serving engine's format.

    Args:
        src: a folder saved by hfcompress (verified on load), or a compressed model in memory.
        output: the folder (``to="compressed-tensors"``) or ``.gguf`` file (``to="gguf"``) to write, atomically;
            it may not be, contain or lie inside ``src``.
        to: ``"compressed-tensors"`` or ``"gguf"``.
        tokenizer: the tokenizer (or its folder) to ship; default: the one in ``src``'s folder. GGUF needs one.
        requantize: instead of refusing layers the target cannot hold exactly, round them onto its grid; the
            report lists each with the error it added.
        overwrite: replace an existing output that hfcompress wrote.
        dtype: compressed-tensors only: the checkpoint dtype (default: the model's).
        activations: compressed-tensors only: ``None`` (weight-only) or ``"int8"`` (W8A8, dynamic per-token).
        gguf_type: GGUF only: the type of the quantized layers (default: the one our grid maps to exactly,
            e.g. ``"Q4_0"`` for symmetric 4-bit group-32 codes with float16 scales).
        dense_type: GGUF only: the type of the weights hfcompress kept dense (default: their own dtype, lossless;
            ``"Q8_0"``, ``"Q4_0"``... re-quantize them, like ``llama-quantize``, and report the error).
        progress: show a progress bar on stderr.

    Returns:
        an :class:`ExportReport` (per tensor: target type, exact or the added error).
    """
    if to not in TARGETS:
        raise ValueError(f"to={to!r} is not an export target; use one of {sorted(TARGETS)}.")
    if not isinstance(requantize, bool):
        raise TypeError(f"requantize={requantize!r} must be True or False, not {type(requantize).__name__}.")
    sources = [src] if isinstance(src, (str, os.PathLike)) else []
    guess = getattr(getattr(src, "config", None), "_name_or_path", None)
    if guess and os.path.isdir(guess):
        sources.append(guess)
    if isinstance(tokenizer, (str, os.PathLike)):
        sources.append(tokenizer)
    output = Path(output)
    if to == "gguf":
        from .gguf import export_gguf, is_our_gguf

        if output.suffix != ".gguf":
            raise ValueError(f"output={str(output)!r}: a GGUF export is one file; name it <model>.gguf.")
        if options or dtype is not None or activations is not None:
            extra = sorted(options) + [n for n, v in (("dtype", dtype), ("activations", activations)) if v is not None]
            raise TypeError(f"export() options {extra} apply to to='compressed-tensors', not to='gguf'.")
        writer = OutputFile(output, sources=sources, overwrite=overwrite, is_ours=is_our_gguf, what="output")
        source = load_source(src)
        with writer as tmp:
            report = export_gguf(source, tmp, tokenizer=tokenizer, gguf_type=gguf_type, dense_type=dense_type,
                                 requantize=requantize, progress=progress)  # fmt: skip
        report.output = str(output)
        return report
    if gguf_type is not None or dense_type is not None:
        raise ValueError("gguf_type/dense_type apply to to='gguf' only.")
    from ..hub.push import copy_companion_files
    from .compressed_tensors import export_compressed_tensors

    writer = OutputFolder(output, sources=sources, overwrite=overwrite, kind="export", what="output")
    source = load_source(src)
    with writer as tmp:
        with _bar(progress, len(source.quantized), "compressed-tensors") as bar:
            report = export_compressed_tensors(source, tmp, dtype=_dtype(dtype), activations=activations,
                                               requantize=requantize, progress=bar, **options)  # fmt: skip
        _ship_tokenizer(tokenizer, source, tmp, copy_companion_files)
    report.output = str(output)
    return report


def _bar(progress: bool, total: int, what: str):
    """A context manager giving a tqdm bar (closed on errors too), or ``None`` without ``progress``."""
    if not progress:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"export to {what}", unit="layer")


def _ship_tokenizer(tokenizer, source: ExportSource, tmp: Path, copy_companion_files) -> None:
    if tokenizer is None:
        if source.folder is not None:
            copy_companion_files(source.folder, tmp)
    elif isinstance(tokenizer, (str, os.PathLike)):
        copy_companion_files(Path(tokenizer), tmp)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tmp)
    else:
        raise TypeError(f"tokenizer must be a tokenizer, a folder or None, not {type(tokenizer).__name__}.")
