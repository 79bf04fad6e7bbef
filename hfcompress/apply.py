"""Compressing a model that is already in memory (data-free methods), and marking it as compressed."""

from __future__ import annotations

import torch
from torch import nn

from .config import HfCompressConfig
from .modules import CompressedModule, compressed_twin, set_submodule



def mark_compressed(model: nn.Module, config: HfCompressConfig) -> None:
    """Attach ``config`` and its quantizer so ``save_pretrained``/``push_to_hub`` write the compressed format."""
    from .bindings import install_model_methods
    from .quantizer import HfCompressQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = HfCompressQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            cfg._is_quantized = True
    install_model_methods(model)  # push_to_hub with the card; add_adapter/load_adapter with hfcompress's LoRA layer


def check_compressible(model: nn.Module, config: HfCompressConfig, where: str) -> None:
    """Refuse, before anything changes, what ``compress``/``oneshot`` could not finish: a config that only holds
    loading options, or a model that cannot carry a compressed checkpoint's config (no transformers ``config``)."""
    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an HfCompressConfig, got {type(config).__name__}.")
    if config.is_loading_only:
        raise ValueError(f"HfCompressConfig.loading(...) only carries loading options; {where} needs HfCompressConfig(bits=..., ...).")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}.")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(
            f"{where} needs a transformers model (a PreTrainedModel with .config): the compressed checkpoint stores its "
            f"settings in config.json and reloads with from_pretrained. {type(model).__name__} has no transformers config; "
            "wrap it in a PreTrainedModel (transformers' custom-model docs) to compress it."
        )


@torch.no_grad()
def compress(model: nn.Module, config: HfCompressConfig) -> nn.Module:
    """Compress ``model`` in place with a data-free method (e.g. RTN) and return it.

    Equivalent to loading with ``from_pretrained(..., quantization_config=config)``, for a model that is
    already loaded (a transformers model; plain ``nn.Module`` trees without a transformers config are refused
    up front). The config is checked and every target is compressed before any module is replaced, and a
    failure while replacing puts every original back, so any error leaves the model as it was.
    """
    check_compressible(model, config, "hfcompress.compress")
    if not config.is_data_free:
        raise ValueError(f"method={config.method!r} needs calibration data; use hfcompress.oneshot(model, config, dataset=...).")
    already = [n for n, m in model.named_modules() if isinstance(m, CompressedModule)]
    if already:
        raise ValueError(f"The model is already compressed ({len(already)} modules, e.g. {already[0]!r}); reload the dense model.")
    from .plan.allocation import allocated_config

    config, plan = allocated_config(model, config)  # per-layer sparsity (global/LAMP) pinned in overrides
    twins = {}
    for name, spec in plan.items():
        dense = model.get_submodule(name)
        twin = compressed_twin(dense, spec)
        twin.compress_(dense.weight, method=config.method)
        twins[name] = twin.to(dense.weight.device)
    originals = {name: model.get_submodule(name) for name in twins}
    try:
        for name, twin in twins.items():
            set_submodule(model, name, twin)
        mark_compressed(model, config)
    except BaseException:  # leave the model exactly as it was
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise
    return model
