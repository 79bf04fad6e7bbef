"""The ``hfcompress`` CLI on a tiny Llama with a byte-level tokenizer: every command, exit codes, atomic outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, snapshot_download
from fixtures.hub_server import local_hub  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress import HfCompressConfig, compress, compressed_modules
from hfcompress.cli import build_parser, main
from hfcompress.evaluation import perplexity
from hfcompress.inspection import inspect_checkpoint
from hfcompress.testing.models import tiny_llama

TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
    "Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
    "surpassed the Washington Monument to become the tallest man-made structure in the world. "
) * 4


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(["a"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense tiny Llama folder with a 256-token byte tokenizer and a README declaring its license."""
    folder = tmp_path_factory.mktemp("cli") / "tiny-dense"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny dense\n")
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def int4(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-out") / "tiny-int4"
    assert main(["compress", str(dense), "-o", str(out), "--bits", "4", "--group-size", "32", "--base-model", "me/tiny-dense", "-q"]) == 0
    return out


def test_compress_writes_a_checkpoint_equal_to_the_library(dense, tmp_path, capsys):
    out = tmp_path / "int4"
    code, stdout, _ = run(capsys, "compress", dense, "-o", out, "--bits", "4", "--group-size", "32", "--asymmetric", "--json", "-q")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["output"] == str(out) and payload["license"] == "mit"
    assert payload["total_bytes"] == inspect_checkpoint(out)["total_bytes"]
    config = HfCompressConfig(bits=4, group_size=32, symmetric=False)
    assert HfCompressConfig.from_dict(payload["config"]) == config
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "README.md"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["int4"]  # no temporary folder left behind

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected = compress(AutoModelForCausalLM.from_pretrained(dense), config)
    mods, ref = compressed_modules(reloaded), compressed_modules(expected)
    assert mods.keys() == ref.keys()
    for name in mods:
        for key, tensor in ref[name].compressed_tensors().items():
            assert torch.equal(mods[name].compressed_tensors()[key], tensor), f"{name}.{key}"
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids == AutoTokenizer.from_pretrained(dense)("hello").input_ids
    card = ModelCard((out / "README.md").read_text())
    assert card.data.license == "mit" and card.data.base_model is None and "4-bit" in card.data.tags


def test_compress_recipe_with_flag_override(dense, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"bits": 4, "group_size": 32, "overrides": [{"targets": ["re:down_proj$"], "bits": 8}]}))
    out = tmp_path / "mixed"
    code, _, _ = run(capsys, "compress", dense, "-o", out, "--recipe", recipe, "--group-size", "channel", "-q")
    assert code == 0
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["bits"] == 4 and saved["group_size"] is None and saved["overrides"][0]["bits"] == 8
    layers = {layer["name"]: layer for layer in inspect_checkpoint(out)["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["bits"] == 8 and layers["model.layers.0.mlp.up_proj"]["bits"] == 4
    assert "hfcompress compress tiny-dense --recipe recipe.yaml -o mixed" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "7"], "bits=7"),
        ([], "nothing to compress"),
        (["--bits", "4", "--targets", "re:nothing_matches"], "matches no module"),
        (["--bits", "4", "--method", "nope"], "method='nope'"),
        (["--bits", "4", "--sparsity", "0.5"], "does not prune"),
    ],
)
def test_compress_bad_settings_exit_2_and_write_nothing(dense, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", dense, "-o", out, "-q", *argv)
    assert code == 2, err
    assert message in err and err.startswith("hfcompress compress: error:")
    assert "Traceback" not in err and stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_compress_refuses_existing_output_and_missing_model(dense, int4, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in int4.iterdir()}
    code, _, err = run(capsys, "compress", dense, "-o", int4, "--bits", "8", "-q")
    assert code == 2 and "already exists" in err
    assert {p.name: p.stat().st_mtime_ns for p in int4.iterdir()} == before
    code, _, err = run(capsys, "compress", tmp_path / "missing", "-o", tmp_path / "x", "--bits", "4", "-q")
    assert code == 2 and "does not exist" in err
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("bits: 4\ngroupsize: 32\n")
    code, _, err = run(capsys, "compress", dense, "-o", tmp_path / "y", "--recipe", recipe, "-q")
    assert code == 2 and "groupsize" in err


def test_compress_overwrite_replaces_atomically(dense, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(capsys, "compress", dense, "-o", out, "--bits", "4", "-q")[0] == 0
    assert run(capsys, "compress", dense, "-o", out, "--bits", "8", "--group-size", "channel", "--overwrite", "-q")[0] == 0
    assert HfCompressConfig.from_dict(inspect_checkpoint(out)["quantization_config"]).bits == 8
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.slow
def test_compress_calibrated_method(dense, text_file, tmp_path, capsys):
    from hfcompress import available_methods

    if "gptq" not in available_methods():
        pytest.skip("no calibrated method registered")
    out = tmp_path / "gptq"
    code, stdout, err = run(
        capsys, "compress", dense, "-o", out, "--method", "gptq", "--bits", "4", "--group-size", "32",
        "--dataset", text_file, "--num-samples", "4", "--seq-len", "32", "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["config"]["method"] == "gptq"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the checkpoint's dtype is kept
    text = (out / "README.md").read_text()
    assert "--dataset sample.txt --num-samples 4 --seq-len 32" in text


def test_inspect(int4, capsys):
    code, stdout, _ = run(capsys, "inspect", int4, "--json", "-q")
    assert code == 0
    assert json.loads(stdout) == json.loads(json.dumps(inspect_checkpoint(int4)))
    code, stdout, _ = run(capsys, "inspect", int4, "--groups", "--measure", "-q")
    assert code == 0
    assert "model.layers.*.mlp.down_proj" in stdout and "bits per compressed weight" in stdout
    code, _, err = run(capsys, "inspect", int4 / "missing", "-q")
    assert code == 2 and "not a folder" in err


def test_card(int4, tmp_path, capsys):
    code, stdout, _ = run(capsys, "card", int4, "--repo-id", "me/tiny-int4", "--license", "apache-2.0")
    assert code == 0
    card = ModelCard(stdout)
    assert card.data.base_model == "me/tiny-dense" and card.data.license == "apache-2.0"
    assert 'from_pretrained("me/tiny-int4")' in stdout
    target = tmp_path / "card.md"
    code, stdout, _ = run(capsys, "card", int4, "-o", target, "--json")
    assert code == 0 and json.loads(stdout)["metadata"]["base_model_relation"] == "quantized"
    assert ModelCard(target.read_text()).data.license == "mit"
    code, _, err = run(capsys, "card", tmp_path, "-q")
    assert code == 2 and "config.json" in err


def test_eval_perplexity_report_and_card(dense, int4, text_file, tmp_path, capsys):
    report_dir = tmp_path / "report"
    code, stdout, err = run(
        capsys, "eval", int4, "--baseline", dense, "--text", text_file, "--seq-len", "64", "--max-windows", "3",
        "--out", report_dir, "--write-card", "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    (result,) = json.loads(stdout)["results"]
    tok = AutoTokenizer.from_pretrained(dense)
    expected_dense = perplexity(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32), tok, TEXT, seq_len=64, max_windows=3)
    expected_int4 = perplexity(AutoModelForCausalLM.from_pretrained(int4, dtype=torch.float32), tok, TEXT, seq_len=64, max_windows=3)
    assert result["dense"]["value"] == pytest.approx(expected_dense, rel=1e-6)
    assert result["compressed"]["value"] == pytest.approx(expected_int4, rel=1e-6)
    assert result["settings"]["windows"] == 3 and math.isfinite(result["delta"])
    assert result["compressed"]["nbytes"] == inspect_checkpoint(int4)["total_bytes"]
    assert {p.name for p in report_dir.iterdir()} == {"report.md", "report.json", "report.png"}
    assert (report_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard((int4 / "README.md").read_text())
    assert card.data.eval_results[0].metric_value == pytest.approx(result["compressed"]["value"], rel=1e-5)
    assert card.data.base_model == "me/tiny-dense" and card.data.license == "mit"
    assert json.loads((int4 / "eval_results.json").read_text())["results"][0]["task"] == "perplexity"


def test_eval_bad_input(int4, tmp_path, capsys):
    code, _, err = run(capsys, "eval", int4, "--text", tmp_path / "missing.txt", "--seq-len", "16", "-q")
    assert code == 2 and "missing.txt" in err
    code, _, err = run(capsys, "eval", int4, "--task", "fidelity", "-q")
    assert code == 2 and "--baseline" in err
    code, _, err = run(capsys, "eval", int4, "--seq-len", "4096", "-q")
    assert code == 2 and "max_position_embeddings" in err


def test_push(local_hub, int4, tmp_path, capsys):
    code, stdout, err = run(capsys, "push", int4, "tester/cli-int4", "--json", "-q")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["commit_url"].startswith(local_hub.url) and payload["pr_url"] is None
    local = snapshot_download("tester/cli-int4", cache_dir=tmp_path / "cache")
    for name in ("model.safetensors", "tokenizer.json", "recipe.yaml"):
        assert (int4 / name).read_bytes() == open(os.path.join(local, name), "rb").read()
    card = ModelCard.load("tester/cli-int4")
    assert card.data.base_model == "me/tiny-dense" and 'from_pretrained("tester/cli-int4")' in card.text
    code, _, err = run(capsys, "push", int4, "tester/denied", "--token", "hf_wrong", "-q")
    assert code == 1 and "refused" in err


def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"compress", "convert", "eval", "export", "push", "card", "inspect"}
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"hfcompress {name} {action.option_strings or action.dest} has no help"


@pytest.mark.slow
def test_console_script(tmp_path):
    exe = [sys.executable, "-m", "hfcompress.cli"]
    done = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and all(c in done.stdout for c in ("compress", "eval", "push", "card", "inspect"))
    done = subprocess.run([*exe, "inspect", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "hfcompress inspect: error:" in done.stderr and "Traceback" not in done.stderr


def test_compress_with_a_budget_searches_levels_and_fits(dense, text_file, tmp_path, capsys):
    out = tmp_path / "budget"
    code, stdout, _ = run(
        capsys, "compress", dense, "-o", out, "--budget", "0.7", "--levels", "w2g32", "w4g32", "w8g32", "--group-size", "32",
        "--dataset", text_file, "--num-samples", "4", "--seq-len", "32", "--generations", "2", "--search-time", "2m", "--json", "-q",
    )  # fmt: skip
    assert code == 0, stdout
    payload = json.loads(stdout)
    search = payload["search"]
    assert search["searched_bytes"] <= search["budget_bytes"] and search["kl"] <= search["baseline_kl"]
    layers = {layer["name"]: layer["bits"] for layer in inspect_checkpoint(out)["layers"]}
    assert layers == {name: int(level[1]) for name, level in search["levels"].items()}
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["overrides"]  # the found levels, reproducible without a search
    code, _, err = run(capsys, "compress", dense, "-o", tmp_path / "nope", "--budget", "1KB", "--dataset", text_file, "-q")
    assert code == 2 and "--budget" in err and not (tmp_path / "nope").exists()
