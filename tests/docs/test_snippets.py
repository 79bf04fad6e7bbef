"""The documentation's Python blocks run as tests, so the docs cannot silently rot.

Every ```` ```python ```` block under ``docs/`` carries a marker, an HTML comment on the line just before it
(invisible on GitHub and on the site)::

    <!-- snippet: fast -->             runs in the default suite: seconds, tiny random models built in the block
    <!-- snippet: slow -->             marked ``slow`` (``-m slow``): may load the real embedded models
    <!-- snippet: skip REASON -->      not run (a REASON is required, e.g. it needs the Hub or a GPU); it is still
                                       compiled, so a syntax error fails
    <!-- snippet: fast, continue -->   appended to the previous runnable block of the same page, sharing its state
    <!-- snippet: slow, continue -->   the same for a slow chain (a chain keeps the speed of its first block)

A Python block without a marker, an unknown marker, ``skip`` without a reason or a ``continue`` with nothing
to continue fails. Each chain of blocks runs in a fresh subprocess (``HF_HUB_OFFLINE=1``, a temporary working
directory, a timeout). The script keeps the page's line numbers and is compiled under the page's path, so a
traceback names ``docs/<page>.md`` and the failing line; test ids are ``<page>:<line>`` (``+<line>`` for each
continued block).

Internal API used by the snippets (update the pages when it moves):

* the slow snippets get the real models with ``hfcompress.testing.models.real_model_path`` (it was
  ``hfcompress.models.real_model_path`` before the package refactor);
* ``docs/dev/add-a-format.md`` subclasses the format contract ``hfcompress.formats.WeightFormat``;
* ``docs/guides/streaming.md`` shows ``hfcompress.distributed`` in a block that is skipped (it needs a
  multi-process launcher).

Every other snippet imports only from ``hfcompress`` and its public modules (config, spec, grid, oneshot, apply,
export, peft, hub, streaming, evaluation, convert, harness), transformers, peft, datasets, safetensors and torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
FAST_TIMEOUT_S = 300  # a fast snippet takes seconds; the margin is for a loaded 2-core machine (imports ~6 s)
SLOW_TIMEOUT_S = 1800

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<body>.*?)\s*-->\s*$")
_PYTHON = {"python", "py", "python3"}


@dataclasses.dataclass
class Block:
    page: str  # relative to docs/, e.g. "guides/peft.md"
    line: int  # 1-based line of the block's first code line
    code: list[str]
    marker: str | None


@dataclasses.dataclass
class Snippet:
    """One test: a chain of blocks to run, a skipped block to compile, or a marking error."""

    page: str
    kind: str  # "fast", "slow", "skip" or "error"
    blocks: list[Block]
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:" + "+".join(str(b.line) for b in self.blocks)


def python_blocks(path: Path, docs: Path = DOCS) -> list[Block]:
    """The fenced Python blocks of a Markdown file, with the marker on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(docs).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            j += 1
        if info in _PYTHON:
            marker = _MARKER.match(lines[i - 1]) if i > 0 else None
            code = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : j]]
            blocks.append(Block(page, i + 2, code, marker.group("body") if marker else None))
        i = j + 1
    return blocks


def snippets(docs: Path = DOCS) -> list[Snippet]:
    found: list[Snippet] = []
    for path in sorted(docs.rglob("*.md")):
        last_runnable: Snippet | None = None
        for block in python_blocks(path, docs):
            body = (block.marker or "").strip()
            words = [w.strip() for w in body.split(",")]
            if block.marker is None:
                found.append(Snippet(block.page, "error", [block], "the python block has no `<!-- snippet: fast|slow|skip REASON -->` marker on the line before it"))
            elif body.split(None, 1)[0:1] == ["skip"]:
                reason = body[4:].strip()
                if reason:
                    found.append(Snippet(block.page, "skip", [block], reason))
                else:
                    found.append(Snippet(block.page, "error", [block], "`skip` needs a reason: <!-- snippet: skip REASON -->"))
            elif words in (["fast"], ["slow"]):
                last_runnable = Snippet(block.page, words[0], [block])
                found.append(last_runnable)
            elif len(words) == 2 and words[0] in ("fast", "slow") and words[1] == "continue":
                if last_runnable is None:
                    found.append(Snippet(block.page, "error", [block], "`continue` but no runnable block before it on this page"))
                elif last_runnable.kind != words[0]:
                    found.append(Snippet(block.page, "error", [block], f"`{words[0]}, continue` continues a {last_runnable.kind} chain"))
                else:
                    last_runnable.blocks.append(block)
            else:
                found.append(Snippet(block.page, "error", [block], f"unknown snippet marker {body!r}; use fast, slow, skip REASON, or fast/slow, continue"))
    return found


def script(snippet: Snippet) -> str:
    """The chain's code, each line at its page line number (blank lines in between)."""
    out: list[str] = []
    for block in snippet.blocks:
        out.extend([""] * (block.line - 1 - len(out)))
        out.extend(block.code)
    return "\n".join(out) + "\n"


_ALL = snippets()


def _param(s: Snippet):
    marks = [pytest.mark.slow] if s.kind == "slow" else []
    return pytest.param(s, id=s.id, marks=marks)


_RUNNER = (
    "import sys; page, path = sys.argv[1], sys.argv[2]; "
    "exec(compile(open(path, encoding='utf-8').read(), page, 'exec'), {'__name__': '__main__'})"
)


@pytest.mark.parametrize("snippet", [_param(s) for s in _ALL if s.kind in ("fast", "slow")])
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    source = tmp_path / "snippet_source.py"
    source.write_text(script(snippet), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    timeout = SLOW_TIMEOUT_S if snippet.kind == "slow" else FAST_TIMEOUT_S
    page = str(DOCS / snippet.page)
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, page, str(source)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"docs/{snippet.id} did not finish within {timeout} s.\n{(exc.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(
            f"docs/{snippet.id} failed (exit code {proc.returncode}).\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}",
            pytrace=False,
        )


@pytest.mark.parametrize("snippet", [_param(s) for s in _ALL if s.kind == "skip"])
def test_skipped_snippet_compiles(snippet: Snippet) -> None:
    compile(script(snippet), str(DOCS / snippet.page), "exec")  # a syntax error fails even when not run
    pytest.skip(f"docs/{snippet.id}: {snippet.reason}")


@pytest.mark.parametrize("snippet", [_param(s) for s in _ALL if s.kind == "error"])
def test_snippet_is_marked(snippet: Snippet) -> None:
    pytest.fail(f"docs/{snippet.id}: {snippet.reason}", pytrace=False)


def test_the_quickstart_and_every_guide_have_a_runnable_snippet() -> None:
    pages = ["quickstart.md"] + sorted(p.relative_to(DOCS).as_posix() for p in (DOCS / "guides").glob("*.md"))
    runnable = {s.page for s in _ALL if s.kind in ("fast", "slow")}
    missing = [p for p in pages if p not in runnable]
    assert len(pages) > 1, f"no guides found under {DOCS}"
    assert not missing, f"pages without a runnable (fast or slow) python snippet: {missing}"


def test_the_marker_parser(tmp_path: Path) -> None:
    """Markers are read from the line just before a python block; bash blocks are ignored."""
    (tmp_path / "p.md").write_text(
        "# t\n\n<!-- snippet: fast -->\n```python\na = 1\n```\n\ntext\n<!-- snippet: fast, continue -->\n"
        "```python\nassert a == 1\n```\n\n```bash\necho not run\n```\n\n```python\nunmarked = True\n```\n"
        "<!-- snippet: skip -->\n```python\nx = 1\n```\n<!-- snippet: skip needs a GPU -->\n```py\ny = 2\n```\n",
        encoding="utf-8",
    )
    found = snippets(tmp_path)
    assert [(s.kind, s.id) for s in found] == [
        ("fast", "p.md:5+11"), ("error", "p.md:19"), ("error", "p.md:23"), ("skip", "p.md:27"),
    ]  # fmt: skip
    lines = script(found[0]).splitlines()
    assert lines[4] == "a = 1" and lines[10] == "assert a == 1"
