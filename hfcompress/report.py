"""Byte accounting: what each compressed module stores, and the model's total against dense bf16."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .modules import compressed_modules


@dataclass
class LayerReport:
    name: str
    format: str
    shape: tuple[int, ...]
    bits: int | None
    group_size: int | None
    sparsity: float
    nbytes: int
    bits_per_weight: float
    #: bytes of each stored tensor (``weight_values``, ``weight_bitmask``, ``weight_packed``, ``weight_scale``...)
    tensors: dict[str, int] = field(default_factory=dict)


def compression_report(model: nn.Module) -> dict:
    """Per-layer format, settings and bytes, plus totals (compressed layers, everything else, all).

    ``bits_per_weight`` counts every stored byte of the layer (codes, scales, zero points, masks);
    ``tensors`` breaks a layer's bytes down by stored tensor.
    """
    layers = []
    compressed_param_ids = set()
    for name, module in compressed_modules(model).items():
        numel = 1
        for s in module.dense_shape:
            numel *= s
        nbytes = module.compressed_nbytes()
        layers.append(
            LayerReport(
                name=name,
                format=module.format_name,
                shape=module.dense_shape,
                bits=module.spec.bits,
                group_size=module.spec.group_size,
                sparsity=module.spec.effective_sparsity,
                nbytes=nbytes,
                bits_per_weight=8 * nbytes / numel,
                tensors={k: t.numel() * t.element_size() for k, t in module.compressed_tensors().items()},
            )
        )
        compressed_param_ids.update(id(t) for t in module.compressed_tensors().values())
    seen = set()
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in compressed_param_ids or id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
    compressed = sum(layer.nbytes for layer in layers)
    return {
        "layers": [asdict(layer) for layer in layers],
        "compressed_bytes": compressed,
        "other_bytes": other,
        "total_bytes": compressed + other,
    }
