"""Registry of on-disk weight formats, keyed by name (``packed``, ``bitmask``, ``nm``).

``format_for(spec)`` picks the format a :class:`~hfcompress.spec.LayerSpec` is stored in: the registered
format with the highest ``priority`` whose :meth:`~hfcompress.formats.base.WeightFormat.selects` accepts the
spec (ties broken by name), so the choice never depends on the order modules were imported in. A new format
subclasses :class:`~hfcompress.formats.base.WeightFormat` and registers itself with :func:`register_format`.
"""

from __future__ import annotations

from ..registry import Registry
from ..spec import LayerSpec
from .base import CompressedWeight, WeightFormat

#: the formats, by name; the built-in ones load on first lookup
FORMATS: Registry[WeightFormat] = Registry(
    "weight format",
    "format",
    builtins={"packed": "hfcompress.formats.packed", "bitmask": "hfcompress.formats.bitmask", "nm": "hfcompress.formats.nm"},
)


def register_format(name: str):
    """Class decorator registering a :class:`WeightFormat` under ``name``."""

    def make(cls: type[WeightFormat]) -> WeightFormat:
        cls.name = name
        return cls()

    return FORMATS.decorator(name, make)


def get_format(name: str) -> WeightFormat:
    """The format called ``name`` (``ValueError`` listing the registered ones otherwise)."""
    return FORMATS.get(name)


def available_formats() -> list[str]:
    """The sorted names of every registered format."""
    return FORMATS.names()


def format_for(spec: LayerSpec, formats: Registry[WeightFormat] = FORMATS) -> str:
    """The name of the format ``spec`` is stored in (highest ``priority`` among the ``formats`` that select it)."""
    chosen = sorted((f for f in formats.items().values() if f.selects(spec)), key=lambda f: (-f.priority, f.name))
    if not chosen:
        raise ValueError(f"No registered format stores {spec}; this combination of settings is not supported yet.")
    return chosen[0].name


__all__ = ["FORMATS", "CompressedWeight", "WeightFormat", "available_formats", "format_for", "get_format", "register_format"]
