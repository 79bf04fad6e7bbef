"""Exports of the real SmolLM2-135M: GGUF decodes bit-exact and carries llama.cpp's own tokenizer; compressed-tensors
loads in plain transformers with our weights and logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.export import export
from hfcompress.export.gguf.arch import qk_row_order
from hfcompress.testing.models import real_model_path, smollm2_gguf_path

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    path = real_model_path("smollm2")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def test_smollm2_q4_0_gguf_bit_exact_with_llama_cpp_tokenizer(smollm2, tmp_path):
    path, dense = smollm2
    import copy

    model = hfcompress.compress(copy.deepcopy(dense), HfCompressConfig.for_export("gguf-q4_0"))
    out = tmp_path / "smollm2-q4_0.gguf"
    report = export(model, out, to="gguf", tokenizer=path, dense_type="Q8_0")
    assert all(layer.exact for layer in report.layers if layer.source == "compressed")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 272 and "output.weight" not in tensors  # tied head: token_embd only
    by_name = {layer.name: layer.target_name for layer in report.layers}
    for name, module in hfcompress.compressed_modules(model).items():
        ours = module.dequantize_weight(torch.float32)
        if name.endswith(("q_proj", "k_proj")):
            ours = ours[qk_row_order(ours.shape[0], 9 if name.endswith("q_proj") else 3)]
        t = tensors[by_name[name]]
        theirs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(ours.shape)
        assert np.array_equal(theirs, ours.numpy()), name
    # the vocabulary is the one llama.cpp's own GGUF of this model carries
    original = gguf.GGUFReader(str(smollm2_gguf_path()))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.model",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):  # fmt: skip
        assert reader.fields[key].contents() == original.fields[key].contents(), key
    for key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.attention.head_count_kv"):
        assert reader.fields[key].contents() == original.fields[key].contents(), key


_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
ref = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(ref["ids"]).logits.float()
print(json.dumps({"imported": "hfcompress" in sys.modules, "diff": (logits - ref["logits"]).abs().max().item(),
                  "argmax_agree": (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()}))
"""


def test_smollm2_w4a16_compressed_tensors_in_plain_transformers(smollm2, tmp_path):
    import copy

    from transformers import AutoTokenizer

    path, dense = smollm2
    model = hfcompress.compress(copy.deepcopy(dense), HfCompressConfig.for_export("compressed-tensors-w4a16", group_size=32))
    report = export(model, tmp_path / "ct", to="compressed-tensors", tokenizer=path)
    assert report.exact and len(report.layers) == 210
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    # the reference: the dense model carrying exactly the weights hfcompress decodes, run by plain nn.Linear in bf16
    twin = copy.deepcopy(dense)
    mods = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in hfcompress.compressed_modules(model).items():
            mods[name].weight.copy_(module.dequantize_weight(torch.bfloat16))
        logits = twin(ids).logits.float()
    torch.save({"ids": ids, "logits": logits}, tmp_path / "ref.pt")
    r = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "ct"), str(tmp_path / "ref.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["imported"]
    assert got["argmax_agree"] == 1.0 and got["diff"] == 0.0  # same weights, same bf16 computation: identical logits
