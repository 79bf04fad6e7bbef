"""Vision helpers: offline Fashion-MNIST, image calibration batches, small trained classifiers.

* :mod:`.data`: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` files as numpy arrays or a
  ``datasets.Dataset``; :func:`image_calibration_batches` (what ``hfcompress.oneshot`` uses for images).
* :mod:`.fashion_mnist`: small ``ViTForImageClassification`` / ``ResNetForImageClassification`` trained on
  it on CPU and cached as HF checkpoints (:func:`fashion_mnist_model_path`).

Compressing a vision model needs nothing from here: ``from_pretrained(..., quantization_config=...)`` and
``hfcompress.oneshot(model, config, dataset, image_processor=...)`` handle Linear and Conv2d layers
(grouped and depthwise included), keeping patch/stem convolutions and classifier heads dense by default.
"""

from .data import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_arrays,
    fashion_mnist_available,
    fashion_mnist_dataset,
    fashion_mnist_dir,
    image_calibration_batches,
    image_column_of,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_arrays",
    "fashion_mnist_available",
    "fashion_mnist_dataset",
    "fashion_mnist_dir",
    "image_calibration_batches",
    "image_column_of",
]
