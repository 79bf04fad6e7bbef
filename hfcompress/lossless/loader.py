"""transformers glue of the lossless stage: coded tensors are decoded as the loader reads them, and coded on save.

* Loading: :func:`lossless_converter` is a ``WeightConverter`` that maps every stored ``<name>_lossless``
  payload to ``<name>`` and decodes it (:class:`LosslessDecode`), so the model receives ordinary tensors:
  dense parameters, tied embeddings and the buffers of compressed modules alike. A damaged payload fails
  its checksum and the load stops with an error naming the tensor.
* Saving: :func:`lossless_state_dict` is the model's state dict with tied duplicates removed (as
  ``save_pretrained`` would) and every tensor worth it replaced by its payload.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from ..formats import lossless as fmt
from .codec import decode_tensor

#: the loader pattern: a stored name ending with the suffix (it maps to the name without it)
SOURCE_PATTERN = re.escape(fmt.LOSSLESS_SUFFIX) + "$"
#: safetensors metadata key written to every shard of a lossless checkpoint
METADATA_KEY = "hfcompress_lossless"


class LosslessDecode(ConversionOps):
    """Loader op: decode one ``<name>_lossless`` payload into the tensor ``<name>`` (exact bits)."""

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs) -> dict[str, Any]:
        full_name = kwargs["full_layer_name"]
        model = kwargs.get("model")
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        tensor = decode_tensor(value, where=fmt.lossless_key(full_name))
        ref = None
        if model is not None:
            try:
                ref = model.get_parameter_or_buffer(full_name)
            except (AttributeError, KeyError):
                ref = None
        # Like the plain loader, floating tensors take the dtype the model was built with (an exact widening
        # when loading bf16 into float32); compressed buffers were built with the stored dtype and keep it.
        if ref is not None and tensor.is_floating_point() and ref.is_floating_point() and ref.dtype != tensor.dtype:
            tensor = tensor.to(ref.dtype)
        return {full_name: tensor}


def lossless_converter() -> WeightConverter:
    """The loader conversion of lossless checkpoints (decoding runs on CPU, results move to their device)."""
    return WeightConverter(SOURCE_PATTERN, "", [LosslessDecode()], force_cpu=True)


def is_lossless_converter(conversion: Any) -> bool:
    return isinstance(conversion, WeightConverter) and any(isinstance(op, LosslessDecode) for op in conversion.operations)


def drop_lossless_conversions(model: torch.nn.Module) -> None:
    """Forget the lossless converter after loading (it must not be reversed when the model is saved again)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not is_lossless_converter(c)]


def lossless_state_dict(model: torch.nn.Module, threads: int | None = None) -> dict[str, torch.Tensor]:
    """State dict to save: tied duplicates removed, tensors worth it entropy-coded (``<name>_lossless``)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = model.state_dict()
    if hasattr(model, "all_tied_weights_keys"):
        state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    return fmt.encode_state_dict(state_dict, threads=threads)
