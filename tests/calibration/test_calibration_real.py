"""Calibrated quantization of the real SmolLM2-135M: GPTQ < QuantEase < blocktune beat RTN on WikiText-2 (slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.evaluation import perplexity, wikitext2_test_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hfcompress.testing.models import real_model_path

    path = real_model_path("smollm2")
    return path, AutoTokenizer.from_pretrained(path)


def _ppl(model, tok) -> float:
    return perplexity(model, tok, wikitext2_test_text()[:60_000], seq_len=512, max_windows=4)


def test_gptq_and_quantease_beat_rtn_and_reload_bit_exactly(smollm2, tmp_path):
    path, tok = smollm2
    cfg = dict(bits=3, group_size=64)
    rtn = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=HfCompressConfig(**cfg))
    ppl_rtn = _ppl(rtn, tok)
    del rtn
    results = {}
    for method in ("gptq", "quantease", "blocktune"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        _, per_layer = hfcompress.oneshot(
            model, HfCompressConfig(method=method, **cfg), tokenizer=tok, num_samples=16, seq_len=256,
            show_progress=False, return_results=True,
        )  # fmt: skip
        assert len(per_layer) == 210 and all(0 <= r.error < 1 for r in per_layer.values())
        results[method] = _ppl(model, tok)
        if method in ("gptq", "blocktune"):
            model.save_pretrained(tmp_path / method)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / method, dtype=torch.float32)
            ids = tok("The capital of France is", return_tensors="pt").input_ids
            with torch.no_grad():
                assert torch.equal(reloaded(ids).logits, model(ids).logits)
        del model
    assert results["gptq"] < 0.9 * ppl_rtn
    assert results["quantease"] < results["gptq"]
    # block-output tuning lowers every block's output error (~10 % here) and must improve on its QuantEase start;
    # at 16 x 256 calibration tokens the perplexity gain is small (92.8 vs 93.4 measured on this CPU)
    assert results["blocktune"] < results["quantease"]
