"""What an export reads: a compressed model's integer codes, grids and dense tensors.

:func:`load_source` takes a saved hfcompress folder (loaded with ``from_pretrained``, so checksums are
verified first) or a model in memory, and returns an :class:`ExportSource`: every quantized layer as its
codes, scales and zero points (:class:`QuantizedLayer`), every other tensor of the state dict as it is, and
which names are tied to which.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..modules import CompressedModule, compressed_modules
from ..spec import LayerSpec

__all__ = ["ExportSource", "QuantizedLayer", "load_source"]


@dataclass
class QuantizedLayer:
    """One quantized weight as hfcompress stores it (see :mod:`hfcompress.grid`): ``w = (codes - zero) * scale``."""

    name: str
    kind: str  # "Linear", "Embedding" or "Conv2d"
    spec: LayerSpec
    shape: tuple[int, ...]
    codes: torch.Tensor  # uint8 [rows, cols]
    scale: torch.Tensor  # [rows, n_groups] in spec.scale_dtype
    zero: torch.Tensor | None  # uint8 [rows, n_groups]; None when symmetric (zero = 2**(bits-1))
    module: CompressedModule

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1]

    def zero_points(self) -> torch.Tensor:
        """Zero points ``uint8 [rows, n_groups]``, the implicit ``2**(bits-1)`` of a symmetric grid included."""
        if self.zero is not None:
            return self.zero
        return torch.full(self.scale.shape, 1 << (self.spec.bits - 1), dtype=torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """hfcompress's decoded weight (the reference every exact export reproduces), 2-D ``[rows, cols]``."""
        return self.module.dequantize_weight(dtype).reshape(self.rows, self.cols)


@dataclass
class ExportSource:
    """A compressed model, taken apart for an exporter."""

    model: nn.Module
    folder: Path | None  # the saved folder it came from (tokenizer and companion files), if any
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict)
    #: compressed modules in a format no exporter maps (sparse formats): name -> format name
    other_compressed: dict[str, str] = field(default_factory=dict)
    #: every other state-dict tensor (dense weights, biases, norms), tied copies left out
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    #: state-dict names that share storage with an earlier name (tied weights): alias -> kept name
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    def dense_dtype(self) -> torch.dtype:
        """The floating dtype the model's dense weights are in (the model's own dtype)."""
        for tensor in self.dense.values():
            if tensor.is_floating_point() and tensor.dim() >= 2:
                return tensor.dtype
        return getattr(self.config, "dtype", None) or torch.float32


def _kind(module: CompressedModule) -> str:
    for base in type(module).__mro__:
        if base.__name__ in ("CompressedLinear", "CompressedEmbedding", "CompressedConv2d"):
            return base.__name__.removeprefix("Compressed")
    return type(module).__name__


def from_model(model: nn.Module, folder: str | os.PathLike | None = None) -> ExportSource:
    """Take an in-memory model apart (nothing is copied but the unpacked codes)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model or a saved folder, not {type(model).__name__}.")
    if not hasattr(model, "config"):
        raise TypeError("model has no .config; export takes a transformers PreTrainedModel (or a saved folder).")
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # PEFT is in use only if it was imported
    adapted = [n for n, m in model.named_modules() if tuners is not None and isinstance(m, tuners.BaseTunerLayer)]
    if adapted:
        raise ValueError(
            f"model holds PEFT adapter layers ({adapted[0]!r}, ...); export writes the base model's tensors only. Merge the "
            "adapters first (hfcompress.peft.merge_and_unload(model) or model.merge_and_unload()), then export."
        )
    if folder is None:
        guess = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        folder = guess if guess and os.path.isdir(guess) else None
    source = ExportSource(model=model, folder=Path(folder) if folder is not None else None)
    owned: set[str] = set()
    for name, module in compressed_modules(model).items():
        if any(t.is_meta for t in module._buffers.values() if isinstance(t, torch.Tensor)):
            raise ValueError(f"layer {name!r} has no data (meta tensors); load the model fully before exporting.")
        for buf in module._compressed_names:
            owned.add(f"{name}.{buf}")
        if module.format_name != "packed":
            source.other_compressed[name] = module.format_name
            continue
        tensors = {n: t for n, t in module.compressed_tensors().items() if n != "weight_shape"}
        codes, scale, zero = module.format.unpack(tensors, module.spec, module.shape2d)
        source.quantized[name] = QuantizedLayer(
            name=name, kind=_kind(module), spec=module.spec, shape=module.dense_shape,
            codes=codes, scale=scale, zero=zero, module=module,
        )  # fmt: skip
    seen: dict[tuple[int, int, tuple, torch.dtype], str] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if key in owned:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in seen:
            source.tied[key] = seen[ident]
            continue
        seen[ident] = key
        source.dense[key] = tensor
    # a compressed module tied to another (e.g. a quantized embedding shared with the output head) shows up as
    # the same module under two names; those names alias the first
    by_id: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedModule):
            first = by_id.setdefault(id(module), name)
            if first != name:
                source.tied[f"{name}.weight"] = f"{first}.weight"
    return source


def load_source(src, folder: str | os.PathLike | None = None) -> ExportSource:
    """An :class:`ExportSource` from a saved hfcompress folder (path) or a model in memory."""
    if isinstance(src, nn.Module):
        return from_model(src, folder)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a saved model folder (path) or a model, not {type(src).__name__}.")
    path = Path(src)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"src={str(src)!r} is not a model folder (no config.json); pass a folder saved by hfcompress.")
    import transformers  # hfcompress's import registered quant_method="hfcompress" with it

    cfg = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if "CausalLM" in str(arch) else transformers.AutoModel
    model = cls.from_pretrained(path, dtype="auto")
    model.eval()
    return from_model(model, path)
