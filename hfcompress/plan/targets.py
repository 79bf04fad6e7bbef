"""Which modules of a model a config compresses, and with which :class:`LayerSpec`."""

from __future__ import annotations

import re

from torch import nn

from ..config import HfCompressConfig
from ..spec import LayerSpec

#: module classes hfcompress can replace, by the names used in ``targets``
MODULE_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}

#: names kept dense by default: classification/LM heads and the stems of vision models
DEFAULT_IGNORE = (
    "re:(^|\\.)(lm_head|classifier|score|qa_outputs|cls\\.predictions\\.decoder)(\\.\\d+)?$",
    "re:(^|\\.)embeddings\\.patch_embeddings\\.projection$",  # ViT/DeiT patch stem
    "re:(^|\\.)embedder\\.embedder\\.convolution$",  # ResNet stem
    "re:(^|\\.)embeddings\\.patch_embeddings$",  # ConvNeXt / ConvNeXtV2 stem (a bare Conv2d)
)


def _type_name(module: nn.Module) -> str | None:
    for name, cls in MODULE_TYPES.items():
        if type(module) is cls or (isinstance(module, cls) and not _is_compressed(module)):
            return name
    return None


def _is_compressed(module: nn.Module) -> bool:
    from ..modules import CompressedModule

    return isinstance(module, CompressedModule)


def _matches(name: str, type_name: str | None, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif p == type_name or p == name or name.endswith("." + p):
            return True
    return False


def default_ignore(model: nn.Module) -> list[str]:
    """The output embedding (whatever its name) plus :data:`DEFAULT_IGNORE`."""
    out = list(DEFAULT_IGNORE)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        out += [name for name, m in model.named_modules() if m is head]
    return out


def tied_module_names(model: nn.Module) -> set[str]:
    """Names of modules whose weight is tied to another module's weight."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set()
    for target, source in dict(tied).items():
        for key in (target, source):
            if key.endswith(".weight"):
                names.add(key[: -len(".weight")])
    return names


def resolve_layers(model: nn.Module, config: HfCompressConfig, strict: bool = True) -> dict[str, LayerSpec]:
    """Map each module name the config compresses to its spec.

    Raises ``ValueError`` when the config matches no module (``strict``) or would untie tied weights.
    """
    ignore = default_ignore(model) if config.ignore is None else config.ignore
    override_specs = [(o["targets"], config.override_spec(i)) for i, o in enumerate(config.overrides)]
    default = config.default_spec()
    tied = tied_module_names(model)
    plan: dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        type_name = _type_name(module)
        if type_name is None or not name:
            continue
        if _matches(name, type_name, ignore):
            continue
        spec = None
        for patterns, s in override_specs:
            if _matches(name, type_name, patterns):
                spec = s
                break
        if spec is None and _matches(name, type_name, config.targets):
            spec = default
        if spec is None:
            continue
        if not (spec.quantized or spec.sparse):
            continue  # only lossless=True allows such a spec: the module stays dense (its weight is coded on save)
        if name in tied and getattr(model.config, "tie_word_embeddings", False):
            raise ValueError(
                f"Module {name!r} shares its weight with another module (tie_word_embeddings=True); compressing it "
                f"would untie them. Add {name!r} to ignore, or load the model with tie_word_embeddings=False."
            )
        plan[name] = spec
    if strict and not plan and not config.lossless:
        raise ValueError(
            f"The config matches no module of {type(model).__name__}: targets={config.targets}, "
            f"ignore={config.ignore if config.ignore is not None else 'default heads'}. Check the targets "
            f"(module types {tuple(MODULE_TYPES)} or 're:<regex>' on names such as "
            f"{[n for n, _ in model.named_modules() if n][:3]})."
        )
    return plan
