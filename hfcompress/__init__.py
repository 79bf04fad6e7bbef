"""hfcompress: compress Hugging Face models and keep them first-class transformers checkpoints.

``import hfcompress`` registers ``quant_method="hfcompress"`` with transformers, so compressed
checkpoints reload with plain ``from_pretrained``.
"""

from .algorithms import available_methods, get_method, register_method
from .apply import compress, mark_compressed
from .config import HfCompressConfig
from .convert import convert_checkpoint
from .formats import available_formats, get_format, register_format
from .hub import model_card, push_to_hub, save_compressed
from .kernels import inference_paths, set_inference_path
from .oneshot import oneshot
from .modules import CompressedConv2d, CompressedEmbedding, CompressedLinear, CompressedModule, compressed_modules
from .quantizer import HfCompressQuantizer
from .report import compression_report
from .spec import LayerSpec

__version__ = "0.1.0"

__all__ = [
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedLinear",
    "CompressedModule",
    "HfCompressConfig",
    "HfCompressQuantizer",
    "LayerSpec",
    "available_formats",
    "available_methods",
    "compress",
    "compressed_modules",
    "compression_report",
    "convert_checkpoint",
    "get_format",
    "get_method",
    "inference_paths",
    "mark_compressed",
    "model_card",
    "oneshot",
    "push_to_hub",
    "register_format",
    "register_method",
    "save_compressed",
    "set_inference_path",
]
