"""hfcompress: compress Hugging Face models and keep them first-class transformers checkpoints.

``import hfcompress`` registers ``quant_method="hfcompress"`` with transformers, so compressed checkpoints
reload with plain ``from_pretrained``. That is all it does at import time: the names below load the layer
that defines them on first use, so importing hfcompress loads no method, calibration, Hub, PEFT or export
code it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import HfCompressConfig
from .quantizer import HfCompressQuantizer  # registers the quantizer with transformers
from .spec import LayerSpec

#: public name -> module that defines it (loaded on first access)
_LAZY = {
    "CompressedConv2d": "hfcompress.modules",
    "CompressedEmbedding": "hfcompress.modules",
    "CompressedLinear": "hfcompress.modules",
    "CompressedModule": "hfcompress.modules",
    "available_formats": "hfcompress.formats",
    "available_methods": "hfcompress.algorithms",
    "compress": "hfcompress.apply",
    "compressed_modules": "hfcompress.modules",
    "compression_report": "hfcompress.report",
    "convert_checkpoint": "hfcompress.convert",
    "export": "hfcompress.export",
    "get_format": "hfcompress.formats",
    "get_method": "hfcompress.algorithms",
    "inference_paths": "hfcompress.inference",
    "mark_compressed": "hfcompress.apply",
    "materialize": "hfcompress.storage.lazy",
    "model_card": "hfcompress.hub",
    "oneshot": "hfcompress.oneshot",
    "push_to_hub": "hfcompress.hub",
    "register_format": "hfcompress.formats",
    "register_method": "hfcompress.algorithms",
    "save_compressed": "hfcompress.hub",
    "search_allocation": "hfcompress.search",
    "set_inference_path": "hfcompress.inference",
}

__all__ = [
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedLinear",
    "CompressedModule",
    "HfCompressConfig",
    "HfCompressQuantizer",
    "LayerSpec",
    "__version__",
    "available_formats",
    "available_methods",
    "compress",
    "compressed_modules",
    "compression_report",
    "convert_checkpoint",
    "export",
    "get_format",
    "get_method",
    "inference_paths",
    "mark_compressed",
    "materialize",
    "model_card",
    "oneshot",
    "push_to_hub",
    "register_format",
    "register_method",
    "save_compressed",
    "search_allocation",
    "set_inference_path",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .algorithms import available_methods, get_method, register_method
    from .apply import compress, mark_compressed
    from .convert import convert_checkpoint
    from .export import export
    from .formats import available_formats, get_format, register_format
    from .hub import model_card, push_to_hub, save_compressed
    from .inference import inference_paths, set_inference_path
    from .storage.lazy import materialize
    from .modules import CompressedConv2d, CompressedEmbedding, CompressedLinear, CompressedModule, compressed_modules
    from .oneshot import oneshot
    from .report import compression_report
    from .search import search_allocation


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hfcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
