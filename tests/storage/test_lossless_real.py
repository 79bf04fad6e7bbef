"""The lossless stage on the real SmolLM2-135M and all-MiniLM-L6-v2 checkpoints (slow)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the quantizer)
from hfcompress.convert import convert_checkpoint
from hfcompress.lossless import decode_tensor, encode_tensor, supported

pytestmark = pytest.mark.slow
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def tensor_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_every_tensor_round_trips_bit_exactly(name, request):
    path = request.getfixturevalue(f"{name}_path")
    sd = load_file(str(path / "model.safetensors"))
    variants = [sd]
    if any(t.dtype == torch.float32 for t in sd.values()):  # MiniLM ships float32: check it and its bf16 cast
        variants.append({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()})
    checked = 0
    for tensors in variants:
        for key, t in tensors.items():
            if not supported(t.dtype):
                continue
            out = decode_tensor(encode_tensor(t), where=key)
            assert out.dtype == t.dtype and out.shape == t.shape, key
            assert torch.equal(bits(out), bits(t)), key
            checked += 1
    assert checked >= len(sd) - 1  # everything but int64 position ids


def test_smollm2_lossless_twin_is_small_and_bit_exact(smollm2_path, tmp_path):
    out = convert_checkpoint(smollm2_path, tmp_path / "smollm2-lossless")
    ratio = tensor_bytes(out) / tensor_bytes(smollm2_path)
    assert ratio <= 0.670, f"{100 * ratio:.2f}% of bf16"
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied embedding is coded once and re-tied
    a, b = model.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def test_minilm_bf16_lossless_twin_is_small_and_bit_exact(minilm_path, tmp_path):
    out = convert_checkpoint(minilm_path, tmp_path / "minilm-lossless", dtype="bfloat16")
    bf16_bytes = sum(
        t.numel() * (2 if t.is_floating_point() else t.element_size())
        for t in load_file(str(minilm_path / "model.safetensors")).values()
    )
    ratio = tensor_bytes(out) / bf16_bytes
    assert ratio <= 0.670, f"{100 * ratio:.2f}% of bf16"
    assert (out / "1_Pooling").is_dir() and (out / "tokenizer.json").is_file()  # the rest of the folder is copied
    model = AutoModel.from_pretrained(out)
    ref = AutoModel.from_pretrained(minilm_path, dtype=torch.bfloat16)
    a, b = model.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


@pytest.mark.parametrize("mode", ["lazy", "first_forward"])
def test_minilm_deferred_decoding_matches_eager(minilm_path, tmp_path, mode):
    import json
    import struct

    from hfcompress import HfCompressConfig
    from hfcompress.storage.lazy import deferred

    def content(path):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        return json.loads(raw[8 : 8 + n]), raw[8 + n :]

    out = convert_checkpoint(minilm_path, tmp_path / "minilm-lossless", dtype="bfloat16")
    eager = AutoModel.from_pretrained(out)
    lazy = AutoModel.from_pretrained(out, quantization_config=HfCompressConfig(lossless=True, lossless_decode=mode))
    pending = deferred(lazy)
    assert "encoder.layer.0.attention.self.query.weight" in pending and "embeddings.word_embeddings.weight" in pending
    ids = torch.randint(0, lazy.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        for _ in range(2):
            assert torch.equal(lazy(input_ids=ids, attention_mask=mask).last_hidden_state, want)
    assert bool(deferred(lazy)) == (mode == "lazy")
    eager.save_pretrained(tmp_path / "eager")
    lazy.save_pretrained(tmp_path / "lazy")
    assert content(tmp_path / "lazy" / "model.safetensors") == content(tmp_path / "eager" / "model.safetensors")
