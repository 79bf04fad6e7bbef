"""Compressing a model that is already in memory (data-free methods), and marking it as compressed."""

from __future__ import annotations

import torch
from torch import nn

from .config import HfCompressConfig
from .modules import CompressedModule, compressed_twin, set_submodule
from .targets import resolve_layers


def mark_compressed(model: nn.Module, config: HfCompressConfig) -> None:
    """Attach ``config`` and its quantizer so ``save_pretrained``/``push_to_hub`` write the compressed format."""
    from .quantizer import HfCompressQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = HfCompressQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            cfg._is_quantized = True
    if hasattr(model, "push_to_hub"):
        from .hub import enable_push_with_card

        enable_push_with_card(model)  # model.push_to_hub uploads the hfcompress model card too


@torch.no_grad()
def compress(model: nn.Module, config: HfCompressConfig) -> nn.Module:
    """Compress ``model`` in place with a data-free method (e.g. RTN) and return it.

    Equivalent to loading with ``from_pretrained(..., quantization_config=config)``, for a model that is
    already loaded. The config is checked and every target is compressed before any module is replaced,
    so a bad config leaves the model untouched.
    """
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an HfCompressConfig, got {type(config).__name__}.")
    if not config.is_data_free:
        raise ValueError(f"method={config.method!r} needs calibration data; use hfcompress.oneshot(model, config, dataset=...).")
    already = [n for n, m in model.named_modules() if isinstance(m, CompressedModule)]
    if already:
        raise ValueError(f"The model is already compressed ({len(already)} modules, e.g. {already[0]!r}); reload the dense model.")
    from .sparsity.allocation import allocated_config

    config, plan = allocated_config(model, config)  # per-layer sparsity (global/LAMP) pinned in overrides
    twins = {}
    for name, spec in plan.items():
        dense = model.get_submodule(name)
        twin = compressed_twin(dense, spec)
        twin.compress_(dense.weight, method=config.method)
        twins[name] = twin.to(dense.weight.device)
    for name, twin in twins.items():
        set_submodule(model, name, twin)
    mark_compressed(model, config)
    return model
