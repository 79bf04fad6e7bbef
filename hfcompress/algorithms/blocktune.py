"""``blocktune``: a layer-wise start (QuantEase or GPTQ), then each block's scales tuned on its output.

Layer by layer the method is ``quantease`` (or ``gptq`` with ``start="gptq"``, faster); once a block's
layers are quantized, the calibration pipeline hands the block to
:func:`tune_block_scales`, which fits the quantization scales (and the
block's normalisation gains) to the uncompressed model's block output. Codes, zero points and the
stored format are those of the layer-wise method, so a ``blocktune`` checkpoint loads like any other.

``method_args``: those of the starting method, ``start`` (``"quantease"``), and the ``tune_*`` keys of
:class:`BlockTuneOptions`.

Layer-wise methods (GPTQ, QuantEase) each minimise one layer's output error on the inputs it sees; none
of them sees what the error does after the attention softmax, the MLP's gate, the residual sum, or the
errors already made by earlier blocks. This stage closes that gap with a small gradient descent on the
*block* objective (the idea of OmniQuant/EfficientQAT's block-wise reconstruction, restricted to the
grid parameters so the integer codes chosen by the layer-wise method stay untouched):

    minimise  mean || block_q(x_q) - block_dense(x_dense) ||^2

``x_q`` are the hidden states the *compressed* model feeds the block (earlier blocks already
quantized), ``block_dense(x_dense)`` what the *uncompressed* model produces at the same place, so each
block also absorbs part of the error accumulated before it. The trainable parameters are one log-scale
per (row, group) of every quantized weight of the block (``scale = s0 * exp(theta)``, codes and zero
points fixed), and optionally the block's own dense parameters (normalisation gains). Adam runs one
step per ``batch_size`` windows on the first ``samples`` windows; the forward passes run under bf16 autocast
by default (twice as fast on CPUs with AVX-512 BF16, the loss in float32). The tuned scales are rounded
to the stored scale dtype, and the result is kept only if the block objective, measured again in the
model's own dtype with the rounded scales, went down.
"""


from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..formats.base import CompressedWeight
from ..grid import QuantizedWeight, _zero_full, expand_groups
from ..spec import LayerSpec
from .base import Method, register_method
from .options import method_options
from .gptq import gptq_compress_layer
from .quantease import QUANTEASE_DEFAULTS, quantease_compress_layer

logger = logging.getLogger(__name__)

__all__ = ["BLOCKTUNE_DEFAULTS", "TUNE_DEFAULTS", "BlockTuneOptions", "BlockTuneResult", "blocktune_compress_layer", "blocktune_options", "tune_block_scales"]

#: ``method_args`` of block tuning (see :class:`BlockTuneOptions`)
TUNE_DEFAULTS: dict[str, Any] = {
    "tune_samples": 32,
    "tune_batch_size": 2,
    "tune_epochs": 1,
    "tune_lr": 5e-3,
    "tune_norm_lr": 1e-4,
    "tune_autocast": "bfloat16",
}


@dataclass(frozen=True)
class BlockTuneOptions:
    """How block tuning runs.

    ``samples``: calibration windows used (the first ones); ``batch_size``: windows per Adam step (small
    batches, many steps: 16 steps of 2 windows tune better than 8 of 4 on SmolLM2); ``epochs``: passes
    over them; ``lr``: Adam's step on the log-scales;
    ``norm_lr``: Adam's step on the block's dense parameters (normalisation gains), 0 to keep them;
    ``autocast``: ``"bfloat16"``/``"float16"`` to run the tuning passes under autocast, ``None`` for the
    model's own dtype.
    """

    samples: int = 32
    batch_size: int = 2
    epochs: int = 1
    lr: float = 5e-3
    norm_lr: float = 1e-4
    autocast: str | None = "bfloat16"

    @classmethod
    def from_method_args(cls, args: dict[str, Any]) -> "BlockTuneOptions":
        """Read the ``tune_*`` keys of ``method_args`` (others are ignored), validating each."""
        a = {**TUNE_DEFAULTS, **{k: v for k, v in args.items() if k in TUNE_DEFAULTS}}
        for key, low in (("tune_samples", 1), ("tune_batch_size", 1), ("tune_epochs", 0)):
            v = a[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"method_args {key}={v!r} must be an integer >= {low}, e.g. {TUNE_DEFAULTS[key]}.")
        for key in ("tune_lr", "tune_norm_lr"):
            v = a[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"method_args {key}={v!r} must be a finite number >= 0, e.g. {TUNE_DEFAULTS[key]}.")
        if a["tune_autocast"] not in (None, "bfloat16", "float16"):
            raise ValueError(f"method_args tune_autocast={a['tune_autocast']!r} must be 'bfloat16', 'float16' or None.")
        return cls(a["tune_samples"], a["tune_batch_size"], a["tune_epochs"], float(a["tune_lr"]), float(a["tune_norm_lr"]), a["tune_autocast"])


@dataclass(frozen=True)
class BlockTuneResult:
    """Block objective (mean squared error against the dense block output) before and after tuning."""

    loss_before: float
    loss_after: float
    kept: bool
    steps: int


class _TunedWeight:
    """One quantized weight as a differentiable function of its log-scales."""

    def __init__(self, module: nn.Module, q: QuantizedWeight) -> None:
        rows, cols = q.codes.shape
        weight = module.weight
        self.module, self.q, self.shape, self.dtype = module, q, weight.shape, weight.dtype
        zero = _zero_full(q.zero, q.bits, rows, cols, q.group_size, q.codes.device)
        self.offsets = (q.codes.float() - zero).to(weight.device)
        self.s0 = q.scale.float().to(weight.device)
        self.theta = nn.Parameter(torch.zeros_like(self.s0))

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.theta)

    def weight(self) -> torch.Tensor:
        cols = self.offsets.shape[1]
        return (self.offsets * expand_groups(self.scale(), cols, self.q.group_size)).to(self.dtype).reshape(self.shape)

    def round_scales(self) -> QuantizedWeight:
        """Round the tuned scales to the stored dtype and continue from them; returns the grid to store."""
        scale = self.scale().detach().to(self.q.scale.dtype)
        self.s0, self.theta = scale.float(), nn.Parameter(torch.zeros_like(self.s0))
        return QuantizedWeight(codes=self.q.codes, scale=scale.to(self.q.scale.device), zero=self.q.zero, bits=self.q.bits, group_size=self.q.group_size)


@contextlib.contextmanager
def _weights_as_functions(originals: dict[str, nn.Module]) -> Iterator[None]:
    """Take ``weight`` out of each module's parameters so a computed tensor can be set in its place."""
    saved = {}
    try:
        for name, module in originals.items():
            saved[name] = module._parameters.pop("weight")
        yield
    finally:
        for name, module in originals.items():
            module.__dict__.pop("weight", None)
            if name in saved:
                module._parameters["weight"] = saved[name]


def _autocast(kind: str | None, device: torch.device):
    if kind is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, kind))


def tune_block_scales(
    block: nn.Module,
    call: Callable[[int, torch.Tensor], torch.Tensor],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    originals: dict[str, nn.Module],
    quantized: dict[str, QuantizedWeight],
    options: BlockTuneOptions,
    can_tune_dense: bool = True,
) -> tuple[BlockTuneResult, dict[str, CompressedWeight]]:
    """Tune the scales of the quantized weights of ``block`` (see module docstring).

    ``call(k, x)`` runs the block on hidden states ``x`` of tuning batch ``k`` (with the modules currently
    installed in it); ``inputs[k]``/``targets[k]``: compressed-model inputs and dense-model outputs of
    tuning batch ``k`` (the caller picks them: ``options.samples`` windows in batches of ``options.batch_size``). ``originals`` maps the names of the quantized modules to the dense modules
    they replaced, ``quantized`` to their grids. The caller installs the ``originals`` in the block
    before calling; here their ``weight`` parameter is set aside and replaced, before every pass, by the
    weight decoded from the trainable scales (and put back on return).

    Returns the result and, for each module, the new :class:`CompressedWeight` (none when tuning did not
    lower the objective). Dense parameters of the block (not of ``originals``) are tuned in place when
    ``options.norm_lr > 0`` and ``can_tune_dense``, and restored if the result is not kept.
    """
    n_batches = len(inputs)
    device = inputs[0].device
    tuned = {name: _TunedWeight(module, quantized[name]) for name, module in originals.items()}
    frozen_ids = {id(p) for m in originals.values() for p in m.parameters()}
    dense = [p for p in block.parameters() if id(p) not in frozen_ids and p.is_floating_point()]
    dense_tunable = dense if (options.norm_lr > 0 and can_tune_dense) else []
    flags = {id(p): p.requires_grad for p in block.parameters()}
    dense_backup = [p.detach().clone() for p in dense_tunable]

    def loss_of(b: int, train: bool) -> torch.Tensor:
        for name, t in tuned.items():
            t.module.weight = t.weight() if train else t.weight().detach()
        with _autocast(options.autocast if train else None, device):
            out = call(b, inputs[b])
        return torch.nn.functional.mse_loss(out.float(), targets[b].float())

    @torch.no_grad()
    def objective() -> float:
        return sum(loss_of(b, False).item() for b in range(n_batches)) / n_batches

    steps = 0
    with _weights_as_functions(originals):
        before = objective()
        for p in block.parameters():
            p.requires_grad_(False)
        groups = [{"params": [t.theta for t in tuned.values()], "lr": options.lr}]
        if dense_tunable:
            for p in dense_tunable:
                p.requires_grad_(True)
            groups.append({"params": dense_tunable, "lr": options.norm_lr})
        opt = torch.optim.Adam(groups)
        try:
            with torch.enable_grad():
                for _ in range(options.epochs):
                    for b in range(n_batches):
                        loss = loss_of(b, True)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        steps += 1
            stored = {name: t.round_scales() for name, t in tuned.items()}  # judged as they will be stored
            after = objective()
        finally:
            for p in block.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
                p.grad = None
    kept = math.isfinite(after) and after < before
    if not kept:
        with torch.no_grad():
            for p, saved in zip(dense_tunable, dense_backup):
                p.copy_(saved)
        return BlockTuneResult(before, after, False, steps), {}
    results = {name: CompressedWeight(weight=q.dequantize(torch.float32), quantized=q) for name, q in stored.items()}
    return BlockTuneResult(before, after, True, steps), results


BLOCKTUNE_DEFAULTS: dict[str, Any] = {**QUANTEASE_DEFAULTS, "start": "quantease", **TUNE_DEFAULTS}
_STARTS = ("quantease", "gptq")


def _checked(method_args: dict[str, Any]) -> dict[str, Any]:
    args = method_options("blocktune", method_args, BLOCKTUNE_DEFAULTS)
    if args["start"] not in _STARTS:
        raise ValueError(f"method_args start={args['start']!r} is not a layer-wise start of 'blocktune'; choose one of {list(_STARTS)}.")
    if args["start"] == "gptq" and any(k in method_args for k in ("sweeps", "cd_damp")):
        raise ValueError("method_args sweeps/cd_damp only apply to start='quantease'; remove them or use start='quantease'.")
    return args


def blocktune_options(method_args: dict[str, Any]) -> BlockTuneOptions:
    """The block-tuning options of ``method_args`` (all of them validated, so errors come before any work)."""
    return BlockTuneOptions.from_method_args(_checked(method_args))


def blocktune_compress_layer(weight: torch.Tensor, stats, spec: LayerSpec, method_args: dict[str, Any]) -> CompressedWeight:
    """``compress_layer`` of method ``"blocktune"``: the layer-wise start (tuning happens per block)."""
    args = _checked(method_args)
    start = args.pop("start")
    layer_args = {k: v for k, v in args.items() if k not in TUNE_DEFAULTS}
    if start == "gptq":
        layer_args.pop("sweeps"), layer_args.pop("cd_damp")
        return gptq_compress_layer(weight, stats, spec, layer_args)
    return quantease_compress_layer(weight, stats, spec, layer_args)


register_method(
    Method(
        name="blocktune",
        data_free=False,
        quantizes=True,
        prunes=False,
        description="QuantEase per layer, then each block's quantization scales tuned on its output against the dense model (lowest error, slowest).",
        needs=frozenset({"hessian"}),
        compress_layer=blocktune_compress_layer,
        tune_options=blocktune_options,
        check_args=blocktune_options,
    )
)
