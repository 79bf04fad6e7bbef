"""Real labelled images (Fashion-MNIST from Debian's dataset-fashion-mnist): train or reuse a small ResNet,
compress W8 through from_pretrained and W4 through oneshot GPTQ, score top-1 with the evaluation harness."""

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import hfcompress
from hfcompress import HfCompressConfig, compressed_modules
from hfcompress.harness import ImageClassificationTask
from hfcompress.testing.fashion_mnist import ARCHITECTURES, fashion_mnist_model_path
from hfcompress.vision import fashion_mnist_arrays, fashion_mnist_available, fashion_mnist_dataset
from hfcompress.testing.models import cache_dir

pytestmark = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="real-data vision tests need Fashion-MNIST: apt-get update && apt-get install -y dataset-fashion-mnist",
)

EVAL_SAMPLES = 2000


def test_fashion_mnist_files_parse():
    train_x, train_y = fashion_mnist_arrays("train")
    test_x, test_y = fashion_mnist_arrays("test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert sorted(set(train_y.tolist())) == list(range(10)) and (train_y == 0).sum() == 6000
    data = fashion_mnist_dataset("test", limit=5)
    assert data.features["label"].names[9] == "Ankle boot" and data[0]["image"].size == (28, 28)
    with pytest.raises(ValueError, match="split='val'"):
        fashion_mnist_arrays("val")


def _resnet_path():
    """The example's cached ResNet when present, else a quicker 300-step one (cached too)."""
    steps = ARCHITECTURES["resnet"]
    if (cache_dir() / "models" / f"fashion-mnist-resnet-{steps}s-b64-seed0" / "config.json").exists():
        return fashion_mnist_model_path("resnet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is fastest on a shared machine
    try:
        return fashion_mnist_model_path("resnet", steps=300)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_resnet_w8_and_gptq_w4_keep_top1_accuracy():
    path = _resnet_path()
    processor = AutoImageProcessor.from_pretrained(path)
    task = ImageClassificationTask(fashion_mnist_dataset("test", limit=EVAL_SAMPLES), batch_size=256, n_resamples=0)
    dense = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32)
    w8 = AutoModelForImageClassification.from_pretrained(
        path, quantization_config=HfCompressConfig(bits=8, group_size=None, targets=["Linear", "Conv2d"])
    )
    assert len(compressed_modules(w8)) >= 8  # every conv but the stem
    result = task.compare(w8, processor, dense=dense)
    assert result.dense.value > 0.80, f"the trained ResNet should reach >80% top-1, got {result.dense.value:.3f}"
    assert abs(result.delta) <= 0.003, f"W8 changed top-1 by {100 * result.delta:+.2f} points"
    assert result.extra["prediction_agreement"] >= 0.99
    w4 = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32)
    hfcompress.oneshot(
        w4, HfCompressConfig(method="gptq", bits=4, group_size=64, targets=["Linear", "Conv2d"]),
        fashion_mnist_dataset("train", limit=2000), image_processor=processor, num_samples=256, batch_size=64,
        show_progress=False,
    )  # fmt: skip
    w4_top1 = task.compare(w4, processor).compressed.value
    assert result.dense.value - w4_top1 <= 0.015, f"GPTQ W4 g64 lost {100 * (result.dense.value - w4_top1):.2f} points"
