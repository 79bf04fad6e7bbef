"""Model cards for compressed checkpoints, rendered from a jinja2 template through ``huggingface_hub``.

The card's metadata is a :class:`huggingface_hub.ModelCardData`: ``base_model`` with
``base_model_relation: quantized``, ``library_name: transformers``, tags (``hfcompress``, the method,
``<bits>-bit``, sparsity), the base model's license when known, the pipeline tag, and ``model-index``
entries when evaluation results are given (so the Hub shows them). The body tells the next user what
they get: size against bfloat16, the settings, bytes per layer group, a load snippet, the evaluation
against the dense model and the recipe that reproduces it.

The template is ``model_cards/compressed_model.md.j2``; pass ``template=`` to use another one (it
receives ``card_data`` (the YAML metadata) and ``ctx`` (everything else, see :func:`card_context`)).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..config import HfCompressConfig
from ..inspection import inspect_checkpoint, layer_groups
from ..outputs import write_file_atomic

__all__ = [
    "DEFAULT_TEMPLATE",
    "GENERATED_MARKER",
    "base_model_id",
    "card_context",
    "model_card",
    "read_card_metadata",
    "save_card",
]

#: the default jinja2 template
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent.parent / "model_cards" / "compressed_model.md.j2"
_PACKAGED_TEMPLATE = Path(__file__).resolve().parent / "templates" / "compressed_model.md.j2"

#: marker the built-in template puts in the cards it renders (push re-renders those with the repo id)
GENERATED_MARKER = "<!-- hfcompress:card"
_COMMAND = re.compile(r"<!-- hfcompress:command -->\s*```bash\n(.*?)\n```", re.S)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_DIR = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")

#: architecture-name suffix -> (Auto class, pipeline tag)
_TASKS = (
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("ForImageClassification", "AutoModelForImageClassification", "image-classification"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("Model", "AutoModel", "feature-extraction"),
)


def base_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub id of a model given by id or by a local path inside the Hub cache; ``None`` otherwise."""
    if name_or_path is None:
        return None
    text = str(name_or_path)
    match = _HF_CACHE_DIR.search(text)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if _REPO_ID.match(text) and not Path(text).exists():
        return text
    return None


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The metadata of ``folder/README.md`` (``{}`` when there is none or it has no metadata block)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        return {}
    return ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.to_dict()


def _template_path(template: str | os.PathLike | None) -> Path:
    if template is not None:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"template={str(template)!r} is not a file.")
        return path
    for path in (DEFAULT_TEMPLATE, _PACKAGED_TEMPLATE):
        if path.is_file():
            return path
    raise FileNotFoundError(f"The default model card template is missing (looked for {DEFAULT_TEMPLATE}); reinstall hfcompress.")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KiB"


def _pct(x: Any) -> str:
    return x if isinstance(x, str) else ("0" if not x else f"{100 * x:g}%")


def _task_for(architecture: str | None) -> tuple[str, str]:
    for suffix, auto, tag in _TASKS:
        if architecture and architecture.endswith(suffix):
            return auto, tag
    return "AutoModel", "feature-extraction"


def _tags(config: HfCompressConfig, layers: list[dict[str, Any]], extra: list[str] | None) -> list[str]:
    tags = ["hfcompress", "compressed", config.method]
    bits = sorted({layer["bits"] for layer in layers if layer["bits"]} or ({config.bits} if config.bits else set()))
    tags += [f"{b}-bit" for b in bits]
    structures = set()
    for spec in [config.default_spec()] + [config.override_spec(i) for i in range(len(config.overrides))]:
        if spec.sparse:
            structures.add(spec.sparsity_structure if spec.nm else f"{round(100 * spec.effective_sparsity)}pct")
    if structures:
        tags.append("sparse")
        tags += [f"sparsity-{s.replace(':', '-')}" for s in sorted(structures)]
    for tag in extra or []:
        if tag not in tags:
            tags.append(tag)
    return tags


def _method_text(config: HfCompressConfig) -> str:
    from ..algorithms import get_method

    spec = config.default_spec()
    parts = []
    if spec.quantized:
        scope = "per output channel" if spec.group_size is None else f"groups of {spec.group_size}"
        parts.append(f"{spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} integers, {scope}")
    if spec.sparse:
        parts.append(f"{_pct(spec.effective_sparsity)} sparsity ({spec.sparsity_structure})")
    try:
        description = get_method(config.method).description
    except ValueError:
        description = ""
    head = f"`{config.method}`" + (f" ({description.rstrip('.')})" if description else "")
    return head + ": " + "; ".join(parts) + (f"; {len(config.overrides)} per-layer override(s)" if config.overrides else "")


def _settings(config: HfCompressConfig) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    data = config.to_dict()
    rows = []
    for name in HfCompressConfig._FIELDS:
        if name == "overrides":
            continue
        value = data[name]
        if name == "ignore" and value is None:
            value = "default (output head, classifier heads, vision stems)"
        elif name == "group_size" and value is None:
            value = "per output channel"
        friendly = (name == "ignore" and data[name] is None) or (name == "group_size" and data[name] is None)
        rows.append((name, value if friendly else f"`{value if isinstance(value, str) else json.dumps(value)}`"))
    overrides = []
    for o in data["overrides"]:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in o.items() if k != "targets")
        overrides.append({"targets": json.dumps(o["targets"]), "settings": settings})
    return rows, overrides


def _eval_rows(results) -> list[dict[str, str]]:
    def fmt(v):
        return "–" if v is None else f"{v:.4g}"

    rows = []
    for r in results:
        delta = r.delta
        change = "–"
        if delta is not None:
            change = f"{delta:+.4g}" + (f" ({100 * r.relative_delta:+.2f}%)" if r.relative_delta is not None else "")
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        extra = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.extra.items())
        rows.append({
            "metric": f"{r.metric_type} ({'higher' if r.higher_is_better else 'lower'} is better)",
            "dataset": r.dataset.get("name") or r.dataset.get("type"), "settings": settings,
            "dense": fmt(r.dense.value if r.dense else None), "compressed": fmt(r.compressed.value), "delta": change,
            "extra": extra,
        })  # fmt: skip
    return rows


def _load_results(eval_results):
    from ..harness import EVAL_RESULTS_FILE, TaskResult, load_results

    if eval_results is None:
        return []
    if isinstance(eval_results, (str, os.PathLike)):
        path = Path(eval_results)
        return load_results(path / EVAL_RESULTS_FILE if path.is_dir() else path)
    results = list(eval_results)
    for r in results:
        if not isinstance(r, TaskResult):
            raise TypeError(f"eval_results must hold hfcompress.harness.TaskResult objects, got {type(r).__name__}.")
    return results


def _other_bf16_bytes(model) -> int:
    """Bytes of the model's uncompressed tensors if its floating ones were bfloat16."""
    from ..modules import compressed_modules

    skip = {id(t) for m in compressed_modules(model).values() for t in m.compressed_tensors().values()}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def _gather(source) -> dict[str, Any]:
    """Config, per-layer report, architecture and defaults, from a compressed model or a saved folder."""
    from ..report import compression_report

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        report = inspect_checkpoint(folder)
        if not report["compressed"]:
            raise ValueError(f"{folder} is not an hfcompress checkpoint (its config.json has no hfcompress quantization_config).")
        meta = read_card_metadata(folder)
        readme = folder / "README.md"
        found = _COMMAND.search(readme.read_text(encoding="utf-8")) if readme.is_file() else None
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        has_processor = (folder / "preprocessor_config.json").is_file()
        from ..harness import EVAL_RESULTS_FILE

        return {
            "config": HfCompressConfig.from_dict(dict(report["quantization_config"])),
            "report": report, "architecture": report["architecture"], "name": folder.resolve().name,
            "base_model": meta.get("base_model"), "license": meta.get("license"), "tags": meta.get("tags") or [],
            "eval_file": folder / EVAL_RESULTS_FILE if (folder / EVAL_RESULTS_FILE).is_file() else None,
            "tokenizer": has_tokenizer, "processor": has_processor, "command": found.group(1) if found else None,
        }  # fmt: skip
    config = getattr(getattr(source, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config = HfCompressConfig.from_dict(dict(config))
    if not isinstance(config, HfCompressConfig):
        raise ValueError("The model is not compressed by hfcompress (model.config.quantization_config is not an HfCompressConfig).")
    report = compression_report(source)
    params = sum(math.prod(layer["shape"]) for layer in report["layers"])
    report["compressed_params"] = params
    report["bf16_bytes"] = _other_bf16_bytes(source) + 2 * params
    archs = getattr(source.config, "architectures", None) or [type(source).__name__]
    name_or_path = getattr(source.config, "_name_or_path", None) or getattr(source, "name_or_path", None)
    return {
        "config": config, "report": report, "architecture": archs[0],
        "name": (Path(str(name_or_path)).name if name_or_path else type(source).__name__),
        "base_model": base_model_id(name_or_path), "license": None, "tags": [], "eval_file": None,
        "tokenizer": False, "processor": False, "command": None,
    }  # fmt: skip


def card_context(
    source,
    *,
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    eval_results=None,
    tags: list[str] | None = None,
    command: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(metadata, ctx)`` pair a card is rendered from (see :func:`model_card` for the arguments)."""
    from .._version import __version__
    from ..harness import eval_results_for_card
    from ..recipes import recipe_to_yaml

    info = _gather(source)
    config, report = info["config"], info["report"]
    base = base_model if base_model is not None else info["base_model"]
    if isinstance(base, list):
        base = base[0] if base else None
    if base is not None and not _REPO_ID.match(str(base)):
        raise ValueError(f"base_model={base!r} must be a Hub model id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'.")
    license = license if license is not None else info["license"]
    results = _load_results(eval_results if eval_results is not None else info["eval_file"])
    name = model_name or (repo_id.split("/")[-1] if repo_id else info["name"])
    auto_class, pipeline_tag = _task_for(info["architecture"])
    inherited = [t for t in info["tags"] if not t.startswith(("sparsity-", "hfcompress", "compressed")) and not t.endswith("-bit")]
    tag_list = _tags(config, report["layers"], inherited + list(tags or []))

    metadata: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": pipeline_tag, "tags": tag_list}
    if base:
        metadata.update(base_model=base, base_model_relation="quantized")
    if license:
        metadata["license"] = license
    if results:
        metadata.update(model_name=name, eval_results=eval_results_for_card(results))

    layers = report["layers"]
    params = report["compressed_params"]
    groups = []
    for g in layer_groups(layers):
        groups.append({
            "group": g["group"], "count": g["count"], "format": g["format"], "bits": g["bits"] or "–",
            "group_size": "channel" if g["group_size"] is None else g["group_size"], "sparsity": _pct(g["sparsity"]),
            "params": f"{g['params']:,}", "nbytes": _mib(g["nbytes"]), "bits_per_weight": f"{g['bits_per_weight']:.2f}",
        })  # fmt: skip
    formats = sorted({layer["format"] for layer in layers})
    settings, overrides = _settings(config)
    preprocessor = ("AutoTokenizer", "tokenizer") if info["tokenizer"] else ("AutoImageProcessor", "processor") if info["processor"] else (None, None)
    if base:
        intro = f"A compressed version of [{base}](https://huggingface.co/{base}), made with hfcompress."
    else:
        intro = "A compressed model made with hfcompress."
    ctx = {
        "title": f"{name} (hfcompress, {config.method}{', ' + str(config.bits) + '-bit' if config.bits else ''})",
        "intro": intro, "base_model": base, "base_label": "Base model" if base else "Dense model",
        "license_text": f"`{license}` (as the base model)" if license else "not recorded; see the base model's license",
        "method_text": _method_text(config), "formats": ", ".join(f"`{f}`" for f in formats) or "–",
        "size": {
            "total": _mib(report["total_bytes"]), "bf16": _mib(report["bf16_bytes"]),
            "ratio": f"{report['bf16_bytes'] / max(report['total_bytes'], 1):.2f}x", "other": _mib(report["other_bytes"]),
            "layers": len(layers), "params": f"{params:,}",
            "bits_per_weight": f"{8 * report['compressed_bytes'] / params:.2f}" if params else "–",
        },
        "groups": groups, "settings": settings, "overrides": overrides,
        "auto_class": auto_class, "model_ref": repo_id or "<this repo id or folder>",
        "preprocessor_class": preprocessor[0], "preprocessor_var": preprocessor[1],
        "evaluation": _eval_rows(results), "recipe": recipe_to_yaml(config), "command": command or info["command"],
        "version": __version__,
    }  # fmt: skip
    return metadata, ctx


def model_card(
    source,
    *,
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    eval_results=None,
    tags: list[str] | None = None,
    command: str | None = None,
    template: str | os.PathLike | None = None,
):
    """Render the model card of a compressed model or of a saved compressed folder.

    Args:
        source: a model compressed by hfcompress, or a folder written by ``save_pretrained``/``hfcompress
            compress``. A folder's existing ``README.md`` supplies ``base_model``, ``license`` and extra
            tags, and its ``eval_results.json`` the evaluation, unless given here.
        base_model: Hub id of the dense model (``None``: from the folder's card, or the model's
            ``name_or_path`` when that is a Hub id or a path in the Hub cache).
        license: license identifier carried from the base model (e.g. ``"apache-2.0"``).
        model_name: name used in the title and ``model-index`` (default: repo name or folder name).
        repo_id: Hub repo the card is for (used in the load snippet).
        eval_results: :class:`hfcompress.harness.TaskResult` list, or a report JSON path / folder holding
            ``eval_results.json``.
        tags: extra tags.
        command: the command that produced the checkpoint (shown under "Reproduce"; a folder's card keeps
            the one it shows).
        template: a jinja2 template to use instead of ``model_cards/compressed_model.md.j2``.

    Returns:
        a :class:`huggingface_hub.ModelCard` (``str(card)`` is the README text; ``card.data`` the metadata).
    """
    from huggingface_hub import ModelCard, ModelCardData

    metadata, ctx = card_context(
        source, base_model=base_model, license=license, model_name=model_name, repo_id=repo_id,
        eval_results=eval_results, tags=tags, command=command,
    )  # fmt: skip
    data = ModelCardData(**metadata)
    card = ModelCard.from_template(data, template_path=str(_template_path(template)), ctx=ctx)
    # Parse back what was rendered: a template that broke the metadata block fails here, not on the Hub.
    parsed = ModelCard(str(card))
    if parsed.data.to_dict().get("base_model_relation", None) != metadata.get("base_model_relation"):
        raise ValueError("The rendered card lost its metadata block; check the template's '---' front matter.")
    return parsed


def save_card(card, folder: str | os.PathLike) -> Path:
    """Write ``card`` as ``folder/README.md`` atomically (temporary file, then rename)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    return write_file_atomic(folder / "README.md", str(card))
