"""The export contract: what every target (compressed-tensors, GGUF) promises and reports.

An export is **exact** when the target's own decoder turns the written tensors into exactly the weights
hfcompress decodes (:meth:`~hfcompress.CompressedModule.dequantize_weight`), bit for bit. A layer whose grid
the target cannot hold is refused with :class:`ExportError` naming the layer, the reason and the nearest
hfcompress setting that exports exactly; ``requantize=True`` instead rounds that layer onto the target's grid
and the :class:`ExportReport` records the error it added.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["ExportError", "ExportReport", "LayerExport", "weight_error"]


class ExportError(ValueError):
    """A model (or one of its layers) the target cannot hold exactly, and ``requantize`` was not asked for."""

    def __init__(self, layer: str, reason: str, fix: str, target: str) -> None:
        self.layer, self.reason, self.fix, self.target = layer, reason, fix, target
        super().__init__(
            f"layer {layer!r} cannot be exported to {target} exactly: {reason}. Fix: {fix}; or pass requantize=True "
            "(CLI: --requantize) to round it onto the target's grid and report the added error."
        )


@dataclass
class LayerExport:
    """How one tensor went into the target: ``exact`` (bit for bit), or re-quantized with the error it added.

    ``rel_error`` is ``||w_target - w_ours|| / ||w_ours||`` (Frobenius) and ``max_abs_error`` the largest
    element difference, both measured against hfcompress's decoded weight; ``0`` for exact layers.
    """

    name: str
    target_name: str
    target_type: str
    exact: bool
    source: str = "compressed"  # "compressed" (our codes) or "dense" (a weight hfcompress kept dense)
    rel_error: float = 0.0
    max_abs_error: float = 0.0
    reason: str = ""


@dataclass
class ExportReport:
    """What :func:`hfcompress.export.export` wrote."""

    target: str
    output: str
    layers: list[LayerExport] = field(default_factory=list)
    nbytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether every compressed layer went in bit for bit (dense layers written in their own dtype count too)."""
        return all(layer.exact for layer in self.layers)

    @property
    def requantized(self) -> list[LayerExport]:
        return [layer for layer in self.layers if not layer.exact]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exact"] = self.exact
        return out

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.target_type] = counts.get(layer.target_type, 0) + 1
        types = ", ".join(f"{n} x {t}" for t, n in sorted(counts.items()))
        head = f"exported to {self.target}: {self.output} ({self.nbytes / 1e6:.1f} MB; {types})"
        if self.exact:
            return head + "; every weight exact"
        worst = max(self.requantized, key=lambda layer: layer.rel_error)
        return head + (
            f"; {len(self.requantized)} tensors re-quantized (worst {worst.name}: relative error {worst.rel_error:.3g})"
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def weight_error(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """``(relative Frobenius error, max abs error)`` of ``theirs`` against ``ours`` (computed in float64)."""
    a, b = ours.double(), theirs.double()
    diff = (b - a).reshape(-1)
    norm = a.norm().item()
    rel = diff.norm().item() / norm if norm > 0 else (0.0 if diff.abs().max().item() == 0 else math.inf)
    return rel, float(diff.abs().max().item()) if diff.numel() else 0.0
