"""``hfcompress export``: the CLI's conventions (JSON result, exit codes, refusals naming the fix)."""

from __future__ import annotations

import json

import pytest
import torch

from hfcompress import HfCompressConfig, compress, save_compressed
from hfcompress.cli import main
from hfcompress.testing.models import tiny_llama

from fixtures.files import byte_tokenizer as _byte_tokenizer


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "q4_0"
    save_compressed(compress(tiny_llama().to(torch.bfloat16), HfCompressConfig.for_export("gguf-q4_0")), folder, tokenizer=_byte_tokenizer())
    return folder


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gguf_export_json(q4_0, tmp_path, capsys):
    code, out, err = _run(capsys, "export", str(q4_0), "-o", str(tmp_path / "m.gguf"), "--to", "gguf", "--dense-type", "q8_0", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["target"] == "gguf" and report["nbytes"] == (tmp_path / "m.gguf").stat().st_size
    compressed = [layer for layer in report["layers"] if layer["source"] == "compressed"]
    assert len(compressed) == 14 and all(layer["exact"] and layer["target_type"] == "Q4_0" for layer in compressed)
    assert not report["exact"]  # the embedding was re-quantized to Q8_0 on request, and says so


def test_refusal_exit_code_and_json_error(q4_0, tmp_path, capsys):
    # fp16 scales do not all fit the bf16 model's scale dtype... for compressed-tensors they must be bf16
    code, out, err = _run(capsys, "export", str(q4_0), "-o", str(tmp_path / "ct"), "--to", "compressed-tensors", "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["type"] == "ExportError" and "scale_dtype='bfloat16'" in error["message"]
    assert not (tmp_path / "ct").exists()
    code, out, err = _run(capsys, "export", str(q4_0), "-o", str(tmp_path / "ct"), "--to", "compressed-tensors", "--requantize", "-q")
    assert code == 0 and "re-quantized" in out


def test_bad_argument_combinations(q4_0, tmp_path, capsys):
    assert _run(capsys, "export", str(q4_0), "-o", str(tmp_path / "x.gguf"), "--to", "gguf", "--activations", "int8")[0] == 2
    assert _run(capsys, "export", str(q4_0), "-o", str(tmp_path / "x"), "--to", "compressed-tensors", "--gguf-type", "Q8_0")[0] == 2
    assert _run(capsys, "export", str(q4_0), "-o", str(tmp_path / "x"), "--to", "onnx")[0] == 2
    assert _run(capsys, "export", str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf"), "--to", "gguf")[0] == 2
    code, _, err = _run(capsys, "export", str(q4_0), "-o", str(q4_0 / "x.gguf"), "--to", "gguf")
    assert code == 2 and "inside the input" in err
