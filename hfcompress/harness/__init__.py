"""Evaluation harness: score a compressed model against its dense original and report the comparison.

::

    from hfcompress.harness import PerplexityTask, write_report

    result = PerplexityTask(seq_len=512, max_windows=8).compare(compressed, tokenizer, dense=dense)
    write_report([result], "eval-out")          # report.md, report.json, report.png

Tasks: :class:`PerplexityTask` (causal LMs), :class:`ImageClassificationTask` (top-1 through
``evaluate``'s image-classification evaluator), :class:`EmbeddingFidelityTask` (encoders). Results go
into model cards with :func:`hfcompress.hub.model_card` (``eval_results=``) or ``hfcompress eval
--write-card``.
"""

from .report import EVAL_RESULTS_FILE, eval_results_for_card, load_results, markdown_report, plot_report, write_report
from .tasks import (
    EmbeddingFidelityTask,
    ImageClassificationTask,
    ModelScore,
    PerplexityTask,
    TaskResult,
    load_text,
    model_bytes,
)

__all__ = [
    "EVAL_RESULTS_FILE",
    "EmbeddingFidelityTask",
    "ImageClassificationTask",
    "ModelScore",
    "PerplexityTask",
    "TaskResult",
    "eval_results_for_card",
    "load_results",
    "load_text",
    "markdown_report",
    "model_bytes",
    "plot_report",
    "write_report",
]
