"""Fast inference of compressed modules: forward paths chosen per module by device, format and bits.

* ``reference``: decode the stored tensors on every call, then the dense op (decode-on-use; no memory beyond
  the stored tensors). Any module, any device.
* ``dequant_cache``: decode once and keep the dense weight (decode-once); identical to ``reference`` bit for
  bit, fastest prefill, dense memory. Any module, any device.
* ``int4pack``: PyTorch's packed-int4 tinygemm kernels (CPU, CUDA) for Linear layers with codes of 2-8 bits
  (one or two nibble planes), any ``group_size`` that is a multiple of 32, ragged last groups exact. Holds the
  only copy of the codes (``packed`` format, CPU).
* ``int8pack``: PyTorch's int8 weight-only matmul (CPU, CUDA) for Linear layers with per-channel scales, codes
  of 2-8 bits.
* ``gather_rows``: Embedding layers (format ``packed``) decode only the looked-up rows; exact.

``auto`` (the default) picks the best path for each module (see :mod:`.select`). Choose explicitly with
:func:`hfcompress.inference.set_inference_path`; inspect with :func:`hfcompress.inference.inference_paths`.

Exactness contract: with ``W`` the exact decoded weight and ``b`` the bias, every path satisfies
``|y - (x @ W^T + b)| <= RTOL[c] * (|x| @ |W|^T + |b|)`` elementwise (float64 reference), ``c`` the compute
dtype: bfloat16 for the integer kernels (they round the input, the scales and the result once each:
``3 * 2**-8 < RTOL = 2**-6``), the input's dtype for ``reference``/``dequant_cache``
(:func:`~hfcompress.kernels.base.error_bound`).
"""

from .base import PATHS, RTOL, InferencePath, Prepared, error_bound, get_path, register_path, registered_paths
from .codes import KernelUnsupported
from .select import AUTO, candidates, get_default_inference_path, set_default_inference_path


def available_paths() -> list[str]:
    """The sorted names of every registered inference path (``"auto"``, the chooser, is not one of them)."""
    return PATHS.names()


__all__ = [
    "AUTO",
    "PATHS",
    "RTOL",
    "InferencePath",
    "KernelUnsupported",
    "Prepared",
    "available_paths",
    "candidates",
    "error_bound",
    "get_default_inference_path",
    "get_path",
    "register_path",
    "registered_paths",
    "set_default_inference_path",
]
