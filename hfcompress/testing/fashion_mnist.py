"""Small ViT and ResNet classifiers trained on Fashion-MNIST on CPU, cached as ordinary HF checkpoints.

:func:`fashion_mnist_model_path` trains (first call) and returns a local folder holding a
``ViTForImageClassification`` or ``ResNetForImageClassification`` plus its image processor, so
``from_pretrained(path)`` and the evaluation harness's image pipeline work on it unchanged. Checkpoints
live under ``<hfcompress cache>/models/fashion-mnist-<arch>-<steps>s-seed<seed>``; they are written to a
temporary folder and renamed into place, so an interrupted run never looks finished.

Training is deterministic for a given seed and thread count: AdamW with a cosine schedule, random
horizontal flips and 2-pixel translations, batches drawn by seed from the 60k training images.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import cache_dir
from ..vision.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_arrays

logger = logging.getLogger("hfcompress.vision")

__all__ = ["ARCHITECTURES", "build_model", "fashion_mnist_image_processor", "fashion_mnist_model_path", "to_rgb", "train"]

#: default number of optimisation steps (batch 64) per architecture: a few minutes on one CPU core
ARCHITECTURES = {"vit": 3000, "resnet": 1000}


def _labels() -> dict:
    id2label = {i: name for i, name in enumerate(FASHION_MNIST_CLASSES)}
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def build_model(arch: str, seed: int = 0):
    """A freshly initialised small classifier for 28x28 grayscale images (``"vit"`` or ``"resnet"``)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if arch == "vit":
        cfg = ViTConfig(
            image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_labels(),
        )  # fmt: skip
        return ViTForImageClassification(cfg)
    if arch == "resnet":
        cfg = ResNetConfig(
            num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
            downsample_in_first_stage=False, **_labels(),
        )  # fmt: skip
        return ResNetForImageClassification(cfg)
    raise ValueError(f"arch={arch!r} is not a Fashion-MNIST architecture; choose one of {sorted(ARCHITECTURES)}.")


def fashion_mnist_image_processor(channels: int = 3):
    """The image processor of the saved models: 28x28, scaled to [0, 1], normalised (``channels`` identical)."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=False, size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[FASHION_MNIST_MEAN] * channels, image_std=[FASHION_MNIST_STD] * channels,
    )  # fmt: skip


@torch.no_grad()
def to_rgb(model):
    """Make a model trained on 1-channel images take RGB input with identical outputs on gray images.

    ``image-classification`` pipelines convert every image to RGB, so a grayscale image arrives as three
    equal channels. The first convolution's weights are spread evenly over the three channels
    (``w / 3`` each), which computes the same sum; ``num_channels`` becomes 3 everywhere.
    """
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    if first.in_channels != 1:
        raise ValueError(f"to_rgb expects a model whose first convolution reads 1 channel, got {first.in_channels}.")
    first.weight = torch.nn.Parameter(first.weight.repeat(1, 3, 1, 1) / 3)
    first.in_channels = 3
    for module in model.modules():
        if getattr(module, "num_channels", None) == 1:
            module.num_channels = 3
    model.config.num_channels = 3
    return model


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def train(arch: str, steps: int | None = None, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log_every: int = 250):
    """Train :func:`build_model` ``(arch)`` on the Fashion-MNIST training split; returns the model (eval mode)."""
    steps = ARCHITECTURES.get(arch) if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer, e.g. {ARCHITECTURES.get(arch, 1000)}.")
    model = build_model(arch, seed)
    images, labels = fashion_mnist_arrays("train")
    x_all = _normalise(torch.from_numpy(images.copy())).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (batch_size,), generator=gen)
        loss = model(pixel_values=_augment(x_all[idx], gen), labels=y_all[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if log_every and (step + 1) % log_every == 0:
            logger.info("%s step %d/%d loss %.4f (%.0fs)", arch, step + 1, steps, running / log_every, time.perf_counter() - start)
            running = 0.0
    return model.eval()


def fashion_mnist_model_path(arch: str = "vit", steps: int | None = None, seed: int = 0, batch_size: int = 64) -> Path:
    """Local checkpoint folder of the ``arch`` classifier trained for ``steps`` steps, training it on first use.

    Trained on 1-channel images, saved for RGB input (:func:`to_rgb`) with an RGB image processor, as
    ``image-classification`` pipelines feed RGB.
    """
    steps = ARCHITECTURES.get(arch) if steps is None else steps
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not a Fashion-MNIST architecture; choose one of {sorted(ARCHITECTURES)}.")
    final = cache_dir() / "models" / f"fashion-mnist-{arch}-{steps}s-b{batch_size}-seed{seed}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    model = to_rgb(train(arch, steps=steps, batch_size=batch_size, seed=seed))
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        fashion_mnist_image_processor().save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
