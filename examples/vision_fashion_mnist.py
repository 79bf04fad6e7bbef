"""Vision end to end: train a small ViT and ResNet on Fashion-MNIST (CPU), compress them, compare top-1 accuracy.

Needs Debian's Fashion-MNIST files (offline)::

    apt-get update && apt-get install -y dataset-fashion-mnist
    python examples/vision_fashion_mnist.py                 # full 10k test set, both architectures
    python examples/vision_fashion_mnist.py --archs resnet --eval-samples 2000

The first run trains each model on one CPU thread (a few minutes each) and caches the checkpoint (with its
image processor) under the hfcompress cache folder; later runs reuse it. Every compressed variant goes
through the public API: data-free RTN through ``from_pretrained(path, quantization_config=...)``, the
calibrated methods (GPTQ, SparseGPT) through ``hfcompress.oneshot`` on training images preprocessed by the
model's own image processor. Top-1 accuracy comes from the evaluation harness
(:class:`hfcompress.harness.ImageClassificationTask`, ``evaluate``'s image-classification evaluator over
an ``image-classification`` pipeline). Convolutions (ResNet) and Linear layers (ViT, ResNet has none
besides its head) are compressed; stems and classifier heads stay dense (the default ignore list).

Targets (accuracy drop vs the dense model, percentage points): W8 <= 0.2, GPTQ W4 g64 <= 1.0,
SparseGPT 50% <= 1.5. The script prints one table and exits with status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.harness import ImageClassificationTask
from hfcompress.report import compression_report
from hfcompress.testing.fashion_mnist import fashion_mnist_model_path
from hfcompress.vision import fashion_mnist_available, fashion_mnist_dataset

TARGETS = ["Linear", "Conv2d"]
#: (label, config, max accuracy drop in points or None when no target is set)
VARIANTS = [
    ("RTN W8", dict(method="rtn", bits=8, group_size=None), 0.2),
    ("GPTQ W8", dict(method="gptq", bits=8, group_size=None), 0.2),
    ("RTN W4 g64", dict(method="rtn", bits=4, group_size=64), None),
    ("GPTQ W4 g64", dict(method="gptq", bits=4, group_size=64), 1.0),
    ("SparseGPT 50%", dict(method="sparsegpt", sparsity=0.5), 1.5),
    ("SparseGPT 2:4", dict(method="sparsegpt", sparsity=0.5, sparsity_structure="2:4"), None),
]


def _bits_per_weight(model) -> float:
    report = compression_report(model)
    numel = sum(torch.Size(layer["shape"]).numel() for layer in report["layers"])
    return 8 * report["compressed_bytes"] / max(numel, 1)


def _compressed(path, processor, label, values, calibration, num_samples):
    config = HfCompressConfig(targets=TARGETS, **values)
    if config.method == "rtn":
        return AutoModelForImageClassification.from_pretrained(path, quantization_config=config)
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32)
    hfcompress.oneshot(
        model, config, calibration, image_processor=processor, num_samples=num_samples, batch_size=64, show_progress=False
    )
    return model


def run(archs, eval_samples, calib_samples, steps):
    test = fashion_mnist_dataset("test", limit=eval_samples)
    calibration = fashion_mnist_dataset("train", limit=10_000)
    task = ImageClassificationTask(test, batch_size=256, n_resamples=0)
    rows = []
    for arch in archs:
        start = time.perf_counter()
        path = fashion_mnist_model_path(arch, steps=steps.get(arch))
        print(f"[{arch}] checkpoint {path} ({time.perf_counter() - start:.0f}s)", flush=True)
        processor = AutoImageProcessor.from_pretrained(path)
        dense = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
        base = task.compare(dense, processor).compressed.value * 100
        rows.append(dict(arch=arch, variant="dense fp32", bits=32.0, top1=base, drop=0.0, target=None, ok=True))
        print(f"[{arch}] dense top-1 {base:.2f}%", flush=True)
        for label, values, target in VARIANTS:
            start = time.perf_counter()
            model = _compressed(path, processor, label, values, calibration, calib_samples).eval()
            seconds = time.perf_counter() - start
            top1 = task.compare(model, processor).compressed.value * 100
            drop = base - top1
            ok = target is None or drop <= target + 1e-9
            rows.append(dict(arch=arch, variant=label, bits=_bits_per_weight(model), top1=top1, drop=drop, target=target, ok=ok, compress_s=seconds))
            print(f"[{arch}] {label}: top-1 {top1:.2f}% (drop {drop:+.2f}) compressed in {seconds:.1f}s", flush=True)
    return rows


def table(rows, eval_samples) -> str:
    lines = [
        f"Top-1 accuracy on the Fashion-MNIST test set ({eval_samples} images); bits/weight over compressed layers",
        "",
        "| model | variant | bits/weight | top-1 (%) | drop (points) | target | met |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target']:.1f}"
        met = "" if r["target"] is None else ("yes" if r["ok"] else "NO")
        lines.append(f"| {r['arch']} | {r['variant']} | {r['bits']:.2f} | {r['top1']:.2f} | {r['drop']:+.2f} | {target} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vit", "resnet"], choices=["vit", "resnet"])
    parser.add_argument("--eval-samples", type=int, default=10_000, help="test images scored (max 10000)")
    parser.add_argument("--calib-samples", type=int, default=512, help="training images GPTQ/SparseGPT calibrate on")
    parser.add_argument("--vit-steps", type=int, default=None, help="training steps of the ViT (default: library default)")
    parser.add_argument("--resnet-steps", type=int, default=None, help="training steps of the ResNet")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not fashion_mnist_available():
        print("Fashion-MNIST is not installed: apt-get update && apt-get install -y dataset-fashion-mnist", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = run(args.archs, min(args.eval_samples, 10_000), args.calib_samples, {"vit": args.vit_steps, "resnet": args.resnet_steps})
    print()
    print(table(rows, min(args.eval_samples, 10_000)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
