"""``hfcompress compress``: compress a model folder or Hub model into a new checkpoint folder with its card."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import yaml

from .common import DTYPES, CliError, emit, fmt_bytes, info, load_model, load_preprocessor, local_model_dir

HELP = "compress a model (data-free on load, or calibrated with --dataset) into a new folder"

DESCRIPTION = """\
Compress MODEL (a local transformers folder or a Hub model id) and write OUTPUT: the compressed
safetensors checkpoint, config.json with quantization_config (quant_method "hfcompress"), the
tokenizer/processor files, recipe.yaml and README.md (the model card). OUTPUT is written to a temporary
folder and renamed into place, so it never holds a half-written checkpoint.

Settings come from --recipe (a YAML file whose keys are the HfCompressConfig fields) and/or the flags
below; a flag overrides the recipe's value. Data-free methods (rtn) compress while the checkpoint
loads; calibrated methods (e.g. gptq) run hfcompress.oneshot on --dataset.

examples:
  hfcompress compress ./SmolLM2-135M -o smollm2-int4 --bits 4 --group-size 128 --license apache-2.0
  hfcompress compress ./SmolLM2-135M -o smollm2-gptq --recipe gptq.yaml --dataset wikitext2.txt
  hfcompress compress ./SmolLM2-135M -o smollm2-3.5bit --budget 3.5bits --search-time 20m

With --budget, the levels of the modules are searched so the whole checkpoint fits the budget (see
hfcompress.search_allocation); the found levels are written to recipe.yaml as per-module overrides.
"""


def _group_size(text: str) -> int | None:
    if text.lower() in ("channel", "none", "-1", "per-channel"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'channel'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer or 'channel'")
    return value


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].lower() in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 20m or 1h") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive duration")
    return value


def _budget(value: str):
    try:
        number = float(value)
    except ValueError:
        return value  # '3.5bits', '120MB': parsed by the search
    return number if number <= 1 else int(number)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} must look like key=value (e.g. damp=0.01)")
    return key, yaml.safe_load(value)


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="dense model: a local folder with config.json + weights, or a Hub model id")
    p.add_argument("-o", "--output", required=True, help="folder to create for the compressed checkpoint (must not exist unless --overwrite)")
    s = p.add_argument_group("compression settings (override the recipe; default: the HfCompressConfig defaults)")
    s.add_argument("--recipe", help="YAML recipe: keys are HfCompressConfig fields (bits, group_size, method, overrides, ...)")
    s.add_argument("--method", help="compression method, e.g. rtn (data-free) or a calibrated one such as gptq; default rtn")
    s.add_argument("--bits", type=int, help="integer width of the weights: 2, 3, 4, 5, 6 or 8")
    s.add_argument("--group-size", type=_group_size, default=argparse.SUPPRESS, help="input columns sharing one scale (any positive size), or 'channel' for one scale per output channel; default 128")
    s.add_argument("--asymmetric", action="store_true", default=None, help="asymmetric grid with stored zero points (default symmetric)")
    s.add_argument("--scale-dtype", choices=("float16", "bfloat16", "float32"), help="dtype the scales are stored in; default float16")
    s.add_argument("--clip", choices=("minmax", "mse"), help="minmax: full range per group; mse: range shrink minimising the error; default minmax")
    s.add_argument("--sparsity", type=float, help="fraction of weights pruned, in [0, 1) (needs a pruning method)")
    s.add_argument("--sparsity-structure", help="'unstructured' or N:M such as 2:4")
    s.add_argument("--targets", nargs="+", help="modules to compress: types (Linear, Conv2d, Embedding) and/or 're:<regex>' on names; default Linear")
    s.add_argument("--ignore", nargs="+", help="modules kept dense: names, name suffixes or 're:<regex>'; default: output head, classifier heads, vision stems")
    s.add_argument("--method-arg", action="append", type=_key_value, default=None, metavar="KEY=VALUE", help="method argument (repeatable), value parsed as YAML, e.g. --method-arg damp=0.01")
    b = p.add_argument_group("size budget (searched per-module levels)")
    b.add_argument("--budget", help="size of the whole checkpoint: '3.5bits' (average over all weights), '120MB', or a fraction of bf16 such as 0.3")
    b.add_argument("--levels", nargs="+", help="levels to choose from, e.g. w3g64 w4g64 w8 (default: w2g64 w3g64 w4g64 w5g64 w6g64 w8g64)")
    b.add_argument("--search-time", type=_duration, help="time limit of the search, e.g. 90s, 20m, 1h (default: no limit)")
    b.add_argument("--generations", type=int, default=200, help="search generations at most (default 200)")
    c = p.add_argument_group("calibration (calibrated methods, and the budget search)")
    c.add_argument("--dataset", help="calibration data: a local .txt/.json/.jsonl/.csv/.parquet file or a Hub dataset name; default: offline Wikipedia summaries")
    c.add_argument("--dataset-config", help="configuration name of a Hub dataset")
    c.add_argument("--split", default="train", help="split of a Hub dataset (default train)")
    c.add_argument("--text-column", help="text column of a dataset (default 'text' or the first string column)")
    c.add_argument("--num-samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--seed", type=int, default=0, help="seed choosing and ordering calibration documents (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the weights kept dense; default: the checkpoint's (calibration itself runs in float32)")
    o.add_argument("--base-model", help="Hub id of MODEL for the card (default: detected when MODEL is a Hub id or in the Hub cache)")
    o.add_argument("--license", help="license of the base model for the card (default: read from MODEL's README.md when present)")
    o.add_argument("--no-card", action="store_true", help="do not write README.md")
    o.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (atomically, after success)")
    o.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    o.add_argument("--allow-download", action="store_true", help="allow fetching MODEL or --dataset from the Hub")
    p.set_defaults(func=run)


_FLAG_FIELDS = {
    "method": "method", "bits": "bits", "group_size": "group_size", "scale_dtype": "scale_dtype", "clip": "clip",
    "sparsity": "sparsity", "sparsity_structure": "sparsity_structure", "targets": "targets", "ignore": "ignore",
}  # fmt: skip


def build_config(args):
    """The HfCompressConfig from ``--recipe`` and the flags (a flag overrides the recipe)."""
    from ..config import HfCompressConfig
    from ..recipes import config_from_recipe, load_recipe, recipe_from_config

    fields: dict[str, Any] = {}
    if args.recipe:
        try:
            fields = recipe_from_config(load_recipe(args.recipe))
        except FileNotFoundError as exc:
            raise CliError(f"--recipe: {exc}") from None
        fields.pop("quant_method", None)
    for attr, field in _FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if attr == "group_size" and hasattr(args, "group_size"):
            fields[field] = args.group_size
        elif value is not None:
            fields[field] = value
    if args.asymmetric:
        fields["symmetric"] = False
    if args.method_arg:
        fields["method_args"] = {**fields.get("method_args", {}), **dict(args.method_arg)}
    if getattr(args, "budget", None) and fields.get("bits") is None:
        fields["bits"] = 4  # the searched levels replace it per module
    if not args.recipe and fields.get("bits") is None and not fields.get("sparsity") and fields.get("sparsity_structure") in (None, "unstructured"):
        raise CliError("nothing to compress: pass --bits (e.g. --bits 4), --sparsity/--sparsity-structure, or --recipe FILE.")
    try:
        return config_from_recipe(fields, source="settings") if args.recipe else HfCompressConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None


def _license_of(folder: Path) -> str | None:
    from ..hub import read_card_metadata

    try:
        return read_card_metadata(folder).get("license")
    except Exception:  # a malformed README must not stop compression
        return None


def _reproduce_command(args, config, model_ref: str, out: Path) -> str:
    parts = ["hfcompress", "compress", model_ref, "--recipe", "recipe.yaml", "-o", out.name]
    if model_ref == args.base_model or "/" in model_ref:
        parts.append("--allow-download")  # the reference is a Hub id
    if not config.is_data_free:
        dataset = args.dataset or None
        if dataset:
            parts += ["--dataset", Path(dataset).name if Path(dataset).exists() else dataset]
        parts += ["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    return shlex.join(parts)


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..hub import base_model_id, save_compressed

    from ..outputs import OutputFolder

    config = build_config(args)
    out = Path(args.output)
    src = local_model_dir(args.model, allow_download=args.allow_download)
    inputs = [src] + [Path(p) for p in (args.dataset, args.recipe) if p and Path(p).exists()]
    # refused before anything is loaded or written: an output overlapping an input, or one we may not replace
    OutputFolder(out, sources=inputs, overwrite=args.overwrite, what="--output")
    existing = _saved_quantization(src)
    if existing is not None:
        raise CliError(
            f"{args.model} is already compressed (quantization_config.quant_method={existing!r}); the flags would be "
            "ignored. Compress the original dense model instead."
        )
    base = args.base_model or base_model_id(args.model) or base_model_id(src)
    license = args.license or _license_of(src)
    # closed on the way out of an error or Ctrl-C too, so the bar never redraws under the one-line report
    search = None
    with tqdm(total=3, desc="compress", unit="step", disable=args.quiet) as steps:
        steps.set_postfix_str("loading" + (" and compressing" if config.is_data_free and not args.budget else ""))
        if args.budget:
            model = load_model(src, "float32")
            steps.update(1)
            steps.set_postfix_str("searching the levels")
            search = _search(args, model, config, src)
            config = search.config
            steps.set_postfix_str(f"compressing ({config.method})")
            _compress_loaded(args, model, config, src)
            steps.update(1)
        elif config.is_data_free:
            model = load_model(src, args.dtype or "auto", quantization_config=config)
            steps.update(2)
        else:
            model = load_model(src, "float32")
            steps.update(1)
            steps.set_postfix_str(f"calibrating ({config.method})")
            _compress_loaded(args, model, config, src)
            steps.update(1)
        steps.set_postfix_str("saving")
        save_compressed(
            model, out, companions_from=src, card=not args.no_card, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, base_model=base, license=license, model_name=out.name,
            command=_reproduce_command(args, config, base or src.name, out),
        )  # fmt: skip
        steps.update(1)
    from ..inspection import inspect_checkpoint

    report = inspect_checkpoint(out)
    payload = {
        "output": str(out), "base_model": base, "license": license, "config": config.to_dict(),
        "layers": len(report["layers"]), "total_bytes": report["total_bytes"], "bf16_bytes": report["bf16_bytes"],
        "compressed_bytes": report["compressed_bytes"], "card": not args.no_card,
    }  # fmt: skip
    if search is not None:
        payload["search"] = {
            "budget": search.budget.text, "budget_bytes": search.budget.nbytes, "searched_bytes": search.nbytes,
            "kl": search.kl, "baseline_kl": search.baseline_kl, "generations": search.generations,
            "levels": dict(sorted(search.levels.items())), "seconds": search.seconds,
        }  # fmt: skip
        info(args, f"budget search: {search.summary()}")
    bpw = 8 * report["compressed_bytes"] / max(report["compressed_params"], 1)
    text = (
        f"wrote {out}: {len(report['layers'])} layers compressed ({config.method}), {fmt_bytes(report['total_bytes'])} "
        f"on disk vs {fmt_bytes(report['bf16_bytes'])} in bfloat16 ({report['bf16_bytes'] / report['total_bytes']:.2f}x), "
        f"{bpw:.2f} bits per compressed weight"
    )
    info(args, f"next: hfcompress eval {out} --baseline {args.model} --write-card")
    emit(args, payload, text)
    return 0


def _search(args, model, config, src: Path):
    """The budget search of ``--budget`` on the dense ``model``."""
    from ..search import DEFAULT_LEVELS, search_allocation

    try:
        return search_allocation(
            model, config, _budget(args.budget), args.dataset, tokenizer=load_preprocessor(src, "tokenizer"),
            levels=args.levels or DEFAULT_LEVELS, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
            fitness_seq_len=min(256, args.seq_len), generations=args.generations, time_limit=args.search_time,
            show_progress=not args.quiet, text_column=args.text_column, dataset_config=args.dataset_config, split=args.split,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise CliError(f"--budget: {exc}") from None


def _compress_loaded(args, model, config, src: Path) -> None:
    """Compress the float32 ``model`` in place with ``config`` (calibrated on ``--dataset`` when the method needs it),
    then cast what stays dense to ``--dtype`` (default: the checkpoint's)."""
    import torch

    from ..apply import compress
    from ..oneshot import oneshot

    if config.is_data_free:
        compress(model, config)
    else:
        oneshot(
            model, config, args.dataset, tokenizer=load_preprocessor(src, "tokenizer"), num_samples=args.num_samples,
            seq_len=args.seq_len, seed=args.seed, text_column=args.text_column, dataset_config=args.dataset_config,
            split=args.split, show_progress=not args.quiet,
        )  # fmt: skip
    target = _dtype_or_none(args.dtype) or _checkpoint_dtype(src)
    if target is not None and target != torch.float32:
        model.to(target)  # compressed tensors keep their stored dtypes


def _dtype_or_none(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _saved_quantization(folder: Path) -> str | None:
    """The ``quant_method`` of a folder's config.json, or ``None`` for a dense checkpoint."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CliError(f"{folder / 'config.json'} is not valid JSON ({exc}).") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return (qc.get("quant_method") or "unknown") if isinstance(qc, dict) else None


def _checkpoint_dtype(folder: Path):
    """The dtype recorded in the checkpoint's config.json (``None`` when absent or unknown)."""
    import json

    import torch

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    value = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, value, None) if isinstance(value, str) else None
