"""``hfcompress eval``: compare a compressed checkpoint with its dense original; report and card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CliError, emit, info, load_model, load_preprocessor, local_model_dir, model_class

HELP = "evaluate a compressed folder against the dense model (perplexity, top-1, embedding fidelity)"

DESCRIPTION = """\
Score MODEL (a compressed folder, or any model folder) and, with --baseline, its dense original on
the same data, then print the comparison. The task follows the architecture unless --task is given:

  perplexity  causal LMs: perplexity over windows of --seq-len tokens (--stride overlaps them) of
              --text (default: the local WikiText-2 raw test set)
  accuracy    image classifiers: top-1 accuracy on --images (an image folder with one sub-folder per
              class, or a Hub dataset with --allow-download) via evaluate's image-classification
              evaluator, with a bootstrap 95%% confidence interval
  fidelity    encoders: cosine between compressed and dense sentence embeddings (needs --baseline)

--out DIR writes report.md, report.json and report.png there. --write-card stores the results in
MODEL/eval_results.json and re-renders MODEL/README.md, adding model-index entries.

examples:
  hfcompress eval smollm2-int4 --baseline ./SmolLM2-135M --seq-len 512 --max-windows 8 --out eval/ --write-card
  hfcompress eval vit-int8 --baseline ./vit --images ./val-images --max-samples 500
"""

_TASKS = ("auto", "perplexity", "accuracy", "fidelity")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the model to score: a compressed folder written by `hfcompress compress` (or any model folder)")
    p.add_argument("--baseline", help="the dense model (folder or cached Hub id) scored on the same data for comparison")
    p.add_argument("--task", choices=_TASKS, default="auto", help="what to measure (default: from the architecture)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32", help="dtype both models compute in (default float32, for reference numbers)")
    t = p.add_argument_group("perplexity")
    t.add_argument("--text", help="text source: 'wikitext2' (default, local copy), a .txt/.raw/.json/.jsonl/.csv/.parquet file, or a Hub dataset name")
    t.add_argument("--dataset-config", help="configuration of a Hub dataset text source")
    t.add_argument("--split", default="test", help="split of a Hub dataset (default test)")
    t.add_argument("--text-column", default="text", help="text column of a data file or dataset (default text)")
    t.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    t.add_argument("--stride", type=int, help="start windows every STRIDE tokens (< seq-len overlaps them; overlap is context only)")
    t.add_argument("--max-windows", type=int, default=16, help="score at most this many windows; 0 for the whole text (default 16)")
    i = p.add_argument_group("image classification")
    i.add_argument("--images", help="image folder (class-named sub-folders) or Hub dataset name")
    i.add_argument("--image-column", default="image", help="image column (default image)")
    i.add_argument("--label-column", default="label", help="label column (default label)")
    i.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the confidence interval; 0 disables (default 1000)")
    e = p.add_argument_group("accuracy and fidelity")
    e.add_argument("--max-samples", type=int, help="evaluate at most this many images / sentences (fidelity default 256)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="folder for report.md, report.json and report.png")
    o.add_argument("--no-plot", action="store_true", help="skip report.png")
    o.add_argument("--write-card", action="store_true", help="save the results as MODEL/eval_results.json and re-render MODEL/README.md")
    o.add_argument("--allow-download", action="store_true", help="allow reading a Hub dataset / model")
    p.set_defaults(func=run)


def _auto_task(folder: Path) -> str:
    name = model_class(folder).__name__
    if name.endswith("ForCausalLM"):
        return "perplexity"
    if name.endswith("ForImageClassification"):
        return "accuracy"
    return "fidelity"


def _task(args, kind: str):
    from ..harness import EmbeddingFidelityTask, ImageClassificationTask, PerplexityTask

    try:
        if kind == "perplexity":
            return PerplexityTask(
                source=args.text, seq_len=args.seq_len, stride=args.stride, max_windows=args.max_windows or None,
                dataset_config=args.dataset_config, split=args.split, text_column=args.text_column,
                allow_download=args.allow_download,
            )  # fmt: skip
        if kind == "accuracy":
            if not args.images:
                raise CliError("the accuracy task needs --images (an image folder with class sub-folders, or a Hub dataset).")
            return ImageClassificationTask(
                dataset=args.images, split=args.split, image_column=args.image_column, label_column=args.label_column,
                max_samples=args.max_samples, n_resamples=args.bootstrap, allow_download=args.allow_download,
            )  # fmt: skip
        if not args.baseline:
            raise CliError("the fidelity task compares with the dense model: pass --baseline PATH.")
        return EmbeddingFidelityTask(max_samples=args.max_samples or 256)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _merge_results(path: Path, new) -> list:
    from ..harness import load_results

    old = load_results(path) if path.is_file() else []
    names = {r.task for r in new}
    return [r for r in old if r.task not in names] + list(new)


def _write_json_atomic(path: Path, payload: dict) -> None:
    from ..outputs import write_file_atomic

    write_file_atomic(path, json.dumps(payload, indent=2) + "\n")


def run(args) -> int:
    from ..harness import EVAL_RESULTS_FILE, markdown_report, write_report
    from ..harness.report import results_json

    folder = local_model_dir(args.model, allow_download=args.allow_download)
    baseline = local_model_dir(args.baseline, allow_download=args.allow_download) if args.baseline else None
    kind = _auto_task(folder) if args.task == "auto" else args.task
    task = _task(args, kind)
    if args.write_card:
        from ..inspection import inspect_checkpoint

        if not inspect_checkpoint(folder)["compressed"]:
            raise CliError(f"--write-card needs an hfcompress checkpoint; {folder} is not one.")
    info(args, f"loading {folder}" + (f" and {baseline}" if baseline else ""))
    model = load_model(folder, args.dtype)
    dense = load_model(baseline, args.dtype) if baseline is not None else None
    prep_kind = "image" if kind == "accuracy" else "tokenizer"
    preprocessor = load_preprocessor(folder, prep_kind) or (load_preprocessor(baseline, prep_kind) if baseline else None)
    if preprocessor is None:
        what = "image processor (preprocessor_config.json)" if prep_kind == "image" else "tokenizer"
        raise CliError(f"no {what} found in {folder}" + (f" or {baseline}" if baseline else "") + ".")
    names = (folder.name, baseline.name if baseline is not None else "dense")
    try:
        result = task.compare(model, preprocessor, dense=dense, names=names, show_progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    from ..inspection import inspect_checkpoint

    # Sizes as published (checkpoint bytes on disk), not as held in memory at the evaluation dtype.
    result.compressed.nbytes = inspect_checkpoint(folder)["total_bytes"]
    if result.dense is not None and baseline is not None:
        result.dense.nbytes = inspect_checkpoint(baseline)["total_bytes"]
    payload = {"results": [result.to_dict()]}
    if args.out:
        paths = write_report([result], args.out, title=f"{folder.name}: dense vs compressed", plot=not args.no_plot)
        payload["report"] = {k: str(v) for k, v in paths.items()}
        info(args, "report: " + ", ".join(str(v) for v in paths.values()))
    if args.write_card:
        from ..hub import model_card, save_card

        results = _merge_results(folder / EVAL_RESULTS_FILE, [result])
        card = model_card(folder, eval_results=results)  # rendered before anything is written
        _write_json_atomic(folder / EVAL_RESULTS_FILE, results_json(results))
        save_card(card, folder)
        payload["card"] = str(folder / "README.md")
        info(args, f"card updated: {folder / 'README.md'}")
    emit(args, payload, markdown_report([result], title=f"{folder.name}: dense vs compressed"))
    return 0
