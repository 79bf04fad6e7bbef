"""Merging a dense update into a compressed module without changing its structure.

A merge computes the target weight ``W + ΔW`` (ΔW already masked for a sparse base, see
:mod:`hfcompress.peft.layer`) and writes it back in the module's own format:

* sparse, unquantized (``bitmask``/``nm`` values): the kept values become ``(W + ΔW)[mask]`` rounded to the
  dtype the values are stored in; pruned weights stay pruned, the mask is bit-identical;
* quantized (``packed``, or sparse with codes): the codes are re-chosen by round-to-nearest on the
  **base's grid** (its per-group scales and zero points, as SQFT's QA-SparsePEFT does), so scales, zero
  points and mask are unchanged and only codes move; ``grid="refit"`` recomputes the grid from the
  merged weight instead (round-to-nearest, same bits/group size).

Every merge returns a :class:`LayerMergeReport` with the error between the weight the merged module
decodes to and the exact target, so a lossy re-quantization is never silent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..formats.base import CompressedWeight
from ..grid import QuantizedWeight, compute_qparams, dequantize, expand_groups, quantize, scale_torch_dtype
from ..modules import CompressedModule
from .masks import base_grid, sparsity_mask

__all__ = ["GRIDS", "LayerMergeReport", "MergeReport", "merge_into", "project_to_base", "stored_value_dtype"]

#: how a merge into a quantized base picks its grid
GRIDS = ("base", "refit")


def stored_value_dtype(module: CompressedModule) -> torch.dtype:
    """The floating dtype an unquantized sparse module stores its kept values in."""
    values = module.compressed_tensors().get("weight_values")
    if values is not None:
        return values.dtype
    return module.value_dtype or torch.float32


def project_to_base(
    module: CompressedModule, weight: torch.Tensor, mask: torch.Tensor | None, straight_through: bool = False
) -> torch.Tensor:
    """The weight ``module`` would decode to if it stored ``weight`` (2-D, float32) on its own grid.

    Quantized modules: round-to-nearest on the stored scales/zero points, pruned weights zeroed.
    Unquantized sparse modules: the value dtype's rounding, pruned weights zeroed. With
    ``straight_through`` the rounding is invisible to autograd (the straight-through estimator), which
    is how quantization-aware LoRA trains through the base grid.
    """
    w = weight.float()
    spec = module.spec
    if spec.quantized:
        scale, zero = base_grid(module)
        rounded = dequantize(quantize(w.detach(), scale, zero, spec.bits, spec.group_size), scale, zero, spec.bits, spec.group_size)
    else:
        rounded = w.detach().to(stored_value_dtype(module)).float()
    out = w + (rounded - w.detach()) if straight_through else rounded
    return out * mask if mask is not None else out


@dataclass
class LayerMergeReport:
    """What one merge did to one compressed module (errors relative to the exact ``W + ΔW``)."""

    name: str
    format: str
    bits: int | None
    adapters: list[str]
    grid: str
    mask_preserved: bool
    sparsity: float
    max_abs_error: float
    rel_error: float  # ||decoded - target||_F / ||target||_F
    clipped: float  # fraction of kept weights that fell outside the grid's range and were clamped

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MergeReport:
    """Per-layer merge reports of a whole model, with the summary figures users look at first."""

    layers: list[LayerMergeReport] = field(default_factory=list)

    @property
    def masks_preserved(self) -> bool:
        return all(r.mask_preserved for r in self.layers)

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.layers), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        return sum(r.rel_error for r in self.layers) / len(self.layers) if self.layers else 0.0

    def to_dict(self) -> dict:
        return {
            "masks_preserved": self.masks_preserved,
            "max_rel_error": self.max_rel_error,
            "mean_rel_error": self.mean_rel_error,
            "layers": [r.to_dict() for r in self.layers],
        }

    def __str__(self) -> str:
        lines = [
            f"merged {len(self.layers)} compressed layers: masks preserved: {self.masks_preserved}, "
            f"re-quantization error (relative Frobenius) mean {self.mean_rel_error:.3g}, max {self.max_rel_error:.3g}"
        ]
        worst = sorted(self.layers, key=lambda r: -r.rel_error)[:5]
        for r in worst:
            bits = f"{r.bits}-bit" if r.bits else "float"
            lines.append(
                f"  {r.name}: {r.format} {bits}, sparsity {r.sparsity:.3f}, rel error {r.rel_error:.3g}, "
                f"max |err| {r.max_abs_error:.3g}, clipped {r.clipped:.2%}"
            )
        return "\n".join(lines)


def _grid_for(module: CompressedModule, target: torch.Tensor, mask: torch.Tensor | None, grid: str):
    spec = module.spec
    if grid == "base":
        return base_grid(module)
    kept = target if mask is None else target * mask
    return compute_qparams(kept, spec.bits, spec.group_size, spec.symmetric, scale_torch_dtype(spec.scale_dtype), clip=spec.clip)


@torch.no_grad()
def merge_into(
    module: CompressedModule,
    target: torch.Tensor,
    *,
    name: str = "",
    adapters: list[str] | None = None,
    grid: str = "base",
    safe: bool = False,
) -> LayerMergeReport:
    """Store the dense 2-D ``target`` (float32) in ``module``'s format, keeping its mask; returns the report.

    ``target`` must already be zero where the module is pruned (the merge never revives a pruned weight;
    an unmasked update is masked here and the dropped part shows up in the reported error). With
    ``safe=True`` a non-finite target raises before the module is touched.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not supported; use one of {GRIDS}.")
    spec = module.spec
    if tuple(target.shape) != module.shape2d:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected the module's 2-D weight shape {module.shape2d}.")
    target = target.float()
    if safe and not bool(torch.isfinite(target).all()):
        raise ValueError(f"NaN/Inf in the merged weight of {name or 'the module'}; the adapter is broken, nothing was merged.")
    mask = sparsity_mask(module)
    device = next(iter(module.compressed_tensors().values())).device
    target = target.to(device)
    exact = target
    clipped = 0.0
    if spec.quantized:
        scale, zero = _grid_for(module, target, mask, grid)
        kept = target if mask is None else target * mask
        codes = quantize(kept, scale, zero, spec.bits, spec.group_size)
        decoded = dequantize(codes, scale, zero, spec.bits, spec.group_size)
        if mask is not None:
            decoded = decoded * mask
        # a kept weight is clipped when it lies further than half a step from its (clamped) code
        half_step = expand_groups(scale.float(), target.shape[1], spec.group_size) * (0.5 * (1 + 1e-6))
        over = (decoded - kept).abs() > half_step
        if mask is not None:
            over = over & mask
        n_kept = int(mask.sum()) if mask is not None else codes.numel()
        clipped = float(over.sum()) / max(1, n_kept)
        quantized = QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=spec.bits, group_size=spec.group_size)
        cw = CompressedWeight(weight=decoded, quantized=quantized, mask=mask)
    else:
        if mask is None:
            raise ValueError(f"{name or 'module'} stores neither codes nor a sparsity mask; nothing hfcompress can merge into.")
        dtype = stored_value_dtype(module)
        decoded = (target * mask).to(dtype).float()
        cw = CompressedWeight(weight=decoded, mask=mask, dtype=dtype)
    module.set_compressed_weight(cw)
    after = sparsity_mask(module)
    preserved = (mask is None and after is None) or (mask is not None and after is not None and torch.equal(mask, after))
    err = decoded - exact
    norm = float(exact.norm())
    return LayerMergeReport(
        name=name,
        format=module.format_name,
        bits=spec.bits,
        adapters=list(adapters or []),
        grid=grid if spec.quantized else "values",
        mask_preserved=bool(preserved),
        sparsity=0.0 if mask is None else float((~mask).float().mean()),
        max_abs_error=float(err.abs().max()) if err.numel() else 0.0,
        rel_error=float(err.norm()) / norm if norm > 0 else float(err.norm()),
        clipped=clipped,
    )
