"""The import structure of the package: no cycles, no arrow that runs back up, a light ``import hfcompress``.

Every ``import``/``from ... import`` of every module counts, at module level or inside a function (a lazy import
is still a dependency), except those under ``if TYPE_CHECKING:``. :data:`LAYERS` is the architecture, bottom
first; a module belongs to the layer of the longest prefix of its name listed there, and may import modules of
its own layer or of the layers below it. ``docs/dev/architecture.md`` draws the same table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hfcompress"

#: the layers, bottom first: (name, module prefixes)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", (
        "hfcompress._version", "hfcompress.registry", "hfcompress.spec", "hfcompress.grid", "hfcompress.bitpack",
        "hfcompress.checkpoint", "hfcompress.outputs", "hfcompress.presets", "hfcompress.evaluation",
        "hfcompress.lossless", "hfcompress.integrity", "hfcompress.calibration", "hfcompress.vision",
    )),
    ("sparsity math", ("hfcompress.sparsity",)),
    ("formats", ("hfcompress.formats",)),
    ("algorithms", ("hfcompress.algorithms",)),
    ("config", ("hfcompress.config", "hfcompress.recipes")),
    ("kernels", ("hfcompress.kernels",)),
    ("modules", ("hfcompress.modules", "hfcompress.storage", "hfcompress.inference", "hfcompress.report", "hfcompress.distributed")),
    ("plan", ("hfcompress.plan", "hfcompress.calibration.pipeline", "hfcompress.calibration.step", "hfcompress.inspection")),
    ("entry points", (
        "hfcompress.bindings", "hfcompress.quantizer", "hfcompress.apply", "hfcompress.oneshot", "hfcompress.convert", "hfcompress.streaming",
        "hfcompress.peft", "hfcompress.harness", "hfcompress.search",
    )),
    ("publishing", ("hfcompress.hub", "hfcompress.export")),
    ("interfaces", ("hfcompress.cli", "hfcompress.testing")),
]  # fmt: skip
TOP = "hfcompress"  # the package's own namespace: lazy re-exports of the public API, above everything


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip |= {id(n) for n in ast.walk(child)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of hfcompress it imports}``."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
                targets = subs + ([source] if len(subs) < len(node.names) else [])
            else:
                continue
            for target in targets:
                if target == TOP or target.startswith(TOP + "."):
                    resolved = resolve(target)
                    if resolved and resolved != name:
                        edges.add(resolved)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if module == TOP:
        return len(LAYERS)
    assert rank is not None, f"{module} belongs to no layer of LAYERS; add it to the layer it sits in."
    return rank


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_import_runs_back_up():
    graph = import_graph()
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0] if t != TOP else 'the top namespace'})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports_and_the_rules_can_fail():
    """The checks above are only as good as the graph: it must see module-level, lazy and relative imports."""
    graph = import_graph()
    assert "hfcompress.registry" in graph["hfcompress.formats"]  # module level, relative
    assert "hfcompress.plan.allocation" in graph["hfcompress.apply"]  # inside a function
    assert "hfcompress.bitpack" in graph["hfcompress.formats.packed"]  # `from ..bitpack import`
    assert "hfcompress.algorithms.gptq" in graph["hfcompress.algorithms.blocktune"]
    assert layer_of("hfcompress.hub.card") > layer_of("hfcompress.quantizer") > layer_of("hfcompress.spec")


#: what ``import hfcompress`` must not load: methods, the calibration pipeline, Hub, PEFT, export, evaluation
HEAVY = ("hfcompress.algorithms.gptq", "hfcompress.calibration.pipeline", "hfcompress.hub", "hfcompress.peft",
         "hfcompress.export", "hfcompress.harness", "hfcompress.streaming", "hfcompress.search", "peft", "datasets")  # fmt: skip


def test_import_hfcompress_loads_only_what_loading_needs():
    code = "import sys, hfcompress; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert "hfcompress.quantizer" in loaded  # the transformers integration is registered
    assert not [m for m in HEAVY if m in loaded], f"import hfcompress loaded {[m for m in HEAVY if m in loaded]}"


def test_public_names_resolve_lazily():
    code = (
        "import sys, hfcompress\n"
        "assert 'hfcompress.oneshot' not in sys.modules\n"
        "from hfcompress import oneshot, compress, export, available_methods\n"
        "assert callable(oneshot) and callable(compress) and callable(export)\n"
        "assert {'gptq', 'rtn', 'sparsegpt', 'admm'} <= set(available_methods())\n"
        "assert sorted(hfcompress.__all__) == hfcompress.__all__ and all(hasattr(hfcompress, n) for n in hfcompress.__all__)\n"
        "try:\n    hfcompress.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\nelse:\n    raise SystemExit(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
