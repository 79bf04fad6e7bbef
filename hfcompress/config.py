"""`HfCompressConfig`: the transformers quantization config of hfcompress (``quant_method="hfcompress"``)."""

from __future__ import annotations

import copy
import re
from typing import Any

from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms import get_method
from .spec import LayerSpec

QUANT_METHOD = "hfcompress"
SUPPORTED_MODULE_TYPES = ("Linear", "Conv2d", "Embedding")
#: values of ``HfCompressConfig.lossless_decode`` (see :mod:`hfcompress.storage.lazy`)
LOSSLESS_DECODE_MODES = ("load", "lazy", "first_forward")


def _check_patterns(name: str, value: Any) -> list[str]:
    """``value`` as a list of patterns: one string is one entry (never split into characters)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name}={value!r} must be a string or a list of strings (module types, names or 're:<regex>'), "
            f"not {type(value).__name__}."
        )
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} entry {pattern!r} must be a string, not {type(pattern).__name__}.")
        if not pattern:
            raise ValueError(f"{name} has an empty entry; use module types, names or 're:<regex>'.")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {exc}.") from None
    return list(value)


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise TypeError(f"{name}={value!r} must be {what}, not bool.")
    if not isinstance(value, types):
        raise TypeError(f"{name}={value!r} must be {what}, not {type(value).__name__}.")


@register_quantization_config(QUANT_METHOD)
class HfCompressConfig(QuantizationConfigMixin):
    """What to compress in a model and how.

    The short form reads like transformers' own configs::

        HfCompressConfig(bits=4, group_size=128)        # RTN int4, symmetric, every Linear but the output head
        HfCompressConfig(bits=8, group_size=None)       # int8 per output channel
        HfCompressConfig(lossless=True)                 # bit-exact: entropy-coded bf16 weights (~2/3 the size)
        HfCompressConfig(bits=4, group_size=64, lossless=True)  # int4, then the codes entropy-coded too

    Args:
        bits: integer width of the weights (2, 3, 4, 5, 6, 8) or ``None`` to leave values in floating point.
        group_size: input columns sharing one scale; ``None``/``-1`` for per-channel. Need not divide the width.
        symmetric: symmetric grid (no stored zero point) or asymmetric.
        scale_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        clip: ``"minmax"`` (full range) or ``"mse"`` (range shrink that minimises each group's error).
        sparsity: fraction of weights pruned, in ``[0, 1)`` (needs a pruning method).
        sparsity_structure: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
        method: compression algorithm; ``"rtn"`` is data-free and runs inside ``from_pretrained``; calibrated
            methods run through :func:`hfcompress.oneshot`.
        method_args: keyword arguments of the method (e.g. ``{"damp": 0.01}`` for GPTQ).
        targets: which modules to compress: module class names from ``("Linear", "Conv2d", "Embedding")``
            and/or ``"re:<regex>"`` searched in module names. Default ``["Linear"]``.
        ignore: modules kept dense: exact names, name suffixes (``"lm_head"``) or ``"re:<regex>"``. ``None``
            (default) keeps the output head, classifier heads and vision stems dense; a list replaces that.
        overrides: advanced per-target settings, e.g.
            ``[{"targets": ["re:mlp\\.down_proj"], "bits": 8, "group_size": None}]``: each entry has ``targets``
            plus any of the weight settings above; the first matching entry wins, unset settings inherit.
        lossless: add the lossless storage stage: every saved tensor worth it (dense float weights and
            embeddings, tied ones included, packed codes, scales, masks) is entropy-coded bit-exactly in the
            checkpoint and decoded on load (see :mod:`hfcompress.formats.lossless`). Alone (no ``bits``, no
            ``sparsity``) it changes nothing in the model, only the file size.
        lossless_decode: when a lossless checkpoint's coded tensors are decoded (compressed modules' own
            tensors always decode on load): ``"load"`` (default) decodes everything inside ``from_pretrained``;
            ``"lazy"`` keeps the coded payloads in memory and decodes each module's tensors right before its
            forward, freeing them after it (resident weights stay at the coded size, ~2/3 of bf16, at the cost
            of one decode per forward); ``"first_forward"`` decodes each module's tensors at its first forward
            and keeps them (fast start, and modules that never run never cost their decoded size). A loading
            attribute: passing ``quantization_config=HfCompressConfig(lossless=True, lossless_decode="lazy")``
            to ``from_pretrained`` of a saved checkpoint overrides the saved choice. See
            :mod:`hfcompress.storage.lazy`.

    Loading a saved checkpoint needs no config (its ``config.json`` holds it); options for that load come from
    :meth:`HfCompressConfig.loading`, e.g. ``from_pretrained(path, quantization_config=HfCompressConfig.loading(
    verify_checksums=False))``.
    """

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = 128,
        symmetric: bool = True,
        scale_dtype: str = "float16",
        clip: str = "minmax",
        sparsity: float = 0.0,
        sparsity_structure: str = "unstructured",
        method: str = "rtn",
        method_args: dict[str, Any] | None = None,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        overrides: list[dict[str, Any]] | None = None,
        lossless: bool = False,
        lossless_decode: str = "load",
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        #: loading attribute (never saved): verify every tensor's checksum and the config stamp when a saved
        #: checkpoint loads (see :mod:`hfcompress.integrity`)
        self.verify_checksums = True
        self._loading_only: tuple[str, ...] | None = None  # set by HfCompressConfig.loading()
        if unknown:
            raise TypeError(
                f"HfCompressConfig got unknown argument(s) {sorted(unknown)}; valid ones are: {sorted(self._FIELDS)}."
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r} does not belong to HfCompressConfig ({QUANT_METHOD!r}).")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = None if group_size == -1 else group_size
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.clip = clip
        self.sparsity = sparsity
        self.sparsity_structure = sparsity_structure
        self.method = method
        if method_args is not None:
            _check_type("method_args", method_args, (dict,), "a dict of keyword arguments, e.g. {'damp': 0.01}")
        if overrides is not None:
            _check_type("overrides", overrides, (list, tuple), "a list of dicts, e.g. [{'targets': ['re:down_proj'], 'bits': 8}]")
        self.method_args = copy.deepcopy(dict(method_args or {}))
        self.targets = _check_patterns("targets", targets) if targets is not None else ["Linear"]
        self.ignore = None if ignore is None else _check_patterns("ignore", ignore)
        self.overrides = copy.deepcopy(list(overrides)) if overrides else []
        self.lossless = lossless
        self.lossless_decode = lossless_decode
        self.post_init()

    _FIELDS = (
        "bits", "group_size", "symmetric", "scale_dtype", "clip", "sparsity", "sparsity_structure",
        "method", "method_args", "targets", "ignore", "overrides", "lossless", "lossless_decode",
    )  # fmt: skip

    # ------------------------------------------------------------------ validation
    @classmethod
    def for_export(cls, target: str, **settings: Any) -> "HfCompressConfig":
        """A config whose grid the export ``target`` holds bit for bit, so the model exports without re-rounding::

            config = HfCompressConfig.for_export("gguf-q4_0", method="gptq")            # -> GGUF Q4_0
            config = HfCompressConfig.for_export("compressed-tensors-w4a16", group_size=32)  # -> vLLM W4A16

        Presets (:data:`hfcompress.presets.EXPORT_PRESETS`): ``gguf-q4_0``, ``gguf-q5_0``, ``gguf-q8_0`` (symmetric
        group-32 codes, float16 scales), ``compressed-tensors-w4a16`` (group 128), ``compressed-tensors-w8a16`` and
        ``compressed-tensors-w8a8`` (8-bit per channel); their scales are bfloat16, the dtype of most LLM checkpoints,
        since compressed-tensors engines load scales in the model's dtype: pass ``scale_dtype="float16"`` for a float16
        model. ``settings`` add any other config field (``method``, ``targets``, ``ignore``...) or change one; changing
        a grid field the target fixes (``bits``, ``symmetric``, or ``group_size``/``scale_dtype`` of GGUF) is refused.
        """
        from .presets import EXPORT_PRESETS

        if not isinstance(target, str) or target not in EXPORT_PRESETS:
            raise ValueError(f"target={target!r} is not an export preset; use one of {sorted(EXPORT_PRESETS)}.")
        _, grid = EXPORT_PRESETS[target]
        fixed = ("bits", "symmetric") + (("group_size", "scale_dtype") if target.startswith("gguf-") else ())
        for name in fixed:
            if name in settings and settings[name] != grid[name]:
                raise ValueError(
                    f"{name}={settings[name]!r} contradicts the export preset {target!r}, which needs {name}={grid[name]!r} "
                    "to export exactly; leave it out (or pick another preset)."
                )
        return cls(**{**grid, **settings})

    @classmethod
    def loading(cls, *, verify_checksums: bool | None = None, lossless_decode: str | None = None) -> "HfCompressConfig":
        """Options for ``from_pretrained`` of a checkpoint saved by hfcompress (its ``config.json`` says how it
        is compressed; only the options given here change)::

            AutoModelForCausalLM.from_pretrained("smollm2-w4", quantization_config=HfCompressConfig.loading(verify_checksums=False))

        Args:
            verify_checksums: check every tensor against the checksums recorded when it was written, and the
                config against the one the tensors were written for (default ``True``; see
                :mod:`hfcompress.integrity`). ``False`` skips the checksums (the config check stays).
            lossless_decode: for lossless checkpoints, when coded tensors are decoded (see the class docs).

        The result only carries loading options: passing it to ``from_pretrained`` of a dense checkpoint is refused.
        """
        given = {}
        if verify_checksums is not None:
            _check_type("verify_checksums", verify_checksums, (bool,), "True or False")
            given["verify_checksums"] = verify_checksums
        if lossless_decode is not None:
            _check_type("lossless_decode", lossless_decode, (str,), f"one of {LOSSLESS_DECODE_MODES}")
            if lossless_decode not in LOSSLESS_DECODE_MODES:
                raise ValueError(f"lossless_decode={lossless_decode!r} is not supported; use one of {LOSSLESS_DECODE_MODES}.")
            given["lossless_decode"] = lossless_decode
        config = cls(lossless=True)
        for name, value in given.items():
            setattr(config, name, value)
        config._loading_only = tuple(given)
        return config

    @property
    def is_loading_only(self) -> bool:
        """Whether this config came from :meth:`loading` (options for loading a saved checkpoint only)."""
        return self._loading_only is not None

    def post_init(self) -> None:
        """Validate every setting: ``TypeError`` for a wrong type, ``ValueError`` for a bad value, each naming the
        parameter, the value and the fix. Everything a later step would refuse is refused here."""
        _check_type("method", self.method, (str,), "a method name such as 'rtn' or 'gptq'")
        method = get_method(self.method)
        _check_type("method_args", self.method_args, (dict,), "a dict of keyword arguments, e.g. {'damp': 0.01}")
        for key in self.method_args:
            if not isinstance(key, str):
                raise TypeError(f"method_args key {key!r} must be a string, not {type(key).__name__}.")
        _check_type("lossless", self.lossless, (bool,), "True or False")
        _check_type("lossless_decode", self.lossless_decode, (str,), f"one of {LOSSLESS_DECODE_MODES}")
        default = self.default_spec()
        if self.lossless_decode not in LOSSLESS_DECODE_MODES:
            raise ValueError(
                f"lossless_decode={self.lossless_decode!r} is not supported; use one of {LOSSLESS_DECODE_MODES} "
                "('load': decode in from_pretrained, 'lazy': decode before every forward (least memory), "
                "'first_forward': decode once at the first forward)."
            )
        if self.lossless_decode != "load" and not self.lossless:
            raise ValueError(
                f"lossless_decode={self.lossless_decode!r} only applies to lossless checkpoints; set lossless=True "
                "or leave lossless_decode='load'."
            )
        self.targets = _check_patterns("targets", self.targets)
        if not self.targets:
            raise ValueError("targets=[] selects nothing; use e.g. ['Linear'] or ['re:mlp'].")
        for t in self.targets:
            if not t.startswith("re:") and t not in SUPPORTED_MODULE_TYPES:
                raise ValueError(
                    f"targets entry {t!r} is neither a supported module type {SUPPORTED_MODULE_TYPES} nor a "
                    "'re:<regex>' on module names."
                )
        if self.ignore is not None:
            self.ignore = _check_patterns("ignore", self.ignore)
        _check_type("overrides", self.overrides, (list,), "a list of dicts, e.g. [{'targets': ['re:down_proj'], 'bits': 8}]")
        specs = [("the top-level settings", default)]
        for i, override in enumerate(self.overrides):
            if not isinstance(override, dict):
                raise TypeError(f"overrides[{i}]={override!r} must be a dict with a 'targets' list and weight settings.")
            if "targets" not in override:
                raise ValueError(f"overrides[{i}]={override!r} has no 'targets'; add e.g. 'targets': ['re:down_proj'].")
            bad = set(override) - {"targets"} - set(LayerSpec.field_names())
            if bad:
                raise ValueError(
                    f"overrides[{i}] has unknown setting(s) {sorted(bad)}; allowed: targets, {', '.join(LayerSpec.field_names())}."
                )
            override["targets"] = _check_patterns(f"overrides[{i}].targets", override["targets"])
            if not override["targets"]:
                raise ValueError(f"overrides[{i}].targets=[] selects nothing; use e.g. ['re:down_proj'].")
            try:
                specs.append((f"overrides[{i}]", self.override_spec(i)))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"overrides[{i}]: {exc}") from None
        for where, spec in specs:
            if not (spec.quantized or spec.sparse or self.lossless):
                raise ValueError(
                    f"{where} compress nothing: set bits (e.g. bits=4) and/or sparsity (e.g. sparsity=0.5 with a "
                    "pruning method), or lossless=True."
                )
            if spec.quantized and not method.quantizes:
                raise ValueError(f"method={self.method!r} does not quantize but {where} set bits={spec.bits}.")
            if spec.sparse and not method.prunes:
                raise ValueError(
                    f"method={self.method!r} does not prune but {where} ask for sparsity={spec.effective_sparsity:g}; "
                    "pick a pruning method (e.g. method='magnitude', 'wanda' or 'sparsegpt')."
                )
        method.validate(self.method_args)

    def default_spec(self) -> LayerSpec:
        return LayerSpec(**{name: getattr(self, name) for name in LayerSpec.field_names()})

    def override_spec(self, index: int) -> LayerSpec:
        override = self.overrides[index]
        return self.default_spec().with_updates(**{k: v for k, v in override.items() if k != "targets"})

    @property
    def is_data_free(self) -> bool:
        return get_method(self.method).data_free

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": self.quant_method}
        out.update({name: copy.deepcopy(getattr(self, name)) for name in self._FIELDS})
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    _LOADING_ATTRIBUTES = ("lossless_decode", "verify_checksums")

    def get_loading_attributes(self) -> dict[str, Any]:
        """Settings that a config passed to ``from_pretrained`` may change in a saved checkpoint's config (for a
        :meth:`loading` config, only the ones it was given)."""
        names = self._loading_only if self._loading_only is not None else self._LOADING_ATTRIBUTES
        return {name: getattr(self, name) for name in names}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HfCompressConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable


def _accept_loading_attributes() -> None:
    """Let ``from_pretrained(saved, quantization_config=HfCompressConfig(..., lossless_decode=...))`` choose how a
    saved checkpoint is decoded (transformers keeps a saved config but copies the ``get_loading_attributes()``
    of the configs listed in ``LOADING_ATTRIBUTES_CONFIG_TYPES``)."""
    from transformers.quantizers import auto

    types = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and HfCompressConfig not in types:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = types + (HfCompressConfig,)


_accept_loading_attributes()
