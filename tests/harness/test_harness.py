"""Evaluation harness: perplexity (reusing hfcompress.evaluation), top-1 through evaluate's evaluator,
embedding fidelity, and the Markdown/JSON/PNG comparison report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress import HfCompressConfig, compress
from hfcompress.evaluation import perplexity, wikitext2_test_text
from hfcompress.harness import (
    EmbeddingFidelityTask,
    ImageClassificationTask,
    ModelScore,
    PerplexityTask,
    TaskResult,
    eval_results_for_card,
    load_results,
    load_text,
    markdown_report,
    model_bytes,
    write_report,
)
from hfcompress.testing.models import tiny_llama, tiny_vit

TEXT = "Paris is the capital and largest city of France. " * 40


@pytest.fixture(scope="module")
def byte_tok():
    from fixtures.files import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def llamas():
    dense = tiny_llama()
    comp = compress(tiny_llama(), HfCompressConfig(bits=4, group_size=32))
    return dense, comp


def test_perplexity_task_reuses_the_standard_protocol(llamas, byte_tok, tmp_path):
    dense, comp = llamas
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    result = PerplexityTask(source=str(path), seq_len=64, max_windows=5).compare(comp, byte_tok, dense=dense)
    assert result.dense.value == perplexity(dense, byte_tok, TEXT, seq_len=64, max_windows=5)
    assert result.compressed.value == perplexity(comp, byte_tok, TEXT, seq_len=64, max_windows=5)
    assert result.settings == {"seq_len": 64, "stride": 64, "windows": 5, "tokens": len(TEXT.encode())}
    assert result.dataset == {"type": "text", "name": "text.txt", "split": None}
    assert result.compressed.nbytes == model_bytes(comp) < model_bytes(dense) == result.dense.nbytes
    assert result.delta == result.compressed.value - result.dense.value
    overlapping = PerplexityTask(source=str(path), seq_len=64, stride=16, max_windows=5).compare(comp, byte_tok)
    assert overlapping.dense is None and overlapping.settings["stride"] == 16 and overlapping.settings["windows"] == 5
    assert overlapping.compressed.value == perplexity(comp, byte_tok, TEXT, seq_len=64, max_windows=5, stride=16)


def test_perplexity_task_validation(llamas, byte_tok):
    with pytest.raises(ValueError, match="seq_len=1"):
        PerplexityTask(seq_len=1)
    with pytest.raises(ValueError, match="stride=100"):
        PerplexityTask(seq_len=64, stride=100)
    with pytest.raises(ValueError, match="max_windows=0"):
        PerplexityTask(max_windows=0)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        PerplexityTask(seq_len=512).compare(llamas[1], byte_tok)


def test_wikitext2_ships_inside_the_package():
    """The evaluation text is the exact upstream file, read from the installed package and nowhere else."""
    import fnmatch
    import hashlib
    from importlib import resources
    from pathlib import Path

    from hfcompress.evaluation import WIKITEXT2_SHA256

    text = wikitext2_test_text()
    assert hashlib.sha256(text.replace("\n", "\r\n").encode("utf-8")).hexdigest() == WIKITEXT2_SHA256
    assert text.startswith(" = Robert Boulter = \n") and text.count("\n") == 2891 and "\r" not in text
    package = Path(resources.files("hfcompress"))
    shipped = [p for p in (package / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert shipped, "hfcompress/data is empty"
    # every shipped data file is declared as package data, so a wheel (not only an editable install) has it
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["hfcompress"]
    for path in shipped:
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data {globs}"
    # the library reads no file outside its own package for its data
    source = "\n".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py"))
    assert "shared/data" not in source and "HFCOMPRESS_WIKITEXT2" not in source


def test_damaged_wikitext2_copy_is_refused(monkeypatch, tmp_path):
    import lzma

    from hfcompress import evaluation

    fake = tmp_path / "hfcompress"
    (fake / "data" / "wikitext-2-raw").mkdir(parents=True)
    (fake / "data" / "wikitext-2-raw" / "wiki.test.raw.xz").write_bytes(lzma.compress(b" = Not WikiText = \r\n"))
    monkeypatch.setattr(evaluation.resources, "files", lambda package: fake)
    evaluation.wikitext2_test_text.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="SHA-256 .* expected 4f3e427e"):
            evaluation.wikitext2_test_text()
        (fake / "data" / "wikitext-2-raw" / "wiki.test.raw.xz").write_bytes(b"not xz")
        with pytest.raises(RuntimeError, match="missing or damaged"):
            evaluation.wikitext2_test_text()
    finally:
        evaluation.wikitext2_test_text.cache_clear()


def test_text_sources(tmp_path):
    text, dataset = load_text()
    assert text == wikitext2_test_text() and dataset["type"] == "wikitext" and dataset["split"] == "test"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": t}) for t in ("first doc", "second doc")))
    assert load_text(str(rows), text_column="body")[0] == "first doc\n\nsecond doc"
    with pytest.raises(ValueError, match="text_column='text'"):
        load_text(str(rows))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="allow_download=True"):
        load_text("someone/some-dataset")


def _result(dense=10.0, comp=11.0) -> TaskResult:
    return TaskResult(
        task="perplexity", task_type="text-generation", metric_type="perplexity", metric_name="Perplexity (x)",
        higher_is_better=False, dataset={"type": "wikitext", "name": "WikiText-2 (raw)", "config": "wikitext-2-raw-v1", "split": "test"},
        settings={"seq_len": 64, "stride": 64, "windows": 2, "tokens": 500},
        compressed=ModelScore("int4", comp, 1 << 20, 1.5), dense=ModelScore("dense", dense, 4 << 20, 1.0),
        extra={"note": "x"},
    )  # fmt: skip


def test_report_files_round_trip(tmp_path):
    results = [_result()]
    paths = write_report(results, tmp_path / "out")
    assert set(paths) == {"markdown", "json", "png"}
    assert load_results(paths["json"]) == results
    data = json.loads(paths["json"].read_text())
    assert data["results"][0]["delta"] == 1.0 and data["results"][0]["relative_delta"] == 0.1
    md = paths["markdown"].read_text()
    assert "| perplexity | perplexity (lower is better) | WikiText-2 (raw) | 10 | 11 | +1 (+10.00%) | 4.00 MiB | 1.00 MiB |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]
    with pytest.raises(ValueError, match="results is empty"):
        write_report([], tmp_path / "empty")
    (tmp_path / "bogus.json").write_text("{}")
    with pytest.raises(ValueError, match="not an hfcompress evaluation report"):
        load_results(tmp_path / "bogus.json")


def test_results_become_model_index_entries():
    from huggingface_hub import ModelCardData

    (entry,) = eval_results_for_card([_result()])
    assert (entry.task_type, entry.dataset_type, entry.metric_type, entry.metric_value) == ("text-generation", "wikitext", "perplexity", 11.0)
    index = ModelCardData(model_name="int4", eval_results=[entry]).to_dict()["model-index"]
    assert index[0]["results"][0]["metrics"][0]["args"] == {"seq_len": 64, "stride": 64, "windows": 2, "tokens": 500}
    assert "delta" not in markdown_report([_result(comp=9.0)]) or "-1 (-10.00%)" in markdown_report([_result(comp=9.0)])


@pytest.fixture(scope="module")
def images():
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(24)]
    labels = [int(x) for x in rng.integers(0, 10, 24)]
    return datasets.Dataset.from_dict({"image": pics, "label": labels}).cast_column("image", datasets.Image())


def test_top1_accuracy_through_evaluate(images):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    dense = tiny_vit()
    comp = compress(tiny_vit(), HfCompressConfig(bits=2, group_size=16))
    result = ImageClassificationTask(images, n_resamples=200).compare(comp, processor, dense=dense)

    def predictions(model):
        with torch.no_grad():
            pixels = processor(list(images["image"]), return_tensors="pt").pixel_values
            return model(pixel_values=pixels).logits.argmax(-1).tolist()

    labels = images["label"]
    pd, pc = predictions(dense), predictions(comp)
    assert result.dense.value == pytest.approx(np.mean([a == b for a, b in zip(pd, labels)]))
    assert result.compressed.value == pytest.approx(np.mean([a == b for a, b in zip(pc, labels)]))
    assert result.extra["prediction_agreement"] == pytest.approx(np.mean([a == b for a, b in zip(pd, pc)]))
    low, high = result.compressed.details["confidence_interval_95"]
    assert low <= result.compressed.value <= high
    assert result.settings == {"samples": 24, "bootstrap_resamples": 200}


def test_top1_from_an_image_folder(tmp_path, images):
    from transformers import ViTImageProcessor

    for i, row in enumerate(images.select(range(6))):
        folder = tmp_path / f"class{row['label']}"
        folder.mkdir(exist_ok=True)
        row["image"].save(folder / f"{i}.png")
    task = ImageClassificationTask(str(tmp_path), n_resamples=0)
    data, info = task.load()
    assert len(data) == 6 and info["type"] == "imagefolder"
    model = tiny_vit(num_labels=len(set(data["label"])))
    result = task.compare(model, ViTImageProcessor(size={"height": 32, "width": 32}))
    assert 0.0 <= result.compressed.value <= 1.0 and "confidence_interval_95" not in result.compressed.details
    with pytest.raises(ValueError, match="column 'pixels'"):
        ImageClassificationTask(images, image_column="pixels").load()
    with pytest.raises(FileNotFoundError, match="allow_download=True"):
        ImageClassificationTask("someone/images").load()


@pytest.mark.slow
def test_perplexity_on_smollm2(smollm2_path, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    comp = AutoModelForCausalLM.from_pretrained(
        smollm2_path, dtype=torch.float32, quantization_config=HfCompressConfig(bits=4, group_size=128)
    )
    result = PerplexityTask(seq_len=256, max_windows=2).compare(comp, tok, dense=dense)
    assert result.dense.value == perplexity(dense, tok, wikitext2_test_text(), seq_len=256, max_windows=2)
    assert 10 < result.dense.value < 60  # SmolLM2-135M on WikiText-2, 256-token windows (36.0 over 4 windows)
    # RTN int4 g128 costs SmolLM2 about 1.5x perplexity (55.9 vs 36.0 over 4 windows); GPTQ closes much of it.
    assert result.dense.value < result.compressed.value < 2.0 * result.dense.value
    assert result.compressed.nbytes < 0.5 * result.dense.nbytes
    paths = write_report([result], tmp_path)
    assert load_results(paths["json"]) == [result]


@pytest.mark.slow
def test_embedding_fidelity_on_minilm(minilm_path):
    from transformers import AutoModel

    tok = AutoTokenizer.from_pretrained(minilm_path)
    dense = AutoModel.from_pretrained(minilm_path, dtype=torch.float32)
    task = EmbeddingFidelityTask(max_samples=64)
    same = task.compare(dense, tok, dense=dense)
    assert same.compressed.value == pytest.approx(1.0, abs=1e-6) and same.extra["nearest_neighbour_agreement"] == 1.0
    int8 = AutoModel.from_pretrained(minilm_path, dtype=torch.float32, quantization_config=HfCompressConfig(bits=8, group_size=None))
    int3 = AutoModel.from_pretrained(minilm_path, dtype=torch.float32, quantization_config=HfCompressConfig(bits=3, group_size=32))
    r8, r3 = task.compare(int8, tok, dense=dense), task.compare(int3, tok, dense=dense)
    assert r8.compressed.value > 0.995 and r8.extra["nearest_neighbour_agreement"] > 0.9
    assert r3.compressed.value < r8.compressed.value
    assert r8.compressed.details["cosine_min"] <= r8.compressed.details["cosine_p05"] <= r8.compressed.value
    with pytest.raises(ValueError, match="dense="):
        task.compare(int8, tok)


def test_harness_script_on_a_model_folder(byte_tok, tmp_path):
    """eval/harness.py: compress in memory, evaluate dense and compressed, write the report."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("eval_harness", Path(__file__).resolve().parents[2] / "eval" / "harness.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    byte_tok.save_pretrained(dense)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "report"
    args = ["--model", dense, "--bits", "4", "--group-size", "32", "--text", text, "--seq-len", "64", "--max-windows", "2", "--out", out, "--no-plot"]
    assert script.main([str(a) for a in args]) == 0
    (result,) = load_results(out / "report.json")
    assert result.dense.value == perplexity(tiny_llama(), byte_tok, TEXT, seq_len=64, max_windows=2)
    reference = compress(tiny_llama(), HfCompressConfig(bits=4, group_size=32))
    assert result.compressed.value == pytest.approx(perplexity(reference, byte_tok, TEXT, seq_len=64, max_windows=2), rel=1e-6)
