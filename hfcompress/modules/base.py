"""`CompressedModule`: the shared machinery of modules that hold a compressed weight.

The compressed tensors are registered as persistent buffers named as the format names them
(``weight_packed``, ``weight_scale``, ...), so ``state_dict``/``save_pretrained`` write them as they are
and ``from_pretrained`` loads them back. ``weight_shape`` (int64) records the original weight shape.
Reading ``module.weight`` returns the decoded dense weight, for code that inspects it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..algorithms import get_method
from ..formats import format_for, get_format
from ..formats.base import CompressedWeight, TensorSpec, check_tensors
from ..kernels.select import dispatch as _dispatch_inference
from ..spec import LayerSpec

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class CompressedModule(nn.Module):
    """Base class; subclasses define the forward of one module type (Linear, Conv2d, Embedding)."""

    #: the nn.Module class this module replaces
    dense_cls: type[nn.Module] = nn.Module

    def __init__(self, spec: LayerSpec, weight_shape: tuple[int, ...]) -> None:
        nn.Module.__init__(self)  # not the dense class's __init__ (CompressedLinear is an nn.Linear): no dense weight
        self.spec = spec
        self.format_name = format_for(spec)
        self.dense_shape = tuple(int(s) for s in weight_shape)
        self._compressed_names: tuple[str, ...] = ()
        #: floating dtype of the dense weight this module replaces: sparse formats keep unquantized values in it
        self.value_dtype: torch.dtype | None = None
        #: the prepared inference path (:mod:`hfcompress.kernels`), built at the first forward or by
        #: ``hfcompress.set_inference_path``; ``_inference_request`` is what was asked for (``None``: the default)
        self._inference_state = None
        self._inference_request = None
        self._register_state_dict_hook(_state_dict_with_released)
        self._register_load_state_dict_pre_hook(_reset_before_load, with_module=True)

    # ------------------------------------------------------------------ geometry
    @property
    def shape2d(self) -> tuple[int, int]:
        return self.dense_shape[0], math.prod(self.dense_shape[1:])

    @property
    def format(self):
        return get_format(self.format_name)

    def expected_tensors(self) -> dict[str, TensorSpec]:
        expected = dict(self.format.expected_tensors(self.shape2d, self.spec))
        expected["weight_shape"] = ((len(self.dense_shape),), torch.int64)
        return expected

    # ------------------------------------------------------------------ state
    def set_compressed(self, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        """Install the compressed tensors (validated against the format) as buffers."""
        tensors = dict(tensors)
        tensors.setdefault("weight_shape", torch.tensor(self.dense_shape, dtype=torch.int64))
        self._inference_state = None  # a prepared path belongs to the tensors being replaced
        check_tensors(
            {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, self.expected_tensors(), where, self.format_name,
            max_numel=math.prod(self.shape2d),
        )
        for name in self._compressed_names:
            self._buffers.pop(name, None)
        self._parameters.pop("weight", None)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=True)
        self._compressed_names = tuple(tensors)

    def init_empty(self, found: dict[str, TensorSpec], where: str = "", device: str | torch.device = "meta") -> None:
        """Create empty buffers with the shapes/dtypes ``found`` in a checkpoint header, after validating them."""
        found = {n: v for n, v in found.items() if n not in self._parameters}  # e.g. the bias is a plain parameter
        expected = self.expected_tensors()
        check_tensors(found, expected, where, self.format_name, max_numel=math.prod(self.shape2d))
        extra = sorted(n for n in found if n not in expected and n not in self._buffers and n not in self._modules)
        if extra:
            key = f"{where}.{extra[0]}" if where else extra[0]
            raise ValueError(
                f"Compressed tensor {key!r} is stored but format {self.format_name!r} with this module's settings "
                f"({self.extra_repr()}) has no such tensor; config.json's quantization_config does not describe "
                "these weights (e.g. 'symmetric' edited). Loading would ignore it and decode wrong weights."
            )
        self.set_compressed({n: torch.empty(s, dtype=d, device=device) for n, (s, d) in found.items()}, where)

    def await_dense_weight(self, dtype: torch.dtype, device: str | torch.device = "meta") -> None:
        """Expose a placeholder ``weight`` parameter so a dense checkpoint can be loaded and compressed."""
        self._parameters["weight"] = nn.Parameter(torch.empty(self.dense_shape, dtype=dtype, device=device), requires_grad=False)

    def compress_(self, weight: torch.Tensor, method: str = "rtn") -> None:
        """Compress a dense weight with a data-free ``method`` and install the result."""
        if tuple(weight.shape) != self.dense_shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {self.dense_shape}.")
        algo = get_method(method)
        if not algo.data_free:
            raise ValueError(f"method={method!r} needs calibration data; run hfcompress.oneshot(model, config, dataset=...).")
        cw = algo.compress(weight.detach().reshape(self.shape2d).float(), self.spec)
        if weight.is_floating_point():
            self.value_dtype = weight.dtype
        self.set_compressed_weight(cw)

    def set_compressed_weight(self, cw: CompressedWeight) -> None:
        """Encode an algorithm's result with this module's format and install it."""
        if cw.dtype is None:
            cw.dtype = self.value_dtype or torch.float32
        self.set_compressed(self.format.encode(cw, self.spec))

    def compressed_tensors(self) -> dict[str, torch.Tensor]:
        out = {name: self._buffers[name] for name in self._compressed_names}
        state = self.__dict__.get("_inference_state")
        if state is not None and state.released:  # held in a kernel layout: rebuilt exactly
            out.update(state.restore())
        return out

    def weight_shape_tensor(self) -> torch.Tensor:
        return self._buffers["weight_shape"]

    def compressed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.compressed_tensors().values())

    # ------------------------------------------------------------------ inference paths
    def reset_inference(self) -> None:
        """Drop the prepared inference path, giving back any stored tensor it held; the next forward prepares again."""
        state, self._inference_state = self.__dict__.get("_inference_state"), None
        if state is not None:
            for name, tensor in state.restore().items():
                self._buffers[name] = tensor

    def _inference(self, x: torch.Tensor):
        """The prepared fast path for input ``x``, or ``None`` to decode for this call (see :mod:`hfcompress.kernels`)."""
        return _dispatch_inference(self, x)

    def _compute_weight(self, dtype: torch.dtype, prepared) -> torch.Tensor:
        if prepared is not None and prepared.dense_weight is not None:
            return prepared.dense_weight(dtype)
        return self.dequantize_weight(dtype)

    # ------------------------------------------------------------------ decoding
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (original shape) decoded from the compressed tensors."""
        if "weight" in self._parameters:
            raise RuntimeError("This module has not received its weight yet (it is still waiting for the checkpoint).")
        tensors = {n: t for n, t in self.compressed_tensors().items() if n != "weight_shape"}
        return self.format.decode(tensors, self.spec, self.shape2d, dtype).reshape(self.dense_shape)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight":
                if any(t.is_meta for t in self._buffers.values() if isinstance(t, torch.Tensor)):
                    return torch.empty(self.dense_shape, dtype=self._dense_dtype(), device="meta")  # nothing to decode yet
                return self.dequantize_weight(self._dense_dtype())
            raise

    def _dense_dtype(self) -> torch.dtype:
        bias = self._parameters.get("bias")
        return bias.dtype if bias is not None else torch.float32

    # ------------------------------------------------------------------ dtype safety
    def _apply(self, fn, recurse=True):
        # A prepared inference path is tied to a device and dtype: give its tensors back, prepare again when used.
        self.reset_inference()
        # `.to(dtype)`, `.half()`, ... must move compressed tensors between devices but never re-round them:
        # apply `fn` to an integer view of each floating compressed buffer, then view it back. Only the
        # format's value tensors (kept values of sparse formats) are cast like a dense weight would be.
        weight_dtype = self.__dict__.get("_weight_dtype")
        if weight_dtype is not None:  # the dtype the decoded weight takes follows casts of the model (probed on an empty tensor)
            probe = fn(torch.empty(0, dtype=weight_dtype))
            if isinstance(probe, torch.Tensor) and probe.is_floating_point():
                self._weight_dtype = probe.dtype
        views = {}
        value_tensors = self.format.value_tensors
        for name in self._compressed_names:
            buf = self._buffers.get(name)
            if buf is not None and buf.is_floating_point() and name not in value_tensors:
                views[name] = buf.dtype
                self._buffers[name] = buf.view(_INT_VIEW[buf.element_size()])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dtype in views.items():
                self._buffers[name] = self._buffers[name].view(dtype)
            for name in value_tensors:
                buf = self._buffers.get(name)
                if buf is not None and buf.is_floating_point():
                    self.value_dtype = buf.dtype

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"shape={self.dense_shape}", f"format={self.format_name}"]
        if s.quantized:
            parts.append(f"bits={s.bits}, group_size={s.group_size}, symmetric={s.symmetric}")
        if s.sparse:
            parts.append(f"sparsity={s.effective_sparsity:g} ({s.sparsity_structure})")
        return ", ".join(parts)


def _state_dict_with_released(module: CompressedModule, state_dict, prefix, local_metadata):
    """State-dict hook: stored tensors a kernel path holds in its own layout are written as stored."""
    state = module.__dict__.get("_inference_state")
    if state is not None and state.released:
        for name, tensor in state.restore().items():
            state_dict[prefix + name] = tensor
    return state_dict


def _reset_before_load(module: CompressedModule, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: put every stored tensor back in place so it can be loaded into."""
    module.reset_inference()
