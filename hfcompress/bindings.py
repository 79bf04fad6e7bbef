"""What every compressed model carries beyond its modules: transformers' model methods in hfcompress's form, and
the hook that lets PEFT's own calls build hfcompress's LoRA layer.

:func:`install_model_methods` runs on every model hfcompress compresses (``compress``, ``oneshot``) or loads
(``from_pretrained``). It imports neither the Hub layer nor PEFT: each method imports its module when called, and
the hook does nothing until PEFT is imported.
"""

from __future__ import annotations

import importlib
import sys
import types

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from .modules import CompressedLinear, CompressedModule

__all__ = ["MODEL_METHODS", "install_model_methods"]


#: methods every compressed model carries in place of transformers' own: ``{name: "module:function"}``. The
#: module is imported when the method is called, so loading a model loads no card, upload or PEFT code.
MODEL_METHODS = {
    "push_to_hub": "hfcompress.hub.push:push_with_card",
    "add_adapter": "hfcompress.peft.model_methods:add_adapter",
    "load_adapter": "hfcompress.peft.model_methods:load_adapter",
}


def _lazy_method(name: str, target: str):
    module_name, function_name = target.split(":")

    def method(self, *args, **kwargs):
        return getattr(importlib.import_module(module_name), function_name)(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"hfcompress's ``{name}`` for compressed models (``{module_name}.{function_name}``)."
    return method


def install_model_methods(model):
    """Bind hfcompress's versions of transformers' model methods to this model instance (:data:`MODEL_METHODS`).

    * ``model.push_to_hub(repo_id, ...)`` uploads the compressed weights, config *and* the hfcompress model card
      (:func:`hfcompress.hub.push.push_with_card`);
    * ``model.add_adapter(LoraConfig(...))`` and ``model.load_adapter(path)`` put hfcompress's LoRA layer on the
      compressed modules (:mod:`hfcompress.peft.model_methods`).

    Same signatures as transformers'; methods the model class lacks are left out. Idempotent; returns the model.
    """
    _register_peft_hook()
    if getattr(model, "_hfcompress_methods", False):
        return model
    for name, target in MODEL_METHODS.items():
        if callable(getattr(type(model), name, None)):
            setattr(model, name, types.MethodType(_lazy_method(name, target), model))
    model._hfcompress_methods = True
    return model



def _peft_lora_on_compressed(module: nn.Module, name: str, submodule: nn.Module):
    """torch's module-registration hook, the one place PEFT's layers meet hfcompress's compressed modules.

    * PEFT's own ``lora.Linear`` receiving a compressed Linear as its base layer becomes hfcompress's LoRA layer
      (:func:`hfcompress.peft.layer.adopt_peft_linear`): plain ``peft.get_peft_model`` then builds it.
    * Any other PEFT tuner layer (IA3, LoHa, OFT, a LoRA layer of another PEFT release...) being attached around a
      compressed module is refused: its merge would write a decoded copy of the weight and be lost.

    Does nothing until PEFT is imported, and nothing for modules that are not PEFT's.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return None
    if name == "base_layer" and isinstance(submodule, CompressedModule):  # a tuner layer is being built around it
        lora = sys.modules.get("peft.tuners.lora.layer")
        if lora is not None and type(module) is lora.Linear and isinstance(submodule, CompressedLinear):
            from .peft.layer import adopt_peft_linear

            adopt_peft_linear(module, submodule)
        elif isinstance(module, tuners.BaseTunerLayer):
            _refuse_foreign_tuner(module, submodule, "")
    elif isinstance(submodule, tuners.BaseTunerLayer) and isinstance(submodule.get_base_layer(), CompressedModule):
        _refuse_foreign_tuner(submodule, submodule.get_base_layer(), name)  # being attached to the model
    return None


def _refuse_foreign_tuner(layer: nn.Module, base: nn.Module, name: str) -> None:
    from .peft.layer import CompressedLoraLinear

    if not isinstance(layer, CompressedLoraLinear):
        where = f" {name!r}" if name else ""
        raise ValueError(
            f"PEFT is building a {type(layer).__name__} around the compressed module{where} ({type(base).__name__}); "
            "hfcompress supports LoRA (peft.LoraConfig) on compressed Linear modules only. Use a LoraConfig, or leave "
            "this module out of the PEFT config (exclude_modules / target_modules)."
        )


_peft_hook = None


def _register_peft_hook() -> None:
    """Install :func:`_peft_lora_on_compressed` once per process (``torch.nn.modules.module``'s public global hook)."""
    global _peft_hook
    if _peft_hook is None:
        _peft_hook = register_module_module_registration_hook(_peft_lora_on_compressed)
