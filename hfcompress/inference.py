"""Choosing how a model's compressed modules compute their forward: the model-level API of the kernels.

The kernels (:mod:`hfcompress.kernels`) serve one module at a time; these functions apply a choice to every
compressed module of a model (or the ones named), prepare them now, and report what each one runs:

* :func:`set_inference_path` (``"auto"``, ``"reference"``, ``"dequant_cache"``, ``"int4pack"``, ``"int8pack"``),
* :func:`inference_paths` (``{module: path}``) and :func:`inference_nbytes` (resident bytes).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .kernels.base import get_path
from .kernels.codes import KernelUnsupported, layout_cache
from .kernels.select import AUTO, Request, check_request, module_device, prepare
from .modules import CompressedModule, compressed_modules

__all__ = ["inference_nbytes", "inference_paths", "set_inference_path"]


def _targets(model: nn.Module, modules) -> dict[str, nn.Module]:
    found = {"": model} if isinstance(model, CompressedModule) else compressed_modules(model)
    if modules is not None:
        pats = [modules] if isinstance(modules, str) else list(modules)
        found = {
            n: m
            for n, m in found.items()
            if any(re.search(p[3:], n) if p.startswith("re:") else (n == p or n.endswith("." + p)) for p in pats)
        }
    return found


def set_inference_path(
    model: nn.Module,
    path: str = AUTO,
    *,
    prefer: str = "speed",
    modules: str | list[str] | None = None,
    release: bool = True,
    verify: bool | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Choose how the compressed modules of ``model`` compute their forward, and prepare them now.

    Args:
        model: a model holding compressed modules (or one compressed module).
        path: ``"auto"`` (best per module by device, format and bits), or one of ``"reference"`` (decode per
            call), ``"dequant_cache"`` (decode once, keep the dense weight), ``"int4pack"``, ``"int8pack"``.
        prefer: for ``auto``: ``"speed"`` decodes once where no integer kernel fits; ``"memory"`` never keeps
            more than the stored tensors (decodes those layers on every call).
        modules: only these modules: names, name suffixes or ``"re:<regex>"`` (default: all).
        release: let integer kernels hold the only copy of the codes (``state_dict``, saving and
            ``dequantize_weight`` rebuild the stored tensors exactly). ``False`` keeps both.
        verify: check each prepared kernel against the reference on a random input (default: on non-CPU devices).
        dtype: compute dtype, for decode-once paths to decode right away (default: at the first forward).

    Returns:
        ``{module name: chosen path}``.

    Raises:
        ValueError: an explicit ``path`` cannot serve some module (nothing is changed then).
    """
    check_request(path, prefer)
    targets = _targets(model, modules)
    if not targets:
        raise ValueError(
            "set_inference_path found no compressed module"
            + (f" matching modules={modules!r}" if modules is not None else " in the model; compress it first")
            + "."
        )
    request = Request(path=path, prefer=prefer, release=release, verify=verify)
    devices = {name: module_device(m) for name, m in targets.items()}
    if path != AUTO:
        bad = {}
        for name, m in targets.items():
            if devices[name] is not None and devices[name].type != "meta":
                reason = get_path(path).unsupported(m, devices[name])
                if reason:
                    bad[name or type(m).__name__] = reason
        if bad:
            listed = "; ".join(f"{n}: {r}" for n, r in list(bad.items())[:3])
            raise ValueError(
                f"path={path!r} cannot run {len(bad)} of {len(targets)} compressed modules ({listed}"
                f"{'; ...' if len(bad) > 3 else ''}). Use path='auto', or pass modules=[...] to set it where it applies."
            )
    chosen = {}
    previous = {name: m.__dict__.get("_inference_request") for name, m in targets.items()}
    try:
        with layout_cache(), torch.no_grad():
            for name, m in targets.items():
                m._inference_request = request
                device = devices[name]
                if device is None or device.type == "meta":
                    m.reset_inference()
                    chosen[name] = "(at first forward)"
                    continue
                chosen[name] = prepare(m, request, device, dtype=dtype).path
    except KernelUnsupported as exc:
        for name, m in targets.items():  # back to what was asked before; paths prepare again at first forward
            m.reset_inference()
            m._inference_request = previous[name]
        raise ValueError(f"path={path!r} could not be prepared: {exc}. Use path='auto'.") from None
    return chosen


def inference_paths(model: nn.Module) -> dict[str, str]:
    """``{module name: prepared path}`` (``"(at first forward)"`` for modules not prepared yet)."""
    out = {}
    for name, m in _targets(model, None).items():
        state = m.__dict__.get("_inference_state")
        out[name] = state.path if state is not None else "(at first forward)"
    return out


def inference_nbytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of the compressed modules: stored tensors still held plus what their paths keep."""
    stored = kernel = 0
    for m in _targets(model, None).values():
        stored += sum(t.numel() * t.element_size() for n, t in m._buffers.items() if n in m._compressed_names and t is not None)
        state = m.__dict__.get("_inference_state")
        kernel += state.nbytes() if state is not None else 0
    return {"stored": stored, "kernel": kernel, "total": stored + kernel}
