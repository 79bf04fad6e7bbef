"""`HfCompressQuantizer`: the transformers `HfQuantizer` of ``quant_method="hfcompress"``.

Two paths through ``from_pretrained``:

* **compress on load** (a dense checkpoint plus ``quantization_config=HfCompressConfig(...)``): target
  modules are swapped for compressed twins on the meta device, each waiting for its dense ``weight``;
  as the loader reads a weight, :class:`CompressOnLoad` compresses it on its target device and drops the
  dense tensor, so peak memory stays near the compressed size.
* **reload** (a checkpoint saved by hfcompress): the twins are built from the config and the
  checkpoint's safetensors headers (validated: missing, truncated or misshapen tensors raise a clear
  error before anything is loaded), and the loader fills their buffers as ordinary tensors.

With ``lossless=True`` both paths add a storage stage (:mod:`hfcompress.formats.lossless`): saving codes
every tensor worth it as ``<name>_lossless``, and loading decodes those payloads back to the exact tensors
through a loader converter, before they reach the model (or, with ``lossless_decode="lazy"`` or
``"first_forward"``, keeps plain modules' payloads coded and decodes them at forward time,
:mod:`hfcompress.storage.lazy`). Damaged payloads are collected while loading and raised afterwards as
one :class:`~hfcompress.lossless.LosslessFormatError` naming the tensors.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from .checkpoint import INDEX_NAME, CheckpointError, check_stored_keys, loader_renaming, plain_file_name, read_index, read_tensor_index
from .integrity import checksum_metadata, tensor_record, verify_files
from .formats import lossless as lossless_format
from .storage.loader import METADATA_KEY as LOSSLESS_METADATA_KEY
from .storage.lazy import defer
from .storage.loader import LoadSession, drop_lossless_conversions, lossless_converter, lossless_state_dict
from .config import QUANT_METHOD, HfCompressConfig
from .bindings import install_model_methods
from .modules import CompressedModule, compressed_modules, compressed_twin, set_submodule
from .plan.targets import resolve_layers


class CompressOnLoad(ConversionOps):
    """Loader op: compress one dense ``weight`` into its module as soon as it is read."""

    def __init__(self, hf_quantizer: "HfCompressQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs) -> dict[str, Any]:
        model, full_name = kwargs["model"], kwargs["full_layer_name"]
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        module_name = full_name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        module.compress_(value, method=self.hf_quantizer.quantization_config.method)
        missing = kwargs.get("missing_keys")
        if missing is not None:
            missing.discard(full_name)
        return {}


@register_quantizer(QUANT_METHOD)
class HfCompressQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: HfCompressConfig

    def __init__(self, quantization_config: HfCompressConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        config = self.quantization_config
        if not config.lossless and config.lossless_decode != "load":
            # a loading attribute passed to from_pretrained of a checkpoint without the lossless stage
            warnings.warn(
                f"lossless_decode={config.lossless_decode!r} is ignored: this checkpoint has no lossless stage "
                "(its quantization_config has lossless=False); its weights load as stored.",
                stacklevel=2,
            )
            config.lossless_decode = "load"

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if not self.pre_quantized and config.is_loading_only:
            raise ValueError(
                "HfCompressConfig.loading(...) only carries options for loading a checkpoint saved by hfcompress, and "
                "this checkpoint is not compressed. To compress it, pass HfCompressConfig(bits=..., ...)."
            )
        if not self.pre_quantized and not config.is_data_free:
            raise ValueError(
                f"method={config.method!r} needs calibration data and cannot run inside from_pretrained. Load the "
                "dense model, then call hfcompress.oneshot(model, config, dataset=...)."
            )
        from .plan.allocation import allocation_pending

        if not self.pre_quantized and allocation_pending(config):
            raise ValueError(
                f"method_args['allocation']={config.method_args['allocation']!r} sets each layer's sparsity from all "
                "layers at once and cannot run while from_pretrained streams weights. Load the dense model, then call "
                "hfcompress.oneshot(model, config) (no data needed for 'global'/'lamp')."
            )
        device_map = kwargs.get("device_map")
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "Compressing on load cannot write to disk-offloaded modules (device_map contains 'disk'); compress "
                "first with enough memory, save, then reload the compressed checkpoint with offloading."
            )

    # ------------------------------------------------------------------ model surgery
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs: Any):
        plan = resolve_layers(model, self.quantization_config)
        index = None
        if self.pre_quantized and checkpoint_files:
            files = _checked_files(checkpoint_files, model)
            folder = os.path.dirname(os.path.abspath(files[0]))
            index = read_tensor_index(files, read_index(folder) if os.path.isfile(os.path.join(folder, INDEX_NAME)) else None)
            rename = loader_renaming(model, kwargs.get("key_mapping"))
            # every tensor against its recorded checksum, config.json against the config the tensors were written for
            verify_files(files, self.quantization_config, rename=rename, checksums=self.quantization_config.verify_checksums)
            # lossless payloads: shapes/dtypes from their headers (and an error if the config does not declare them)
            index = lossless_format.resolve_index(index, files, self.quantization_config.lossless)
            self._stored_names = list(index.tensors)
            index = index.renamed_for(model, kwargs.get("key_mapping"))
        twins = {}
        for name, spec in plan.items():
            dense = model.get_submodule(name)
            twin = compressed_twin(dense, spec)
            if self.pre_quantized:
                if index is None:
                    found = {n: (s, d) for n, (s, d) in twin.expected_tensors().items() if None not in s}
                else:
                    found = index.module_tensors(name, model)
                twin.init_empty(found, where=name)
            else:
                weight = dense.weight
                twin.await_dense_weight(dtype or weight.dtype, device=weight.device)
            twins[name] = twin
        for name, twin in twins.items():
            set_submodule(model, name, twin)
        if self.pre_quantized and getattr(self, "_stored_names", None) is not None:
            check_stored_keys(model, self._stored_names, kwargs.get("key_mapping"))
            self._stored_names = None
        self._load_checked = False
        # transformers >= 5.25 kernelizes the model (Hub kernels) between loading and postprocess_model: the loaded
        # tensors are checked, and damaged payloads reported, before that, not after it failed on them
        _run_once_before(model, "set_use_kernels", self._check_loaded)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, CompressedModule) and tensor_name == "weight"

    def get_quantize_ops(self) -> ConversionOps:
        return CompressOnLoad(self)

    def get_new_dtype(self, converter, param, dtype):
        # Compressed tensors keep the dtype they were stored with (scales must not be re-rounded).
        names = getattr(converter, "target_patterns", None) or []
        if any(n.rpartition(".")[2].startswith("weight_") for n in names):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        self._check_loaded(model)
        install_model_methods(model)  # push_to_hub with the card; add_adapter/load_adapter with hfcompress's LoRA layer
        drop_lossless_conversions(model)
        return model

    def _check_loaded(self, model) -> None:
        """Once per load: every compressed module got valid tensors; damaged lossless payloads raise one clear error;
        payloads decoded on first use are deferred."""
        if getattr(self, "_load_checked", False):
            return
        self._load_checked = True
        validate_loaded(model)
        session = getattr(self, "_lossless_session", None)
        if session is not None:
            self._lossless_session = None
            session.raise_errors(getattr(model, "name_or_path", None))  # damaged payloads: one clear error
            if session.deferred:
                defer(model, session.deferred, session.mode)

    # ------------------------------------------------------------------ lossless stage (storage transform)
    def get_weight_conversions(self):
        conversions = list(super().get_weight_conversions())
        if self.pre_quantized and self.quantization_config.lossless:
            if getattr(self, "_lossless_session", None) is None:  # one session per load (this may be asked twice)
                self._lossless_session = LoadSession(mode=self.quantization_config.lossless_decode)
            conversions.append(lossless_converter(self._lossless_session))
        return conversions

    def get_state_dict_and_metadata(self, model):
        """The state dict ``save_pretrained`` writes, with every tensor's checksum and the config stamp in the
        metadata of each shard (see :mod:`hfcompress.integrity`); lossless checkpoints get their payloads."""
        if getattr(model, "_hf_peft_config_loaded", False):
            return super().get_state_dict_and_metadata(model)
        metadata: dict[str, str] = {}
        if self.quantization_config.lossless:
            state_dict = lossless_state_dict(model)
            metadata[LOSSLESS_METADATA_KEY] = "1"
        else:
            state_dict = model.state_dict()
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        records = {name: tensor_record(_materialized(model, name, tensor)) for name, tensor in state_dict.items()}
        metadata.update(checksum_metadata(records, config if isinstance(config, HfCompressConfig) else self.quantization_config))
        return state_dict, metadata

    # ------------------------------------------------------------------ contract
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters (LoRA) train on top of the frozen compressed weights.
        return True


def validate_loaded(model: torch.nn.Module) -> None:
    """Every compressed module must hold real tensors whose recorded shape matches the model."""
    for name, module in compressed_modules(model).items():
        for tensor_name, tensor in module.compressed_tensors().items():
            if tensor.is_meta:
                raise ValueError(f"Compressed tensor {name}.{tensor_name} was not loaded from the checkpoint.")
        shape = tuple(int(s) for s in module.weight_shape_tensor().tolist())
        if shape != module.dense_shape:
            raise ValueError(
                f"{name}.weight_shape records {shape} but the model expects {module.dense_shape}; the checkpoint "
                "belongs to another model."
            )


def _checked_files(files, model=None) -> list[str]:
    """The checkpoint files transformers resolved: plain names in the checkpoint's own folder (an index naming
    ``../other-model/...`` or an absolute path would otherwise make the loader read another model's weights)."""
    files = [os.fspath(f) for f in files]
    for f in files:
        if ".." in f.replace("\\", "/").split("/"):
            raise CheckpointError(f"checkpoint file {f!r} leaves the checkpoint folder ('..'); the index is damaged or crafted.")
        plain_file_name(os.path.basename(f), f"checkpoint file {f}")
    folders = {os.path.dirname(os.path.abspath(f)) for f in files}
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if source and os.path.isdir(source):
        home = os.path.abspath(source)
        outside = sorted(f for f in folders if f != home and not f.startswith(home + os.sep))
        if outside:
            raise CheckpointError(
                f"The checkpoint {source} names weight files outside its folder (in {outside[0]}); the index is damaged "
                "or crafted."
            )
    if len(folders) > 1:
        raise CheckpointError(
            f"The checkpoint's shards lie in {len(folders)} different folders ({sorted(folders)[:2]}); its index names "
            "files outside the checkpoint folder. The index is damaged or crafted."
        )
    return files


def _materialized(model, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with data (parameters offloaded to disk are meta in the state dict and read back here)."""
    if tensor.device.type != "meta":
        return tensor
    from transformers.modeling_utils import load_offloaded_parameter

    return load_offloaded_parameter(model, name)


def _run_once_before(model, method: str, step) -> None:
    """Make the next call of ``model.<method>`` (a method of transformers' model class) run ``step(model)`` first.

    The instance attribute is removed at that call, so the class's own method serves every later one. Nothing
    happens for a class without the method (other transformers releases).
    """
    original = getattr(type(model), method, None)
    if original is None:
        return

    def first(self, *args, **kwargs):
        self.__dict__.pop(method, None)
        step(self)
        return original(self, *args, **kwargs)

    model.__dict__[method] = types.MethodType(first, model)
