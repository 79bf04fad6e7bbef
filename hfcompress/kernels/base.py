"""The contract of an inference path: how a compressed module computes its forward.

A *path* (:class:`InferencePath`) is a strategy registered by name (``"reference"``, ``"dequant_cache"``,
``"int4pack"``, ``"int8pack"``). For one module on one device it either says why it cannot serve it
(:meth:`InferencePath.unsupported`) or builds a :class:`Prepared` object once (at load time, or at the first
forward): the kernel-layout tensors plus the function that runs the forward with them.

A prepared path may *take over* some of the module's stored tensors (e.g. the ``weight_packed`` codes, which
the int4 kernel keeps in its own layout): the module's buffer is then ``None`` and :meth:`Prepared.restore`
rebuilds the exact stored tensor when something needs it (``state_dict``/``save_pretrained``,
``dequantize_weight``, moving the module). Memory then holds one copy of the weight, not two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from ..registry import Registry
from .codes import KernelUnsupported

#: tolerance of each compute precision, relative to ``|x| @ |W|^T + |b|`` (see :func:`error_bound`). With ``u``
#: the unit roundoff (2**-8 for bfloat16, 2**-11 for float16, 2**-24 for float32): the integer kernels round
#: the input, the scales and the output once each (3u < 2**-6 in bfloat16) and accumulate in float32; float32
#: compute only accumulates (2**-16 leaves a wide margin over K * 2**-24 for K up to a few thousand).
RTOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 2.0**-16, torch.float64: 2.0**-40}


def error_bound(
    x: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The documented bound on ``|path(x) - (x @ W^T + b)|`` (``W`` the exact decoded weight, float64 arithmetic).

    ``RTOL[compute_dtype] * (|x| @ |W|^T + |b|)``: each rounding of a term (input, scale, dequantized weight,
    output) costs at most the unit roundoff of the compute dtype, relative to the magnitudes it touches, and
    accumulation is float32 (a ``2**-20`` term covers it).
    """
    ax = x.detach().double().abs().reshape(-1, x.shape[-1])
    mag = ax @ weight.detach().double().abs().t()
    if bias is not None:
        mag = mag + bias.detach().double().abs()
    return (RTOL[compute_dtype] + 2.0**-20) * mag + 1e-30


class Prepared:
    """One module's prepared path on one device.

    ``run(x)`` computes the forward; when it is ``None`` the module's own code runs, with the weight from
    ``dense_weight(dtype)`` if given (a decode-once cache), else decoded for the call. ``released`` names
    the stored tensors this object took over (their buffers on the module are ``None``) and ``restore()``
    returns them exactly as they were stored.
    """

    def __init__(
        self,
        path: str,
        device: torch.device,
        run: Callable[[torch.Tensor], torch.Tensor] | None,
        dense_weight: Callable[[torch.dtype], torch.Tensor] | None = None,
        differentiable: bool = False,
        compute_dtype: torch.dtype | None = None,
        detail: str = "",
    ) -> None:
        self.path = path
        self.device = torch.device(device)
        self.run = run
        #: ``dense_weight(dtype)``: the decoded weight to compute with (decode-once paths); ``None``: decode per call
        self.dense_weight = dense_weight
        #: whether ``run`` propagates gradients to its input (kernel ops do not: training uses the reference)
        self.differentiable = differentiable
        #: the dtype the matmul runs in (``None``: the input's dtype)
        self.compute_dtype = compute_dtype
        #: human-readable summary of the kernel layout (kernel group size, planes, padding)
        self.detail = detail
        self.released: tuple[str, ...] = ()
        self._restore: Callable[[], dict[str, torch.Tensor]] | None = None

    def take_over(self, names: tuple[str, ...], restore: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.released = tuple(names)
        self._restore = restore

    def restore(self) -> dict[str, torch.Tensor]:
        """The stored tensors this path took over, rebuilt bit-exactly."""
        if not self.released:
            return {}
        assert self._restore is not None
        return self._restore()

    @property
    def is_reference(self) -> bool:
        return self.run is None and self.dense_weight is None

    def nbytes(self) -> int:
        """Bytes of the tensors this prepared path keeps (kernel layouts, caches), not counting the module's."""
        seen, total = set(), 0
        for value in vars(self).values():
            if isinstance(value, dict):
                value = list(value.values())
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        extra = f", {self.detail}" if self.detail else ""
        return f"Prepared({self.path!r} on {self.device}{extra})"


class InferencePath(ABC):
    """A way of running compressed modules. Subclasses register with :func:`register_path`."""

    name: str = ""
    #: one-line description shown by :func:`hfcompress.kernels.available_paths`
    description: str = ""

    @abstractmethod
    def unsupported(self, module: nn.Module, device: torch.device) -> str | None:
        """Why this path cannot run ``module`` on ``device`` (``None`` when it can)."""

    def require(self, module: nn.Module, device: torch.device) -> None:
        """Raise :class:`~hfcompress.kernels.KernelUnsupported` with the reason when this path cannot run ``module``."""
        reason = self.unsupported(module, device)
        if reason:
            raise KernelUnsupported(reason)

    @abstractmethod
    def prepare(
        self, module: nn.Module, device: torch.device, release: bool = True, dtype: torch.dtype | None = None
    ) -> Prepared:
        """Build the kernel state for ``module`` (whose tensors are on ``device``). ``release`` lets the path take
        over stored tensors it holds in another layout; ``dtype`` is the compute dtype when known (decode-once
        paths decode to it right away)."""


class QuantizedLinearPath(InferencePath):
    """An integer-kernel path for quantized Linear layers: the checks every such kernel makes first.

    Subclasses set :attr:`devices`, say which of torch's ops they lack with :meth:`missing_ops`, and check the grid
    (group size, bits) in :meth:`unsupported_grid`.
    """

    #: device types the kernel runs on
    devices: tuple[str, ...] = ()

    def missing_ops(self, device_type: str) -> str | None:
        """The ops this torch build lacks for ``device_type`` (``None``: it has them)."""
        return None

    def unsupported_grid(self, module: nn.Module, device: torch.device) -> str | None:
        """Why the kernel cannot take this quantized Linear's grid (``None``: it can)."""
        return None

    def unsupported(self, module: nn.Module, device: torch.device) -> str | None:
        if not hasattr(module, "in_features"):
            return f"{self.name} runs Linear layers, not {type(module).__name__}"
        if device.type not in self.devices:
            return f"{self.name} has no kernel for device {device.type!r}"
        missing = self.missing_ops(device.type)
        if missing:
            return f"this torch build ({torch.__version__}) lacks {missing}"
        if not module.spec.quantized:
            return f"format {module.format_name!r} stores unquantized values"
        return self.unsupported_grid(module, device)


#: the inference paths, by name; the built-in ones load on first lookup ("auto" is reserved for the chooser)
PATHS: Registry[InferencePath] = Registry(
    "inference path",
    "path",
    builtins={
        "reference": "hfcompress.kernels.reference",
        "dequant_cache": "hfcompress.kernels.dequant_cache",
        "int4pack": "hfcompress.kernels.int4pack",
        "int8pack": "hfcompress.kernels.int8pack",
        "gather_rows": "hfcompress.kernels.gather_rows",
    },
    reserved=("auto",),
)


def register_path(cls: type[InferencePath]) -> type[InferencePath]:
    """Class decorator registering an :class:`InferencePath` under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered as an inference path.")
    PATHS.register(cls.name, cls())
    return cls


def get_path(name: str) -> InferencePath:
    """The inference path called ``name`` (``ValueError`` listing the choices otherwise)."""
    return PATHS.get(name)


def registered_paths() -> dict[str, InferencePath]:
    """Every registered inference path (built-ins loaded), by name."""
    return PATHS.items()
