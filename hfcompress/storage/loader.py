"""transformers glue of the lossless stage: coded tensors are decoded as the loader reads them, and coded on save.

* Loading: :func:`lossless_converter` is a ``WeightConverter`` that maps every stored ``<name>_lossless``
  payload to ``<name>`` and decodes it (:class:`LosslessDecode`), so the model receives ordinary tensors:
  dense parameters, tied embeddings and the buffers of compressed modules alike; with
  ``lossless_decode="lazy"``/``"first_forward"`` plain modules' payloads are verified and kept coded
  (:mod:`hfcompress.storage.lazy`). A damaged payload fails its checksum; the :class:`LoadSession` collects
  every such tensor and ``from_pretrained`` stops with a :class:`LosslessFormatError` naming them.
* Saving: :func:`lossless_state_dict` is the model's state dict with tied duplicates removed (as
  ``save_pretrained`` would) and every tensor worth it replaced by its payload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from ..formats import lossless as fmt
from ..lossless.codec import LosslessFormatError, decode_tensor, read_info, verify_payload
from .lazy import keep_coded, placeholder

#: the loader pattern: a stored name ending with the suffix (it maps to the name without it)
SOURCE_PATTERN = re.escape(fmt.LOSSLESS_SUFFIX) + "$"
#: safetensors metadata key written to every shard of a lossless checkpoint
METADATA_KEY = "hfcompress_lossless"


@dataclass
class LoadSession:
    """What one ``from_pretrained`` of a lossless checkpoint collects while the loader runs.

    ``mode`` is ``HfCompressConfig.lossless_decode``; ``deferred`` maps model tensor names to ``(payload,
    stored name)`` left coded by the deferred modes; ``errors`` maps stored names to the damage found, raised
    together by :meth:`raise_errors` once loading is over (transformers would otherwise fold them into a
    generic conversion error).
    """

    mode: str = "load"
    deferred: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)
    errors: dict[str, LosslessFormatError] = field(default_factory=dict)

    def __deepcopy__(self, memo) -> "LoadSession":
        return self  # transformers deep-copies converters per tensor; they must all report to this one session

    def raise_errors(self, source: str | None = None) -> None:
        if not self.errors:
            return
        names = sorted(self.errors)
        where = f" in {source}" if source else ""
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        first = self.errors[names[0]]
        raise LosslessFormatError(
            f"{len(names)} lossless tensor(s){where} are damaged (checksum mismatch or truncated data): {listed}. "
            f"First error: {first} (From the Hub: from_pretrained(..., force_download=True); a local twin: run "
            "hfcompress.convert_checkpoint on its source again.)"
        ) from first


class LosslessDecode(ConversionOps):
    """Loader op: decode one ``<name>_lossless`` payload into the tensor ``<name>`` (exact bits).

    With a :class:`LoadSession` in a deferred mode, tensors of plain modules are verified (checksums) and left
    coded: the op returns a placeholder and records the payload for :func:`hfcompress.storage.lazy.defer`.
    Damage is recorded in the session (the tensor is left out) instead of raised, when there is a session.
    """

    def __init__(self, session: LoadSession | None = None) -> None:
        self.session = session

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs) -> dict[str, Any]:
        full_name = kwargs["full_layer_name"]
        model = kwargs.get("model")
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        where = fmt.lossless_key(full_name)
        ref = None
        if model is not None:
            try:
                ref = model.get_parameter_or_buffer(full_name)
            except (AttributeError, KeyError):
                ref = None
        try:
            # the shape and dtype the payload declares are checked against the model before anything is decoded
            declared = read_info(value, where=where)
            if ref is not None and tuple(declared.shape) != tuple(ref.shape):
                raise LosslessFormatError(
                    f"{where}: the payload declares shape {list(declared.shape)} but the model's {full_name} has shape "
                    f"{list(ref.shape)}; the checkpoint does not belong to this model."
                )
            if ref is not None and declared.dtype.is_floating_point != ref.is_floating_point():
                raise LosslessFormatError(f"{where}: the payload holds {declared.dtype} but the model's {full_name} is {ref.dtype}.")
            if self.session is not None and self.session.mode != "load" and _deferrable(model, full_name):
                info = verify_payload(value, where=where)
                dtype = info.dtype
                if ref is not None and dtype.is_floating_point and ref.is_floating_point():
                    dtype = ref.dtype
                # kept as read: memory-mapped from the checkpoint file like a plain model's weights (page cache,
                # shared and reclaimable), else a copy in memory
                self.session.deferred[full_name] = (value.detach(), where)
                return {full_name: placeholder(info.shape, dtype)}
            tensor = decode_tensor(value, where=where)
        except LosslessFormatError as exc:
            if self.session is None:
                raise
            self.session.errors[where] = exc
            missing = kwargs.get("missing_keys")
            if missing is not None:
                missing.discard(full_name)  # reported by LoadSession.raise_errors, not as a freshly initialised weight
            return {}
        # Like the plain loader, floating tensors take the dtype the model was built with (an exact widening
        # when loading bf16 into float32); compressed buffers were built with the stored dtype and keep it.
        if ref is not None and tensor.is_floating_point() and ref.is_floating_point() and ref.dtype != tensor.dtype:
            tensor = tensor.to(ref.dtype)
        return {full_name: tensor}


def _deferrable(model, full_name: str) -> bool:
    """Deferred decoding applies to tensors of plain modules (compressed modules prepare kernels from theirs)."""
    if model is None:
        return False
    from ..modules import CompressedModule

    module_name = full_name.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    return not isinstance(module, CompressedModule)


def lossless_converter(session: LoadSession | None = None) -> WeightConverter:
    """The loader conversion of lossless checkpoints (decoding runs on CPU, results move to their device)."""
    return WeightConverter(SOURCE_PATTERN, "", [LosslessDecode(session)], force_cpu=True)


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

    with keep_coded() as precoded:  # lazily loaded tensors are written as the payloads they were loaded from
        state_dict = model.state_dict()
    if hasattr(model, "all_tied_weights_keys"):
        state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    # copies: a deferred payload may be mapped from the very file save_pretrained is about to overwrite
    precoded = {k: v.clone() for k, v in precoded.items()}
    return fmt.encode_state_dict(state_dict, threads=threads, precoded=precoded)
