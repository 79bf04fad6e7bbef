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
    "resize_token_embeddings": "hfcompress.bindings:resize_token_embeddings",
}


def _lazy_method(name: str, target: str):
    module_name, function_name = target.split(":")

    def method(self, *args, **kwargs):
        return getattr(importlib.import_module(module_name), function_name)(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"hfcompress's ``{name}`` for compressed models (``{module_name}.{function_name}``)."
    method._hfcompress = True
    return method


def install_model_methods(model):
    """Bind hfcompress's versions of transformers' model methods to this model instance (:data:`MODEL_METHODS`).

    * ``model.push_to_hub(repo_id, ...)`` uploads the compressed weights, config *and* the hfcompress model card
      (:func:`hfcompress.hub.push.push_with_card`);
    * ``model.add_adapter(LoraConfig(...))`` and ``model.load_adapter(path)`` put hfcompress's LoRA layer on the
      compressed modules (:mod:`hfcompress.peft.model_methods`);
    * ``model.resize_token_embeddings`` refuses to resize a compressed embedding or head (:func:`resize_token_embeddings`).

    Same signatures as transformers'; methods the model class lacks are left out. Idempotent; returns the model.
    """
    for name, target in MODEL_METHODS.items():
        bound = model.__dict__.get(name)
        if callable(getattr(type(model), name, None)) and not getattr(bound, "_hfcompress", False):
            setattr(model, name, types.MethodType(_lazy_method(name, target), model))
    return model


def resize_token_embeddings(model, *args, **kwargs):
    """transformers' ``resize_token_embeddings``, refused when the embedding or the output head is compressed.

    Resizing builds a new dense table from the decoded one and leaves ``quantization_config`` describing a
    compressed module that is no longer there, so the saved checkpoint would not load.
    """
    for kind, get in (("input embedding", "get_input_embeddings"), ("output head", "get_output_embeddings")):
        try:
            module = getattr(model, get)()
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, CompressedModule):
            raise ValueError(
                f"resize_token_embeddings: the model's {kind} is compressed ({type(module).__name__}); resize the dense "
                "model before compressing it (or keep the embeddings out of the targets)."
            )
    return type(model).resize_token_embeddings(model, *args, **kwargs)


def _peft_lora_on_compressed(module: nn.Module, name: str, submodule: nn.Module):
    """torch's module-registration hook, the one place PEFT's layers meet hfcompress's compressed modules.

    * PEFT's own ``lora.Linear`` receiving a compressed Linear as its base layer becomes hfcompress's LoRA layer
      (:func:`hfcompress.peft.layer.adopt_peft_linear`): plain ``peft.get_peft_model`` then builds it.
    * Any other PEFT layer being built around a compressed module (IA3, LoHa, OFT, ...; ``modules_to_save``'s
      trainable copy) is refused: its training and merges would change a decoded copy of the weight, and be lost.

    Does nothing until PEFT is imported, and nothing for modules that are not PEFT's.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None or not isinstance(submodule, nn.Module):
        return None
    if isinstance(submodule, CompressedModule) and name in ("base_layer", "original_module"):  # a PEFT layer is being built around it
        lora = sys.modules.get("peft.tuners.lora.layer")
        if name == "base_layer" and lora is not None and type(module) is lora.Linear and isinstance(submodule, CompressedLinear):
            from .peft.layer import adopt_peft_linear

            adopt_peft_linear(module, submodule)
        elif isinstance(module, tuners.BaseTunerLayer) or _is_peft_wrapper(module):
            _refuse_foreign(module, submodule, "")
    elif isinstance(submodule, tuners.BaseTunerLayer) and isinstance(submodule.get_base_layer(), CompressedModule):
        _refuse_foreign(submodule, submodule.get_base_layer(), name)  # being attached to the model
    return None


def _is_peft_wrapper(module: nn.Module) -> bool:
    """PEFT's trainable copies (``modules_to_save``, trainable tokens) around a module."""
    other = sys.modules.get("peft.utils.other")
    wrapper = getattr(other, "AuxiliaryTrainingWrapper", None)
    return wrapper is not None and isinstance(module, wrapper)


def _refuse_foreign(layer: nn.Module, base: nn.Module, name: str) -> None:
    from .peft.layer import CompressedLoraLinear

    if isinstance(layer, CompressedLoraLinear):
        return
    kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
    where = f" {name!r}" if name else ""
    raise ValueError(
        f"PEFT is building a {kind} around the compressed module{where} ({type(base).__name__}); hfcompress supports "
        "LoRA (peft.LoraConfig) on compressed Linear modules, not other PEFT methods or modules_to_save on them. Leave "
        "this module out of the PEFT config (target_modules / exclude_modules / modules_to_save). PEFT may already have "
        "wrapped the modules it reached before this one: reload the model before trying again."
    )


# installed when hfcompress is imported: every process that holds a compressed module (loaded, compressed, or
# unpickled) has imported hfcompress, so PEFT always meets the hook. It costs a dictionary lookup per registration.
register_module_module_registration_hook(_peft_lora_on_compressed)
