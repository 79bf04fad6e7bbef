"""Giving freed host memory back to the operating system between layers.

Calibration frees large tensors (statistics, Hessian factorisations, decoded weights) after every
layer. Tensors above glibc's mmap threshold are unmapped when freed, but the threshold adapts upwards
(up to 32 MB) after the first large free, so many medium-sized temporaries end up in the malloc heap,
where freed space stays resident and fragments: the resident set grows layer after layer even though
nothing is held. :func:`trim_heap` asks glibc to return the free heap pages of every arena
(``malloc_trim(0)``), which keeps the peak resident memory at what the current layer needs. It is a
no-op where glibc is not the C library (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["trim_heap"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the free pages of the C heap to the operating system; False where that is not possible."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
