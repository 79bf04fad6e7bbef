"""``docs/dev/architecture.md`` draws the layer table that ``tests/test_architecture.py`` enforces (``LAYERS``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "dev" / "architecture.md"
MARKER = "<!-- the table below is checked against LAYERS in tests/test_architecture.py -->"


def _layers() -> list[tuple[str, tuple[str, ...]]]:
    spec = importlib.util.spec_from_file_location("_architecture_rules", REPO / "tests" / "test_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LAYERS


def _page_table() -> list[tuple[str, tuple[str, ...]]]:
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    assert MARKER in lines, f"{PAGE} lost its layer table marker {MARKER!r}"
    rows = []
    for line in lines[lines.index(MARKER) + 3 :]:  # marker, header, separator
        if not line.startswith("|"):
            break
        layer, modules = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((layer, tuple("hfcompress." + m for m in re.findall(r"`([^`]+)`", modules))))
    return rows


def test_the_architecture_page_draws_the_enforced_layers() -> None:
    assert _page_table() == [(name, tuple(prefixes)) for name, prefixes in _layers()], (
        "docs/dev/architecture.md's layer table differs from LAYERS in tests/test_architecture.py; update the page"
    )
