"""The documentation site builds with ``mkdocs build --strict``: no broken link or anchor, no missing page, no
warning from the API reference (mkdocstrings). This is how CI checks the site (``.ci/run`` builds it too)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MISSING = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if importlib.util.find_spec(name.split(".")[0]) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"the docs tools are not installed ({', '.join(MISSING)}): pip install -e '.[docs]'")
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    site = tmp_path / "site"
    for page in ("index.html", "quickstart/index.html", "reference/api/index.html", "results/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    api = (site / "reference/api/index.html").read_text(encoding="utf-8")
    for module in ("config", "spec", "grid", "oneshot", "apply", "export", "peft", "hub", "streaming", "evaluation", "convert", "harness"):
        assert f'id="hfcompress.{module}"' in api, f"the API reference lost hfcompress.{module}"
    assert ":class:`" not in api and ":func:`" not in api, "Sphinx roles were rendered literally (docs/hooks/rst_roles.py)"
