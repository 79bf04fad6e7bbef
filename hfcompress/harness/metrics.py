"""Metrics as ``evaluate`` modules defined locally (``evaluate.load`` would fetch them from the Hub).

They plug into ``evaluate``'s evaluators and bootstrap confidence intervals like the Hub's modules do,
and keep their state in memory (no cache files).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

__all__ = ["EmbeddingCosine", "Top1Accuracy"]


class Top1Accuracy(evaluate.Metric):
    """Share of predictions equal to the reference label (``{"accuracy": float}``)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Top-1 accuracy: the fraction of predicted labels equal to the references.",
            citation="",
            inputs_description="predictions and references: integer class ids of the same length.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("Top1Accuracy needs at least one prediction.")
        return {"accuracy": float((predictions == references).mean())}


class EmbeddingCosine(evaluate.Metric):
    """Cosine similarity between paired embeddings (compressed vs dense): mean, minimum and 5th percentile."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Cosine similarity of each embedding to its reference embedding.",
            citation="",
            inputs_description="predictions and references: float vectors of equal length, one pair per input.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Sequence(datasets.Value("float32"))}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        p = np.asarray(predictions, dtype=np.float64)
        r = np.asarray(references, dtype=np.float64)
        if p.shape != r.shape or p.ndim != 2 or p.shape[0] == 0:
            raise ValueError(f"EmbeddingCosine needs two equal [n, dim] arrays with n > 0, got {p.shape} and {r.shape}.")
        norms = np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1)
        cos = (p * r).sum(axis=1) / np.maximum(norms, 1e-12)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p05": float(np.percentile(cos, 5))}
