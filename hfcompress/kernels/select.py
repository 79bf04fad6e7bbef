"""Choosing and preparing the inference path of each compressed module.

``auto`` picks, per module, by device, format and bits (first that applies):

=============================================  =====================================================
module                                         path
=============================================  =====================================================
Linear, format ``packed``, per-channel grid,   ``int8pack`` (one int8 matmul, 1 byte per weight)
5-8 bits
Linear, format ``packed``, 2-8 bits            ``int4pack`` (0.5 byte per weight up to 4 bits, 1 above)
Embedding, format ``packed``                   ``gather_rows`` (decode only the rows looked up)
anything else: sparse formats (``bitmask``,    ``dequant_cache`` with ``prefer="speed"`` (decode once),
``nm``), group sizes no kernel takes,          ``reference`` with ``prefer="memory"`` (decode on use)
Conv2d, devices without kernels
=============================================  =====================================================

Sparse formats whose kept values are quantized can also run ``int4pack``/``int8pack`` (pruned weights are
zero codes in the kernel layout), chosen explicitly: the kernel layout then sits next to the stored tensors
(it cannot replace them), and ``auto`` keeps their decode-once/decode-on-use numerics, which are the
reference's bit for bit. Kernels on a device other than the CPU are checked against the reference on a random
input when they are prepared (this project's CPU-only tests cannot exercise them) and ``auto`` falls back to
the next candidate if one disagrees.

Preparation happens when :func:`hfcompress.inference.set_inference_path` is called, or lazily at a module's first forward (with
the default set by :func:`set_default_inference_path`, initially ``"auto"`` or ``$HFCOMPRESS_INFERENCE_PATH``).
While autograd records a forward whose input needs a gradient, kernel paths hand over to the differentiable
reference path, so training adapters on a compressed model sees the reference numerics.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..grid import group_width
from .base import Prepared, error_bound, get_path, registered_paths
from .codes import KernelUnsupported

AUTO = "auto"
PREFERENCES = ("speed", "memory")


@dataclass(frozen=True)
class Request:
    """What was asked for a module: a path name (or ``"auto"``) and how ``auto`` trades speed for memory."""

    path: str = AUTO
    prefer: str = "speed"
    release: bool = True
    verify: bool | None = None  # None: verify on devices other than the CPU


def check_request(path: str, prefer: str) -> None:
    if not isinstance(path, str) or (path != AUTO and path not in registered_paths()):
        raise ValueError(f"path={path!r} is not an inference path; use 'auto' or one of {sorted(registered_paths())}.")
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer={prefer!r} is not supported; use 'speed' (decode once when no kernel fits) or 'memory'.")


_DEFAULT = Request()
_env = os.environ.get("HFCOMPRESS_INFERENCE_PATH")
if _env:
    try:
        check_request(_env, "speed")
        _DEFAULT = Request(path=_env)
    except ValueError as exc:
        warnings.warn(f"Ignoring HFCOMPRESS_INFERENCE_PATH: {exc}", stacklevel=1)


def set_default_inference_path(path: str = AUTO, prefer: str = "speed") -> None:
    """The path modules use when :func:`set_inference_path` was not called for them (initially ``"auto"``)."""
    global _DEFAULT
    check_request(path, prefer)
    _DEFAULT = Request(path=path, prefer=prefer)


def get_default_inference_path() -> Request:
    return _DEFAULT


# ----------------------------------------------------------------------------------------------- policy
def candidates(module: nn.Module, device: torch.device, prefer: str = "speed") -> list[str]:
    """Paths ``auto`` tries for ``module`` on ``device``, best first (``reference`` always last)."""
    spec = module.spec
    out: list[str] = []
    if hasattr(module, "in_features") and spec.quantized and module.format_name == "packed":
        per_channel = group_width(module.shape2d[1], spec.group_size) == module.shape2d[1]
        out += ["int8pack", "int4pack"] if per_channel and spec.bits > 4 else ["int4pack", "int8pack"]
    if hasattr(module, "num_embeddings") and module.format_name == "packed":
        out.append("gather_rows")  # exact, no memory, touches only the rows looked up
    if prefer == "speed":
        out.append("dequant_cache")
    out.append("reference")
    return out


def module_device(module: nn.Module) -> torch.device | None:
    for t in module._buffers.values():
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def _verify(module: nn.Module, prepared: Prepared, device: torch.device) -> str | None:
    """Compare a prepared path with the reference on a random input; ``None`` when it agrees."""
    if prepared.run is None:
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = prepared.compute_dtype or torch.float32
    x = torch.randn(3, module.shape2d[1], generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        got = prepared.run(x).double()
        w = module.dequantize_weight(torch.float64).reshape(module.shape2d)  # stored tensors are still in place
        want = x.double() @ w.t()
        if module.bias is not None:
            want = want + module.bias.double()
    bound = error_bound(x, w, dtype, module.bias)
    if not torch.isfinite(got).all() or bool(((got - want).abs() > bound + 1e-6).any()):
        return f"{prepared.path} disagrees with the reference beyond its error bound on {device}"
    return None


def prepare(module: nn.Module, request: Request, device: torch.device, dtype: torch.dtype | None = None) -> Prepared:
    """Prepare ``request`` for one module on ``device`` and install it (``module._inference_state``)."""
    module.reset_inference()
    verify = request.verify if request.verify is not None else device.type != "cpu"
    names = [request.path] if request.path != AUTO else candidates(module, device, request.prefer)
    reasons = []
    for name in names:
        path = get_path(name)
        reason = path.unsupported(module, device)
        if reason is None:
            try:
                prepared = path.prepare(module, device, release=request.release, dtype=dtype)
            except (KernelUnsupported, RuntimeError, NotImplementedError) as exc:
                reason = f"{name}: {exc}"
            else:
                try:
                    reason = _verify(module, prepared, device) if verify else None
                except (RuntimeError, NotImplementedError) as exc:  # e.g. an op without a kernel for this device
                    reason = f"{name}: {exc}"
                if reason is None:
                    _install(module, prepared)
                    return prepared
        reasons.append(reason)
        if request.path != AUTO:
            raise KernelUnsupported(reason)
    raise KernelUnsupported("; ".join(reasons))  # unreachable: reference always applies


def _install(module: nn.Module, prepared: Prepared) -> None:
    for name in prepared.released:
        module._buffers[name] = None
    module._inference_state = prepared


# ----------------------------------------------------------------------------------------------- hot path
def dispatch(module: nn.Module, x: torch.Tensor) -> Prepared | None:
    """The prepared path for this call (preparing it on first use), or ``None`` to run the reference code."""
    if "dequantize_weight" in module.__dict__:  # someone controls decoding (e.g. the calibration pipeline):
        return None  # the reference arithmetic, and nothing prepared (no kernel layout built or released)
    state = module.__dict__.get("_inference_state")
    if state is None or state.device != x.device:
        state = _lazy_prepare(module, x)
    if state is None or state.is_reference:
        return None
    if not state.differentiable and x.requires_grad and torch.is_grad_enabled():
        return None
    return state


def _lazy_prepare(module: nn.Module, x: torch.Tensor) -> Prepared | None:
    if module_device(module) != x.device or x.device.type == "meta":
        return None  # weights elsewhere (offloading hooks move them per call): decode per call
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "offload", False):
        return None
    request = module.__dict__.get("_inference_request") or _DEFAULT
    dtype = x.dtype if x.is_floating_point() else None
    try:
        return prepare(module, request, x.device, dtype=dtype)
    except KernelUnsupported as exc:
        warnings.warn(
            f"inference path {request.path!r} cannot run {type(module).__name__} {module.extra_repr()} on {x.device}: "
            f"{exc}; using 'auto' for it.",
            stacklevel=3,
        )
        return prepare(module, Request(prefer=request.prefer, release=request.release), x.device, dtype=dtype)
