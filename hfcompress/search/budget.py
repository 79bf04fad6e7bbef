"""Size budgets and the bytes a compressed checkpoint stores, counted exactly.

A budget names what the *whole* checkpoint may weigh, every stored tensor included (compressed codes,
scales and zero points, the weight-shape records, biases, norms, embeddings and heads left dense):

* ``"3.5bits"``: an average of 3.5 bits per weight over all the model's parameters;
* ``"120MB"`` / ``"0.5GiB"`` / an ``int``: bytes;
* a ``float`` in ``(0, 1]``: that fraction of the model's bf16 size (2 bytes per parameter).

:func:`stored_bytes` gives what a module stores at a :class:`~hfcompress.spec.LayerSpec`, computed from the
format's own tensor list (the same one loading validates), so the sum is what ``save_pretrained`` writes
(safetensors headers and the JSON files aside).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import format_for, get_format
from ..spec import LayerSpec

__all__ = ["Budget", "ModelBytes", "model_bytes", "parse_budget", "stored_bytes"]

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_BITS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*BITS?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def stored_bytes(spec: LayerSpec, shape: tuple[int, ...], bias_bytes: int = 0) -> int:
    """Bytes a compressed module of weight ``shape`` stores at ``spec`` (its format's tensors, the int64 shape
    record, and ``bias_bytes`` for a bias kept as it is)."""
    rows, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
    tensors = get_format(format_for(spec)).expected_tensors((rows, cols), spec)
    total = 8 * len(shape) + bias_bytes  # weight_shape
    for name, (dims, dtype) in tensors.items():
        if any(d is None for d in dims):
            raise ValueError(f"format {format_for(spec)!r} stores {name} with a data-dependent size; it has no fixed cost.")
        total += math.prod(dims) * torch.empty((), dtype=dtype).element_size()
    return total


@dataclass(frozen=True)
class ModelBytes:
    """The parts of a model's size that a budget search needs.

    ``fixed``: bytes of every tensor the search does not choose (dense tensors at their stored dtype, biases of
    the searched modules), each tied tensor once; ``params``: parameters of the whole model (each tied tensor
    once), the denominator of ``"bits"`` budgets; ``shapes``: the weight shape of each searched module.
    """

    fixed: int
    params: int
    shapes: dict[str, tuple[int, ...]]

    @property
    def bf16(self) -> int:
        return 2 * self.params


def model_bytes(model: nn.Module, searched: list[str], dtype: torch.dtype | None = None) -> ModelBytes:
    """Account for ``model`` whose modules ``searched`` (dense ``nn.Linear``-like modules) get compressed.

    Dense tensors count at ``dtype`` (default: the checkpoint's ``config.dtype``, else their own dtype), as
    ``save_pretrained`` writes them from a model loaded in that dtype.
    """
    if dtype is None:
        dtype = getattr(getattr(model, "config", None), "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
    weights = {f"{name}.weight" for name in searched}
    seen: set[tuple[int, int, tuple]] = set()
    fixed = params = 0
    for key, tensor in model.state_dict(keep_vars=True).items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue  # tied: stored once
        seen.add(ident)
        if isinstance(tensor, nn.Parameter) or key in weights:
            params += tensor.numel()
        if key in weights:
            continue
        size = (dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype)
        fixed += tensor.numel() * torch.empty((), dtype=size).element_size()
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in searched}
    return ModelBytes(fixed=fixed, params=params, shapes=shapes)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: ``text`` as given, ``nbytes`` the whole checkpoint may store."""

    text: str
    nbytes: int

    def bits_per_weight(self, sizes: ModelBytes) -> float:
        return 8 * self.nbytes / sizes.params


def parse_budget(budget: str | int | float, sizes: ModelBytes) -> Budget:
    """``"3.5bits"``, ``"120MB"``, bytes (``int``) or a fraction of bf16 (``float`` in ``(0, 1]``) -> :class:`Budget`."""
    if isinstance(budget, bool):
        raise TypeError(f"budget={budget!r} must be e.g. '3.5bits', '120MB', 120_000_000 (bytes) or 0.3 (of bf16).")
    if isinstance(budget, int):
        nbytes = budget
    elif isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"budget={budget!r}: a float is a fraction of the bf16 size, in (0, 1]; e.g. 0.3.")
        nbytes = int(budget * sizes.bf16)
    elif isinstance(budget, str) and (m := _BITS.match(budget)):
        nbytes = int(float(m.group(1)) * sizes.params / 8)
    elif isinstance(budget, str) and (m := _SIZE.match(budget)):
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ValueError(f"budget={budget!r} is not a budget; use e.g. '3.5bits', '120MB', '0.5GiB', bytes or 0.3 (of bf16).")
    if nbytes <= sizes.fixed:
        raise ValueError(
            f"budget={budget!r} ({nbytes} bytes) does not even hold the tensors that stay dense ({sizes.fixed} bytes); "
            "raise the budget, or let the config target more modules (targets; a tied embedding is not searched yet)."
        )
    return Budget(text=str(budget), nbytes=nbytes)
