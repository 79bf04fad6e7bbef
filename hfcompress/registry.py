"""One registry shape for everything hfcompress looks up by name: methods, weight formats, inference paths.

A :class:`Registry` maps a name to an entry. Built-in entries are declared by the module that defines them
(``builtins={"gptq": "hfcompress.algorithms.gptq", ...}``) and imported on first lookup, so importing
hfcompress loads no method, format or kernel code it does not use, and the lower layers (the config, the
compressed modules) can look an entry up by name without importing the layer that defines it. Third-party
entries register with :meth:`Registry.register` (or its decorator form) once their module is imported.

Errors name the parameter the name came from, the bad value and the registered choices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Entries of one kind, keyed by name.

    ``kind`` names the kind in messages ("method", "weight format"); ``parameter`` is the argument users
    pass names in (``method=``, ``path=``); ``builtins`` maps each built-in name to the module that
    registers it when imported.
    """

    def __init__(self, kind: str, parameter: str, builtins: dict[str, str] | None = None, reserved: tuple[str, ...] = ()):
        self.kind = kind
        self.parameter = parameter
        self._builtins = dict(builtins or {})
        self._reserved = tuple(reserved)
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (a new name: replacing an entry is refused) and return it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} needs a non-empty string name to be registered, got {name!r}.")
        if name in self._entries or name in self._reserved:
            raise ValueError(f"{self.kind.capitalize()} {name!r} is already registered (or reserved); pick another name.")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, make: Callable[[type], T] | None = None) -> Callable[[type], type]:
        """Class decorator registering ``make(cls)`` (default: an instance of ``cls``) under ``name``."""

        def deco(cls: type) -> type:
            self.register(name, make(cls) if make is not None else cls())
            return cls

        return deco

    def _load(self, name: str) -> None:
        module = self._builtins.get(name)
        if module is not None and name not in self._entries:
            importlib.import_module(module)  # the module registers its entries

    def get(self, name: str) -> T:
        """The entry called ``name``; ``ValueError`` naming the parameter and the choices otherwise."""
        if isinstance(name, str):
            self._load(name)
            if name in self._entries:
                return self._entries[name]
        raise ValueError(f"{self.parameter}={name!r} is not a known {self.kind}; choose one of {self.names()}.")

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        self._load(name)
        return name in self._entries

    def items(self) -> dict[str, T]:
        """Every entry (built-ins loaded), sorted by name."""
        for name in self._builtins:
            self._load(name)
        return dict(sorted(self._entries.items()))

    def names(self) -> list[str]:
        """The sorted names of every entry (built-ins included)."""
        return list(self.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
