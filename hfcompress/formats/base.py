"""The format contract: how a compressed weight becomes named tensors in safetensors, and back.

A *format* turns the in-memory result of a compression algorithm (:class:`CompressedWeight`) into a
dict of tensors stored next to the module (``<module>.weight_packed``, ``<module>.weight_scale``, ...)
and decodes them back to the dense weight. Formats are looked up by name in the registry
(:mod:`hfcompress.formats`), so sparse and lossless formats join without touching the modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..grid import QuantizedWeight
from ..spec import LayerSpec

#: expected tensor: (shape or None where the size depends on the data, dtype or None for "any floating dtype",
#: e.g. values kept in the dtype the model was compressed in)
TensorSpec = tuple[tuple[int | None, ...], torch.dtype | None]


@dataclass
class CompressedWeight:
    """What an algorithm hands to a format.

    ``weight`` is the dense 2-D weight the compressed tensors must decode to (after pruning and/or
    quantization); ``quantized`` carries the integer codes and grid when the spec quantizes, ``mask``
    the boolean keep-mask when it prunes. ``dtype`` is the floating dtype that formats storing
    unquantized values (sparse formats) keep them in; ``None`` lets the compressed module fill in the
    dtype of the dense weight it replaces.
    """

    weight: torch.Tensor
    quantized: QuantizedWeight | None = None
    mask: torch.Tensor | None = None
    dtype: torch.dtype | None = None


class WeightFormat(ABC):
    """One on-disk layout. Subclasses are registered with :func:`hfcompress.formats.register_format`."""

    name: str = ""
    #: :func:`hfcompress.formats.format_for` picks, among the formats that :meth:`select <selects>` a spec, the
    #: one with the highest priority
    priority: int = 0
    #: floating tensors that hold weight *values* (not grid parameters): like a dense weight they follow
    #: ``model.to(dtype)``, so a model calibrated in float32 can be cast to bf16 before saving
    value_tensors: tuple[str, ...] = ()

    def selects(self, spec: LayerSpec) -> bool:
        """Whether this format stores ``spec`` when the user did not name a format (``False``: only by name)."""
        return False

    @abstractmethod
    def encode(self, cw: CompressedWeight, spec: LayerSpec) -> dict[str, torch.Tensor]:
        """Tensors to store, keyed by their name relative to the module (e.g. ``"weight_packed"``)."""

    @abstractmethod
    def decode(
        self, tensors: dict[str, torch.Tensor], spec: LayerSpec, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """The dense ``[rows, cols]`` weight in ``dtype``."""

    @abstractmethod
    def expected_tensors(self, shape2d: tuple[int, int], spec: LayerSpec) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes a checkpoint must hold for one module (used to validate files)."""

    def check(self, tensors: dict[str, torch.Tensor], shape2d: tuple[int, int], spec: LayerSpec, where: str) -> None:
        """Raise a clear error when ``tensors`` do not match :meth:`expected_tensors`."""
        check_tensors(
            {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
            self.expected_tensors(shape2d, spec),
            where,
            self.name,
        )


def check_tensors(
    found: dict[str, TensorSpec], expected: dict[str, TensorSpec], where: str, fmt: str, max_numel: int | None = None
) -> None:
    """Raise a clear error unless ``found`` holds every ``expected`` tensor with its dtype and shape.

    Dimensions the format leaves open (``None``: sizes that depend on the data, such as the kept values of a
    sparse weight) are bounded by ``max_numel`` (the dense weight's element count): a compressed tensor is never
    larger than the weight it encodes, so a crafted header cannot make the loader allocate more.
    """
    for name, (shape, dtype) in expected.items():
        key = f"{where}.{name}" if where else name
        if name not in found:
            raise ValueError(
                f"Compressed tensor {key!r} (format {fmt!r}) is missing from the checkpoint; the file is incomplete or "
                "was written by another tool. Re-save the model with hfcompress."
            )
        got_shape, got_dtype = found[name]
        if dtype is None and not got_dtype.is_floating_point:
            raise ValueError(f"Compressed tensor {key!r} has dtype {got_dtype}, expected a floating dtype for format {fmt!r}.")
        if dtype is not None and got_dtype != dtype:
            raise ValueError(f"Compressed tensor {key!r} has dtype {got_dtype}, expected {dtype} for format {fmt!r}.")
        if len(got_shape) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got_shape)):
            raise ValueError(
                f"Compressed tensor {key!r} has shape {tuple(got_shape)}, expected {tuple(shape)} for format {fmt!r} "
                "with this model's config; the checkpoint does not belong to this model or its quantization_config."
            )
        numel = 1
        for g in got_shape:
            numel *= g
        if max_numel is not None and None in shape and numel > max_numel:
            raise ValueError(
                f"Compressed tensor {key!r} has shape {tuple(got_shape)}: more elements than the {max_numel} of the "
                f"weight it encodes (format {fmt!r}); the checkpoint is damaged or crafted."
            )
