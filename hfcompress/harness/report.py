"""Comparison reports (dense vs compressed) as Markdown, JSON and a PNG plot, and model-index entries.

The JSON file (``report.json``, also saved as ``eval_results.json`` in a model folder by
``hfcompress eval --write-card``) is the exchange format: :func:`load_results` reads it back and the
model card renders its table and ``model-index`` from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .tasks import TaskResult
from ..outputs import write_file_atomic

__all__ = [
    "EVAL_RESULTS_FILE",
    "eval_results_for_card",
    "load_results",
    "markdown_report",
    "plot_report",
    "results_json",
    "write_report",
]

#: file name of the results kept next to a compressed checkpoint (read by the model card)
EVAL_RESULTS_FILE = "eval_results.json"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.{digits}g}"


def _mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.2f} MiB"


def results_json(results: list[TaskResult]) -> dict[str, Any]:
    from .._version import __version__

    return {"hfcompress_version": __version__, "results": [r.to_dict() for r in results]}


def load_results(path: str | os.PathLike) -> list[TaskResult]:
    """Results from a ``report.json``/``eval_results.json`` file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path} is not an hfcompress evaluation report (no 'results' list).")
    return [TaskResult.from_dict(r) for r in data["results"]]


def markdown_report(results: list[TaskResult], title: str = "Dense vs compressed") -> str:
    """A Markdown report: one table row per task, then per-task details."""
    lines = [f"# {title}", "", "| Task | Metric | Dataset | Dense | Compressed | Δ | Dense size | Compressed size |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        delta = r.delta
        rel = r.relative_delta
        delta_text = "–" if delta is None else f"{delta:+.4g}" + ("" if rel is None else f" ({100 * rel:+.2f}%)")
        lines.append(
            f"| {r.task} | {r.metric_type} ({'higher' if r.higher_is_better else 'lower'} is better) | "
            f"{r.dataset.get('name')} | {_fmt(r.dense.value if r.dense else None)} | {_fmt(r.compressed.value)} | "
            f"{delta_text} | {_mib(r.dense.nbytes if r.dense else None)} | {_mib(r.compressed.nbytes)} |"
        )
    for r in results:
        lines += ["", f"## {r.metric_name}", ""]
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in r.settings.items()))
        for score in (r.dense, r.compressed):
            if score is None:
                continue
            details = ", ".join(f"{k}={v}" for k, v in score.details.items())
            lines.append(f"- **{score.name}**: {_fmt(score.value, 6)} in {score.seconds:.1f} s" + (f" ({details})" if details else ""))
        for key, value in r.extra.items():
            lines.append(f"- {key.replace('_', ' ')}: {_fmt(value, 6) if isinstance(value, float) else value}")
    return "\n".join(lines) + "\n"


def plot_report(results: list[TaskResult], path: str | os.PathLike) -> Path:
    """A PNG with one panel per task (dense vs compressed metric) and one with the weight sizes."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("The PNG plot needs matplotlib: pip install matplotlib (or pip install 'hfcompress[eval]').") from None
    panels = len(results) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.2), squeeze=False)
    colours = {"dense": "#7f7f7f", "compressed": "#1f77b4"}
    for ax, r in zip(axes[0], results):
        labels, values = [], []
        if r.dense is not None:
            labels.append("dense")
            values.append(r.dense.value)
        labels.append("compressed")
        values.append(r.compressed.value)
        bars = ax.bar(labels, values, color=[colours[label] for label in labels])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        ax.set_title(f"{r.metric_type}\n({'higher' if r.higher_is_better else 'lower'} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.15)
    ax = axes[0][-1]
    first = results[0]
    sizes = [("compressed", first.compressed.nbytes)]
    if first.dense is not None:
        sizes.insert(0, ("dense", first.dense.nbytes))
    bars = ax.bar([s[0] for s in sizes], [s[1] / 2**20 for s in sizes], color=[colours[s[0]] for s in sizes])
    ax.bar_label(bars, labels=[_fmt(s[1] / 2**20, 3) for s in sizes], fontsize=8)
    ax.set_title("weights (MiB)", fontsize=9)
    ax.margins(y=0.15)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def _write_text(path: Path, text: str) -> None:
    write_file_atomic(path, text)


def write_report(
    results: list[TaskResult], out_dir: str | os.PathLike, title: str = "Dense vs compressed", plot: bool = True
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and (``plot=True``) ``report.png`` into ``out_dir``; each file
    is written to a temporary name and renamed, so readers never see a half-written report."""
    if not results:
        raise ValueError("results is empty: run at least one task.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    _write_text(paths["json"], json.dumps(results_json(results), indent=2) + "\n")
    _write_text(paths["markdown"], markdown_report(results, title))
    if plot:
        paths["png"] = plot_report(results, out / "report.png")
    return paths


def eval_results_for_card(results: list[TaskResult]) -> list:
    """``huggingface_hub.EvalResult`` entries (the card's ``model-index``) for the compressed model's scores."""
    from huggingface_hub import EvalResult

    out = []
    for r in results:
        args = {k: v for k, v in r.settings.items() if isinstance(v, (int, float, str, bool))}
        out.append(
            EvalResult(
                task_type=r.task_type, dataset_type=str(r.dataset.get("type") or "custom"),
                dataset_name=str(r.dataset.get("name") or r.dataset.get("type") or "custom"),
                dataset_config=r.dataset.get("config"), dataset_split=r.dataset.get("split"),
                metric_type=r.metric_type, metric_value=round(float(r.compressed.value), 6), metric_name=r.metric_name,
                metric_args=args or None,
            )
        )  # fmt: skip
    return out
