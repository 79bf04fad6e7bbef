"""Fashion-MNIST read offline from Debian's ``dataset-fashion-mnist`` package, and image calibration batches.

The package (``apt-get install dataset-fashion-mnist``) installs the four original IDX files under
``/usr/share/datasets/fashion-mnist/`` (60k training / 10k test 28x28 grayscale images, 10 classes).
:func:`fashion_mnist_arrays` parses them with numpy (no download, no torchvision);
:func:`fashion_mnist_dataset` wraps a split as a ``datasets.Dataset`` with ``image`` (PIL, mode ``L``)
and ``label`` (``ClassLabel``) columns, the shape the evaluation harness and image processors expect.

:func:`image_calibration_batches` turns a labelled/unlabelled image dataset into the forward batches
``hfcompress.oneshot`` calibrates on (``{"pixel_values": ...}``), through the model's image processor.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "fashion_mnist_arrays",
    "fashion_mnist_available",
    "fashion_mnist_dataset",
    "fashion_mnist_dir",
    "image_calibration_batches",
    "image_column_of",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: per-pixel mean / standard deviation of the training images scaled to [0, 1]
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = "install it with: apt-get update && apt-get install -y dataset-fashion-mnist"


def fashion_mnist_dir() -> Path:
    """Folder of the IDX files (``$HFCOMPRESS_FASHION_MNIST`` or Debian's ``/usr/share/datasets/fashion-mnist``)."""
    return Path(os.environ.get("HFCOMPRESS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def fashion_mnist_available() -> bool:
    """Whether all four Fashion-MNIST files are installed."""
    root = fashion_mnist_dir()
    return all((root / name).is_file() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found, *dims = struct.unpack(f">{1 + ndim}I", data[: 4 * (1 + ndim)])
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found:#x}, expected {magic:#x}).")
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {arr.size} values for shape {tuple(dims)}.")
    return arr.reshape(dims)


def fashion_mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 28, 28], labels int64 [n])`` of ``split`` (``"train"``: 60k, ``"test"``: 10k)."""
    if split not in _FILES:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; use 'train' or 'test'.")
    root = fashion_mnist_dir()
    images_name, labels_name = _FILES[split]
    if not (root / images_name).is_file() or not (root / labels_name).is_file():
        raise FileNotFoundError(f"Fashion-MNIST is not installed under {root}; {_INSTALL_HINT}.")
    images = _read_idx(root / images_name, 0x00000803, 3)
    labels = _read_idx(root / labels_name, 0x00000801, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels under {root}.")
    return images, labels


def fashion_mnist_dataset(split: str = "test", limit: int | None = None):
    """Split ``split`` as a ``datasets.Dataset`` with ``image`` (PIL ``L``) and ``label`` (ClassLabel) columns."""
    import datasets
    from PIL import Image

    images, labels = fashion_mnist_arrays(split)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit={limit!r} must be a positive integer (number of rows) or None.")
        images, labels = images[:limit], labels[:limit]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(img, mode="L") for img in images], "label": labels.tolist()},
        features=features,
        split=split,
        info=datasets.DatasetInfo(dataset_name="fashion_mnist", features=features),
    )


def image_column_of(dataset: Any, image_column: str | None = None) -> str | None:
    """The image column of a ``datasets`` dataset (``image_column``, else the first ``Image`` feature)."""
    names = list(getattr(dataset, "column_names", None) or [])
    if image_column is not None:
        if names and image_column not in names:
            raise ValueError(f"image_column={image_column!r} is not a column of the dataset; its columns are {names}.")
        return image_column
    features = getattr(dataset, "features", None) or {}
    import datasets

    for name in names:
        if isinstance(features.get(name), datasets.Image):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in names:
            return name
    return None


def image_calibration_batches(
    dataset: Any,
    image_processor=None,
    *,
    num_samples: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    image_column: str | None = None,
    main_input_name: str = "pixel_values",
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` images drawn by ``seed`` from ``dataset``, preprocessed, as forward batches.

    Args:
        dataset: a ``datasets.Dataset`` with an image column, or a sequence of PIL images / arrays.
        image_processor: the model's image processor (``AutoImageProcessor.from_pretrained(path)``); it
            resizes and normalises exactly as at inference.
        num_samples: images used (all of them when the dataset is smaller).
        batch_size: images per forward pass.
        seed: selects the images; the same seed gives the same batches.
        image_column: column holding the images (default: the first ``datasets.Image`` column).
        main_input_name: the key the model reads (``model.main_input_name``).
    """
    if image_processor is None:
        raise ValueError(
            "Image calibration data needs the model's image processor: pass "
            "image_processor=AutoImageProcessor.from_pretrained(<model folder>)."
        )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer, e.g. 128.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer, e.g. 8.")
    if isinstance(dataset, Mapping) or isinstance(dataset, (str, bytes)):
        raise TypeError(f"dataset of type {type(dataset).__name__} is not an image collection.")
    column = image_column_of(dataset, image_column) if hasattr(dataset, "column_names") else None
    if hasattr(dataset, "column_names") and column is None:
        raise ValueError(f"The dataset has no image column (columns: {dataset.column_names}); pass image_column='...'.")
    if not isinstance(dataset, Sequence) and not hasattr(dataset, "select"):
        raise TypeError(
            f"dataset of type {type(dataset).__name__} is not supported for images; pass a datasets.Dataset with an "
            "image column or a list of PIL images."
        )
    total = len(dataset)
    if total == 0:
        raise ValueError("The image dataset is empty; pass at least one image.")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    order = order[: min(num_samples, total)]
    if column is not None:
        images = list(dataset.select(order)[column])
    else:
        images = [dataset[i] for i in order]
    images = [img.convert(_mode(image_processor, img)) if hasattr(img, "convert") else img for img in images]
    batches = []
    for start in range(0, len(images), batch_size):
        out = image_processor(images[start : start + batch_size], return_tensors="pt")
        batches.append({main_input_name: out["pixel_values"]})
    return batches


def _mode(image_processor, img) -> str:
    """Grayscale images stay ``L`` for single-channel processors, everything else becomes RGB."""
    mean = getattr(image_processor, "image_mean", None)
    channels = len(mean) if isinstance(mean, (list, tuple)) else 3
    if channels == 1:
        return "L"
    return "RGB" if img.mode != "RGB" else img.mode
