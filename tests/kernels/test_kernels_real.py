"""Inference paths on the real SmolLM2-135M: the integer kernels give the reference path's perplexity (slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress import HfCompressConfig
from hfcompress.evaluation import perplexity
from hfcompress.inference import inference_nbytes, set_inference_path


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,kernel",
    [(HfCompressConfig(bits=4, group_size=64), "int4pack"), (HfCompressConfig(bits=8, group_size=None), "int8pack")],
    ids=["w4g64", "w8"],
)
def test_kernel_perplexity_matches_reference(smollm2_path, wikitext_text, config, kernel):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, quantization_config=config)
    stored = inference_nbytes(model)["total"]
    assert set(set_inference_path(model, "auto").values()) == {kernel}
    if kernel == "int4pack":  # the kernel layout replaces the packed codes: memory does not grow
        assert inference_nbytes(model)["total"] < 1.15 * stored
    fast = perplexity(model, tok, wikitext_text, seq_len=512, max_windows=2)
    set_inference_path(model, "reference")
    ref = perplexity(model, tok, wikitext_text, seq_len=512, max_windows=2)
    assert abs(fast - ref) / ref < 0.005, (fast, ref)  # bfloat16 compute moves perplexity by well under 0.5%
