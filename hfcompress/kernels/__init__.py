"""Fast inference of compressed modules: forward paths chosen per module by device, format and bits.

=================  ==============================================================  =========================
path               what runs                                                       error bound (vs exact)
=================  ==============================================================  =========================
``reference``      decode the stored tensors on every call, then the dense op      the dense op's
                   (decode-on-use; no memory beyond the stored tensors)
``dequant_cache``  decode once, keep the dense weight (decode-once)                identical to ``reference``
``int4pack``       PyTorch's packed-int4 tinygemm kernels (CPU, CUDA), codes of    ``2**-6 * (|x| @ |W|^T + |b|)``
                   2-8 bits (one or two nibble planes), any ``group_size`` that
                   is a multiple of 32, ragged last groups exact
``int8pack``       PyTorch's int8 weight-only matmul (CPU, CUDA), per-channel      ``2**-6 * (|x| @ |W|^T + |b|)``
                   scales, codes of 2-8 bits
=================  ==============================================================  =========================

``auto`` (the default) picks the best path for each module (see :mod:`.select`). Choose explicitly with
:func:`set_inference_path`; inspect with :func:`inference_paths`. The bound is on ``|y - x @ W^T|`` with ``W`` the
exact decoded weight: bfloat16 compute (the integer kernels) rounds the input, the scales and the result once
each (``3 * 2**-8``); float32 compute only accumulates.
"""

from . import dequant_cache, int4pack, int8pack, reference  # noqa: F401  (register the paths)
from .base import RTOL, InferencePath, Prepared, error_bound, get_path, register_path, registered_paths
from .codes import KernelUnsupported
from .select import (
    AUTO,
    candidates,
    get_default_inference_path,
    inference_nbytes,
    inference_paths,
    set_default_inference_path,
    set_inference_path,
)


def available_paths() -> dict[str, str]:
    """``{path name: description}`` of every registered inference path (plus ``"auto"``)."""
    out = {AUTO: "best path per module by device, format and bits (the default)"}
    out.update({name: p.description for name, p in sorted(registered_paths().items())})
    return out


__all__ = [
    "AUTO",
    "RTOL",
    "InferencePath",
    "KernelUnsupported",
    "Prepared",
    "available_paths",
    "candidates",
    "error_bound",
    "get_default_inference_path",
    "get_path",
    "inference_nbytes",
    "inference_paths",
    "register_path",
    "registered_paths",
    "set_default_inference_path",
    "set_inference_path",
]
