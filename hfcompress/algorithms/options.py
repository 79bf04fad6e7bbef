"""The one validator of ``method_args``, shared by every method.

Each method declares its defaults (a dict of ``name -> default``); :func:`method_options` fills them in,
refuses unknown keys and values of the wrong type (by the type of the default), checks the ranges of the
keys every Hessian method shares (``damp``, ``block_size``), accepts the allocation settings of the pruning
methods, and maps the deprecated spellings ``dampening`` and ``blocksize`` (SparseGPT/ADMM before 0.2) to
``damp`` and ``block_size`` with a ``FutureWarning``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..sparsity.allocation import ALLOCATION_ARGS, allocation_of

__all__ = ["DEPRECATED_ARGS", "method_options"]

#: deprecated ``method_args`` spellings and the names that replaced them
DEPRECATED_ARGS = {"dampening": "damp", "blocksize": "block_size"}


def _renamed(method: str, method_args: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(method_args)
    for old, new in DEPRECATED_ARGS.items():
        if old in out and new in defaults:
            if new in out:
                raise ValueError(f"method_args of method={method!r} give both {old!r} and {new!r}; keep only {new!r}.")
            warnings.warn(f"method_args {old!r} of method={method!r} is deprecated; use {new!r}.", FutureWarning, stacklevel=4)
            out[new] = out.pop(old)
    return out


def _check_value(method: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        return value  # strings and optional settings: the method checks their values
    if ok and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"method_args {key}={value!r} for method={method!r} must be a finite number (default {default!r}).")
    if not ok:
        kind = {bool: "True or False", int: "an int", float: "a number"}[type(default)]
        raise ValueError(f"method_args {key}={value!r} for method={method!r} must be {kind} (default {default!r}).")
    if key == "damp" and not 0 <= value < 1:
        raise ValueError(f"method_args damp={value!r} for method={method!r} must be a number in [0, 1), e.g. 0.01.")
    if key == "block_size" and value < 1:
        raise ValueError(f"method_args block_size={value!r} for method={method!r} must be a positive integer, e.g. 128.")
    return value


def method_options(method: str, method_args: dict[str, Any] | None, defaults: dict[str, Any], allocation: bool = False) -> dict[str, Any]:
    """``defaults`` updated with ``method_args``, validated; ``ValueError`` naming the key otherwise.

    ``allocation=True`` (pruning methods) also accepts the allocation settings
    (:data:`~hfcompress.sparsity.allocation.ALLOCATION_ARGS`), validates them and leaves them out of the result:
    they are consumed before the per-layer step.
    """
    if method_args is not None and not isinstance(method_args, dict):
        raise TypeError(f"method_args for method={method!r} must be a dict, got {type(method_args).__name__}.")
    args = _renamed(method, method_args or {}, defaults)
    allowed = set(defaults) | (set(ALLOCATION_ARGS) if allocation else set())
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(
            f"unknown method_args {unknown}: they are not understood by method={method!r}; it accepts {sorted(allowed)}."
        )
    out = dict(defaults)
    for key, default in defaults.items():
        if key in args:
            out[key] = _check_value(method, key, args[key], default)
    if allocation:
        allocation_of(args)
    return out
