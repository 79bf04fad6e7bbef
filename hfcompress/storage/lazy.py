"""Deferred decoding of lossless checkpoints: ``HfCompressConfig(lossless=True, lossless_decode=...)``.

``"load"`` (the default) decodes every coded tensor inside ``from_pretrained``. The two deferred modes keep
each coded tensor's payload (its entropy-coded bytes, ~2/3 of bf16) instead, as the loader read it: memory-
mapped from the checkpoint file, the way transformers maps a plain checkpoint's weights (page cache the
kernel can drop and re-read; ``save_pretrained`` copies payloads before writing, so saving over the source
folder is safe). The model gets a placeholder: a tensor of the right shape, dtype and device whose
storage is one NaN (or zero) element broadcast over the shape, so the model reports its usual shapes,
dtype and device while holding almost nothing. A forward pre-hook on every module that holds such a
tensor decodes it right before the module runs:

* ``"lazy"``: the decoded tensor is dropped again after the module's forward (the placeholder comes back),
  so resident weights stay at the coded size and at most a few modules' decoded weights exist at a time.
  This is the mode for memory: it costs one decode per forward (about 1 GB of bf16 per CPU-second per
  core). Run it under ``torch.no_grad()``/``torch.inference_mode()`` (as ``generate`` does): while autograd
  records a forward (an output needs a gradient, e.g. training adapters), the decoded tensor is kept until
  a forward without a graph, because the backward pass reads it. Deferred parameters are frozen
  (``requires_grad=False``): an update to them would be dropped at the next release.
* ``"first_forward"``: the decoded tensor is kept and the payload freed, so the model ends up exactly as
  ``"load"`` leaves it, but ``from_pretrained`` is fast and modules that never run never cost their size.

Decoding gives the same bits as ``"load"`` (the same decoder, then the same widening to the model's dtype).
Tied tensors (an output head sharing the input embedding) share one payload and stay tied. Tensors of
compressed (quantized/sparse) modules always decode on load: their inference paths build kernel layouts
from them. ``model.state_dict()`` returns decoded tensors, and ``save_pretrained`` writes the kept payloads
as they are (same bytes as saving the eagerly loaded model). Every payload's checksums are verified while
loading, so a damaged file is refused by ``from_pretrained`` in every mode.

Code that reads a placeholder weight outside its module's forward (``model.lm_head.weight @ x`` in user code,
merging adapters) sees NaN; call :func:`materialize` first. Lazily loaded models are meant to stay where
they were loaded: ``.to(...)`` works but re-allocates placeholders at full size until each module runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..lossless import codec

#: attribute (in ``module.__dict__``) holding ``{local tensor name: _Coded}`` of a module with deferred tensors
_ATTR = "_hfcompress_lossless_lazy"
_HOOKS = "_hfcompress_lossless_lazy_hooks"
#: while :func:`keep_coded` is active, state-dict hooks record payloads here instead of decoding
_KEEP: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hfcompress_lossless_keep", default=None)


@dataclass(eq=False)
class _Coded:
    """One deferred tensor (shared by every module the tensor is tied into)."""

    payload: torch.Tensor | None  # 1-D uint8, None once decoded for good
    where: str  # stored name, for error messages
    keep: bool  # "first_forward": keep the decoded tensor and free the payload
    decoded: bool = False
    _last: weakref.ref | None = field(default=None, repr=False)  # a decoded copy handed out by state_dict()

    def decode(self, like: torch.Tensor) -> torch.Tensor:
        """The exact tensor, in ``like``'s dtype (exact widening, as on load) and on its device."""
        value = codec.decode_tensor(self.payload, where=self.where)
        if value.is_floating_point() and like.is_floating_point() and value.dtype != like.dtype:
            value = value.to(like.dtype)
        return value.to(like.device)


def placeholder(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of ``shape``/``dtype``/``device`` backed by one element (NaN for floats, else 0)."""
    with torch.inference_mode(False):
        fill = float("nan") if dtype.is_floating_point else 0
        return torch.full((), fill, dtype=dtype, device=device).expand(tuple(shape))


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def _set_data(t: torch.Tensor, value: torch.Tensor) -> None:
    with torch.inference_mode(False), torch.no_grad():
        t.data = value


def _decode_before(module: nn.Module, args) -> None:
    entries = module.__dict__.get(_ATTR)
    if not entries:
        return
    for name, entry in entries.items():
        if not entry.decoded:
            t = _tensor(module, name)
            with torch.inference_mode(False):
                value = entry.decode(t)
            _set_data(t, value)
            entry.decoded = True
            if entry.keep:
                entry.payload = None
    if all(e.payload is None for e in entries.values()):
        _detach(module)


def _release_after(module: nn.Module, args, output) -> None:
    entries = module.__dict__.get(_ATTR)
    if not entries:
        return
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves(output)):
        return  # the autograd graph may hold the decoded weight for the backward pass: keep it for now
    for name, entry in entries.items():
        if entry.decoded and not entry.keep:
            t = _tensor(module, name)
            _set_data(t, placeholder(t.shape, t.dtype, t.device))
            entry.decoded = False


def _state_dict_hook(module: nn.Module, state_dict, prefix, local_metadata):
    entries = module.__dict__.get(_ATTR)
    if not entries:
        return state_dict
    keep = _KEEP.get()
    for name, entry in entries.items():
        key = prefix + name
        if entry.decoded or key not in state_dict:
            continue
        t = _tensor(module, name)
        if keep is not None and codec.read_info(entry.payload, entry.where).dtype == t.dtype:
            keep[key] = entry.payload  # saved as it was loaded; the placeholder stays in the dict
            continue
        value = entry._last() if entry._last is not None else None
        if value is None or value.dtype != t.dtype or value.device != t.device:
            value = entry.decode(t)
            entry._last = weakref.ref(value)  # tied copies of this tensor get the same object (and storage)
        state_dict[key] = value
    return state_dict


def _attach(module: nn.Module, name: str, entry: _Coded, per_forward: bool) -> None:
    entries = module.__dict__.get(_ATTR)
    if entries is None:
        entries = module.__dict__[_ATTR] = {}
        hooks = [module.register_forward_pre_hook(_decode_before), module._register_state_dict_hook(_state_dict_hook)]
        if per_forward:
            hooks.append(module.register_forward_hook(_release_after))
        module.__dict__[_HOOKS] = hooks
    entries[name] = entry


def _detach(module: nn.Module) -> None:
    for handle in module.__dict__.pop(_HOOKS, ()):
        handle.remove()
    module.__dict__.pop(_ATTR, None)


def defer(model: nn.Module, payloads: dict[str, tuple[torch.Tensor, str]], mode: str) -> int:
    """Install deferred decoding for ``{model tensor name: (payload, stored name)}`` whose model tensors are placeholders.

    Every module holding one of those tensors (tied ones included) gets the hooks. Returns the number of
    (module, tensor) pairs that were attached.
    """
    if mode not in ("lazy", "first_forward"):
        raise ValueError(f"mode={mode!r} must be 'lazy' or 'first_forward'.")
    by_id: dict[int, tuple[torch.Tensor, _Coded]] = {}
    for name, (payload, where) in payloads.items():
        t = model.get_parameter_or_buffer(name) if hasattr(model, "get_parameter_or_buffer") else _lookup(model, name)
        by_id[id(t)] = (t, _Coded(payload, where, keep=mode == "first_forward"))
    attached = 0
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for local, t in tensors.items():
                hit = by_id.get(id(t)) if t is not None else None
                if hit is not None and hit[0] is t:
                    if mode == "lazy" and isinstance(t, nn.Parameter):
                        t.requires_grad_(False)  # frozen: an update would be dropped at the next release
                    _attach(module, local, hit[1], per_forward=mode == "lazy")
                    attached += 1
    return attached


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, local = name.rpartition(".")
    return _tensor(model.get_submodule(module_name), local)


def deferred(model: nn.Module) -> dict[str, int]:
    """``{tensor name: payload bytes}`` of the tensors of ``model`` whose decoding is deferred and not done yet."""
    out = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, entry in (module.__dict__.get(_ATTR) or {}).items():
            if not entry.decoded and entry.payload is not None:
                out[f"{module_name}.{local}" if module_name else local] = entry.payload.numel()
    return out


def materialize(model: nn.Module) -> nn.Module:
    """Decode every deferred tensor of ``model`` now and keep it, removing the hooks (as if loaded with ``"load"``)."""
    for module in list(model.modules()):
        entries = module.__dict__.get(_ATTR)
        if not entries:
            continue
        for name, entry in entries.items():
            if not entry.decoded:  # tied partners share the entry: decoded once
                t = _tensor(module, name)
                with torch.inference_mode(False):
                    value = entry.decode(t)
                _set_data(t, value)
            entry.decoded, entry.keep, entry.payload = True, True, None
        _detach(module)
    return model


@contextlib.contextmanager
def keep_coded():
    """Within this block ``state_dict()`` leaves deferred tensors as placeholders and yields their payloads.

    Yields ``{state-dict key: payload}``, filled while ``state_dict()`` runs (payloads whose dtype differs from
    the model tensor, e.g. loaded with a wider ``dtype``, are decoded instead so they get re-coded).
    """
    found: dict[str, torch.Tensor] = {}
    token = _KEEP.set(found)
    try:
        yield found
    finally:
        _KEEP.reset(token)


__all__ = ["defer", "deferred", "keep_coded", "materialize", "placeholder"]
