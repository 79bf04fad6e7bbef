"""Registry of on-disk weight formats, keyed by name (``packed``, and the formats later stages add).

``format_for(spec)`` picks the format a :class:`~hfcompress.spec.LayerSpec` is stored in; a new format
registers itself with :func:`register_format` and, if it should be chosen automatically, a rule with
:func:`register_format_rule`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..spec import LayerSpec
from .base import CompressedWeight, WeightFormat

_FORMATS: dict[str, WeightFormat] = {}
_RULES: list[Callable[[LayerSpec], str | None]] = []


def register_format(name: str):
    """Class decorator registering a :class:`WeightFormat` under ``name``."""

    def deco(cls: type[WeightFormat]) -> type[WeightFormat]:
        if name in _FORMATS:
            raise ValueError(f"Format {name!r} is already registered.")
        cls.name = name
        _FORMATS[name] = cls()
        return cls

    return deco


def register_format_rule(rule: Callable[[LayerSpec], str | None], first: bool = True) -> None:
    """Add a rule mapping a spec to a format name (``None`` when the rule does not apply)."""
    _RULES.insert(0, rule) if first else _RULES.append(rule)


def get_format(name: str) -> WeightFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"Unknown weight format {name!r}; registered formats: {sorted(_FORMATS)}.") from None


def available_formats() -> list[str]:
    return sorted(_FORMATS)


def format_for(spec: LayerSpec) -> str:
    for rule in _RULES:
        name = rule(spec)
        if name is not None:
            return name
    raise ValueError(f"No registered format stores {spec}; this combination of settings is not supported yet.")


def _quantized_dense(spec: LayerSpec) -> str | None:
    return "packed" if spec.quantized and not spec.sparse else None


register_format_rule(_quantized_dense, first=False)

from . import packed  # noqa: E402,F401  (registers "packed")
from . import bitmask, nm  # noqa: E402,F401  (register the sparse formats "bitmask" and "nm")

__all__ = [
    "CompressedWeight",
    "WeightFormat",
    "available_formats",
    "format_for",
    "get_format",
    "register_format",
    "register_format_rule",
]
