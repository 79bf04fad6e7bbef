"""Griffe extension for the API reference: turn the Sphinx roles of hfcompress's docstrings into links.

The docstrings use Google-style sections with Sphinx cross-reference roles (``:class:`~hfcompress.X```,
``:func:`oneshot```, ``:mod:`.run```) and reST literal-block markers (``text::``). mkdocstrings renders
Markdown, so without this extension the roles would show up as literal ``:class:`` text. Each role becomes an
*optional* autorefs cross-reference: it links when the target is rendered in the API reference and is plain
code otherwise (optional references never fail ``mkdocs build --strict``). A paragraph ending in ``::`` ends
in ``:`` (a line holding only ``::`` is dropped); the indented block after it stays a code block. The Python files are not modified.

Loaded from ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`([^`]+)`")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
_LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
_LONE_LITERAL = re.compile(r"^[ \t]*::[ \t]*$", re.MULTILINE)


def _module_of(obj: griffe.Object) -> griffe.Module:
    while not obj.is_module:
        obj = obj.parent
    return obj


def _canonical(path: str, collection: Any) -> str:
    """Follow re-exports (``hfcompress.HfCompressConfig`` -> ``hfcompress.config.HfCompressConfig``)."""
    parts = path.split(".")
    try:
        obj = collection[parts[0]]
    except KeyError:
        return path
    for i, part in enumerate(parts[1:], start=1):
        try:
            member = obj.members[part]
        except (KeyError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return path
        if member.is_alias:
            return ".".join([member.target_path, *parts[i + 1 :]])
        obj = member
    return path


def _role_to_autoref(match: re.Match, obj: griffe.Object, collection: Any) -> str:
    text = match.group(1).strip()
    titled = _TITLED.match(text)
    if titled:
        title, target = titled.group("title"), titled.group("target")
    else:
        target = text.lstrip("~")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target.lstrip(".")
    target = target.lstrip("~").rstrip("()")
    module = _module_of(obj)
    if target.startswith("."):  # relative to the current package
        base = module.path if module.is_package else (module.parent.path if module.parent else module.path)
        target = f"{base}{target}"
    elif "." not in target:  # a name of the current module (or, for a method, of the current class)
        owner = obj if obj.is_class else (obj.parent if obj.parent is not None and obj.parent.is_class else None)
        if owner is not None and target in owner.members:
            target = f"{owner.path}.{target}"
        else:
            target = f"{module.path}.{target}"
    target = _canonical(target, collection)
    return f'<autoref identifier="{html.escape(target)}" optional><code>{html.escape(title)}</code></autoref>'


class SphinxRoles(griffe.Extension):
    """Rewrite docstrings once a package is loaded (before mkdocstrings parses them)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                value = _ROLE.sub(lambda m: _role_to_autoref(m, obj, collection), obj.docstring.value)
                obj.docstring.value = _LONE_LITERAL.sub("", _LITERAL.sub(":", value))
            stack.extend(member for member in obj.members.values() if not member.is_alias)
