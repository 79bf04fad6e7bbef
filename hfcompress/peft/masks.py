"""What a compressed module's storage says about its structure: the sparsity mask and the integer grid.

These read the compressed tensors directly (never the decoded weight), so a kept weight whose value
happens to be zero (a 4-bit code equal to the zero point, say) still counts as kept:

* :func:`sparsity_mask` is the structural keep-mask of a sparse module (``bitmask``: the stored bitmask;
  ``nm``: the stored N:M pattern, exactly N slots per group of M), ``None`` for a dense module;
* :func:`base_grid` returns the per-group scales and zero points of a quantized module, the grid a
  merge re-quantizes on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.bitmask import unpack_mask
from ..bitpack import unpack_codes
from ..grid import num_groups
from ..modules import CompressedModule
from ..sparsity.nm_index import nm_groups, patterns_from_ranks, unpack_nm_index

__all__ = ["base_grid", "model_sparsity", "sparsity_mask", "sparsity_masks"]


def _check_module(module: nn.Module) -> CompressedModule:
    if not isinstance(module, CompressedModule):
        raise TypeError(f"module must be an hfcompress CompressedModule, got {type(module).__name__}.")
    if "weight" in module._parameters:
        raise ValueError("This compressed module has not received its weight yet (it is still waiting for the checkpoint).")
    return module


def sparsity_mask(module: nn.Module) -> torch.Tensor | None:
    """Keep-mask ``bool[rows, cols]`` (2-D view of the weight) of a sparse compressed module, else ``None``.

    ``True`` marks a weight the format stores (it may be trained and merged into); ``False`` a pruned
    weight that decodes to exactly zero and must stay zero.
    """
    module = _check_module(module)
    rows, cols = module.shape2d
    tensors = module.compressed_tensors()
    if module.format_name == "bitmask":
        return unpack_mask(tensors["weight_bitmask"], cols)
    if module.format_name == "nm":
        n, m = module.spec.nm
        ranks = unpack_nm_index(tensors["weight_nm_index"], n, m, cols)
        return patterns_from_ranks(ranks, n, m, nm_groups(cols, m) * m)[:, :cols].contiguous()
    if module.spec.sparse:
        raise NotImplementedError(
            f"hfcompress.peft does not know how format {module.format_name!r} stores its sparsity mask; "
            "add a case to hfcompress.peft.masks.sparsity_mask."
        )
    return None


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: keep-mask}`` of every sparse compressed module in ``model`` (PEFT wrappers included)."""
    return {
        name: mask
        for name, module in model.named_modules()
        if isinstance(module, CompressedModule) and (mask := sparsity_mask(module)) is not None
    }


def base_grid(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale [rows, n_groups], zero uint8 [rows, n_groups] or None)`` of a quantized compressed module."""
    module = _check_module(module)
    spec = module.spec
    if not spec.quantized:
        raise ValueError(f"The module stores unquantized values (format {module.format_name!r}); it has no integer grid.")
    tensors = module.compressed_tensors()
    zero = None
    if not spec.symmetric:
        zero = unpack_codes(tensors["weight_zero_point"], spec.bits, num_groups(module.shape2d[1], spec.group_size))
    return tensors["weight_scale"], zero


def model_sparsity(model: nn.Module) -> dict[str, float]:
    """Sparsity of a model's compressed weights, counted from the stored masks (not from decoded zeros).

    Returns ``{"sparse_modules", "weights", "pruned", "sparsity"}``, where ``sparsity`` is the pruned
    fraction over the weights of the sparse modules.
    """
    total = pruned = count = 0
    for mask in sparsity_masks(model).values():
        count += 1
        total += mask.numel()
        pruned += int((~mask).sum())
    return {"sparse_modules": count, "weights": total, "pruned": pruned, "sparsity": pruned / total if total else 0.0}
