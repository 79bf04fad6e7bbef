"""Model cards: metadata the Hub accepts (ModelCard parses it), model-index from evaluation results, body tables."""

from __future__ import annotations

import re

import pytest
import yaml
from huggingface_hub import ModelCard
from fixtures.hub_server import validate_card_metadata

from hfcompress import HfCompressConfig, compress
from hfcompress.harness import ModelScore, TaskResult
from hfcompress.hub import base_model_id, model_card, save_compressed
from hfcompress.inspection import inspect_checkpoint
from hfcompress.testing.models import tiny_llama

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONFIG = dict(bits=4, group_size=32, overrides=[{"targets": ["re:down_proj$"], "bits": 8, "group_size": None}])


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "card has no metadata block"
    return yaml.safe_load(match.group(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = compress(tiny_llama(), HfCompressConfig(**CONFIG))
    folder = tmp_path_factory.mktemp("card") / "tiny-int4"
    save_compressed(model, folder, base_model=BASE, license="apache-2.0", command="hfcompress compress base -o tiny-int4")
    return model, folder


def _ppl_result(dense=21.5, compressed=23.0) -> TaskResult:
    return TaskResult(
        task="perplexity", task_type="text-generation", metric_type="perplexity",
        metric_name="Perplexity (WikiText-2 (raw), 512-token windows)", higher_is_better=False,
        dataset={"type": "wikitext", "name": "WikiText-2 (raw)", "config": "wikitext-2-raw-v1", "split": "test"},
        settings={"seq_len": 512, "stride": 512, "windows": 8, "tokens": 1000},
        compressed=ModelScore("tiny-int4", compressed, 1000, 1.0), dense=ModelScore("dense", dense, 4000, 1.0),
    )  # fmt: skip


def test_saved_card_metadata_is_valid_and_complete(saved):
    _, folder = saved
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert validate_card_metadata(text) == []
    meta = _front_matter(text)
    assert meta["base_model"] == BASE
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"hfcompress", "rtn", "4-bit", "8-bit"} <= set(meta["tags"])
    assert "model-index" not in meta  # not evaluated yet
    data = ModelCard(text).data  # huggingface_hub parses it back
    assert data.base_model == BASE and data.license == "apache-2.0" and data.eval_results is None


def test_card_tables_match_the_checkpoint(saved):
    _, folder = saved
    text = (folder / "README.md").read_text(encoding="utf-8")
    report = inspect_checkpoint(folder)
    rows = re.findall(r"^\| `(model\.layers\.\*\.[\w.]+)` \| (\d+) \| (\w+) \| (\S+) \| (\S+) \|", text, re.M)
    assert {r[0] for r in rows} == {re.sub(r"\.\d+\.", ".*.", layer["name"]) for layer in report["layers"]}
    assert sum(int(r[1]) for r in rows) == len(report["layers"])
    down = next(r for r in rows if r[0].endswith("down_proj"))
    assert down[3:] == ("8", "channel")  # the override
    assert all(r[3:] == ("4", "32") for r in rows if not r[0].endswith("down_proj"))
    assert f"{report['total_bytes'] / 2**10:,.1f} KiB" in text
    assert 'from_pretrained("<this repo id or folder>")' in text
    assert "hfcompress compress base -o tiny-int4" in text
    # The recipe in the card is the checkpoint's config.
    recipe = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert HfCompressConfig.from_dict(yaml.safe_load(recipe)) == HfCompressConfig(**CONFIG)


def test_eval_results_become_model_index(saved):
    _, folder = saved
    card = model_card(folder, eval_results=[_ppl_result()], repo_id="me/tiny-int4")
    text = str(card)
    assert validate_card_metadata(text) == []
    meta = _front_matter(text)
    (entry,) = meta["model-index"]
    assert entry["name"] == "tiny-int4"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"name": "WikiText-2 (raw)", "type": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
    assert result["metrics"][0]["type"] == "perplexity" and result["metrics"][0]["value"] == 23.0
    parsed = ModelCard(text).data
    assert parsed.eval_results[0].metric_value == 23.0 and parsed.model_name == "tiny-int4"
    assert "| 21.5 | 23 | +1.5 (+6.98%) |" in text
    assert 'from_pretrained("me/tiny-int4")' in text


def test_folder_card_keeps_base_license_command_and_reads_eval_file(saved, tmp_path):
    import shutil

    from hfcompress.harness.report import EVAL_RESULTS_FILE, results_json

    _, folder = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / EVAL_RESULTS_FILE).write_text(__import__("json").dumps(results_json([_ppl_result(20.0, 20.5)])))
    text = str(model_card(copy))
    meta = _front_matter(text)
    assert meta["base_model"] == BASE and meta["license"] == "apache-2.0"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 20.5
    assert "hfcompress compress base -o tiny-int4" in text


def test_card_from_model_in_memory_matches_report(saved):
    from hfcompress import compression_report

    model, _ = saved
    text = str(model_card(model, base_model=BASE))
    report = compression_report(model)
    assert f"{report['total_bytes'] / 2**10:,.1f} KiB" in text
    assert _front_matter(text)["base_model_relation"] == "quantized"


def test_base_model_detection(tmp_path):
    assert base_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    cached = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert base_model_id(cached) == "org/name"
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    assert base_model_id(str(local)) is None
    assert base_model_id(None) is None


def test_sparse_and_mixed_tags():
    from hfcompress import available_methods

    if "magnitude" not in available_methods():
        pytest.skip("no pruning method registered yet")
    model = compress(tiny_llama(), HfCompressConfig(bits=4, group_size=32, sparsity_structure="2:4", method="magnitude"))
    tags = _front_matter(str(model_card(model)))["tags"]
    assert {"sparse", "sparsity-2-4", "4-bit", "magnitude"} <= set(tags)


def test_card_errors(saved, tmp_path):
    model, folder = saved
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    with pytest.raises(ValueError, match="not an hfcompress checkpoint"):
        model_card(dense)
    with pytest.raises(ValueError, match="base_model='not a repo id'"):
        model_card(folder, base_model="not a repo id")
    with pytest.raises(FileNotFoundError, match="template="):
        model_card(folder, template=tmp_path / "missing.j2")
    with pytest.raises(ValueError, match="not compressed by hfcompress"):
        model_card(tiny_llama())


def test_custom_template(saved, tmp_path):
    _, folder = saved
    template = tmp_path / "mine.md.j2"
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ ctx.title }}\n\nSize: {{ ctx.size.total }}\n")
    text = str(model_card(folder, template=template))
    assert _front_matter(text)["base_model_relation"] == "quantized"
    assert text.strip().endswith("KiB")
