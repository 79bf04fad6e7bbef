"""Per-layer calibration statistics and the forward hooks that collect them.

:class:`LayerStats` is what a calibrated method's ``compress_layer`` receives (see
:mod:`hfcompress.algorithms`). For a layer computing ``y = W x`` with ``W[rows, cols]`` and calibration
inputs ``x_1 .. x_n`` (one per token, ``cols`` features):

* ``hessian = 2/n * sum_t x_t x_t^T`` (``[cols, cols]`` float32): the Hessian of the layer-wise
  objective ``mean_t |(W - W') x_t|^2`` that GPTQ and SparseGPT minimise (the GPTQ scaling);
* ``act_sq = sum_t x_t**2`` (``[cols]`` float32): the squared input norm per feature, Wanda's
  ``|X_j|_2 = sqrt(act_sq[j])``;
* ``nsamples = n``: the number of tokens (vectors) seen;
* ``dense_cross = 2/n * sum_t xd_t x_t^T`` (``[cols, cols]`` float32), where ``xd_t`` is the input the
  same token gives this layer in the *uncompressed* model while ``x_t`` comes from the model whose
  earlier blocks are already compressed (``needs={"dense_cross"}``). With it a method can aim at the
  dense model's output rather than the layer's own: ``min |W' X - W Xd|^2`` equals
  ``tr((W' - W*) H (W' - W*)^T)`` up to a constant, with ``W* = W G H^-1`` and ``G = dense_cross``
  (asymmetric calibration, as in GPTAQ). The pipeline runs the extra dense pass only for such methods.

Inputs are flattened to vectors of the weight's ``cols``: the last dimension of a Linear input, and for a
Conv2d the ``in/groups * kh * kw`` patches :func:`torch.nn.functional.unfold` extracts (column order
matches ``weight.reshape(out, -1)``; for grouped/depthwise convolutions the patches of all groups are
pooled, an approximation since each group of filters sees its own channels). An Embedding's lookup is
exact per row, so its statistics are the identity (GPTQ then reduces to round-to-nearest).

Products are computed in float32 per batch (bfloat16 for bfloat16 models, see :func:`_gram`) and
accumulated in float64 (added in place, widened element by element), so long calibration runs lose no
precision. Modules that read the very same input tensor (``q/k/v_proj``, ``gate/up_proj``) share the
product computation. Memory: one float64 ``cols x cols`` accumulator per hooked module plus one float32
product of the current batch; :meth:`StatsCollector.stats` converts without full-size temporaries and
:meth:`StatsCollector.release` frees a module's accumulators (the pipeline does so before compressing it).

A *reducer* (``reduce=`` of :class:`StatsCollector` and of
:func:`~hfcompress.calibration.pipeline.run_calibration`, or :func:`reducing` for every collector created
in a block of code) sees each module's raw float64 sums (:class:`LayerSums`) once, right before they are
normalised into the :class:`LayerStats` a method receives, and returns the sums to use instead.
:func:`hfcompress.distributed.all_reduce_sums` is the reducer that sums them over a process group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InputRecorder",
    "LayerStats",
    "LayerSums",
    "StopPass",
    "StatsCollector",
    "SumsReducer",
    "identity_stats",
    "layer_inputs_2d",
    "reducing",
]


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input (see the module docstring for definitions)."""

    hessian: torch.Tensor | None = None  # float32 [cols, cols], 2/n * sum x x^T
    act_sq: torch.Tensor | None = None  # float32 [cols], sum x**2
    nsamples: int = 0
    dense_cross: torch.Tensor | None = None  # float32 [cols, cols], 2/n * sum x_dense x^T (only when asked for)


@dataclass
class LayerSums:
    """The float64 sums behind one module's :class:`LayerStats`, as a :class:`StatsCollector` accumulates them.

    ``xtx = sum_t x_t x_t^T`` (``[cols, cols]``), ``act_sq = sum_t x_t**2`` (``[cols]``),
    ``cross = sum_t xd_t x_t^T`` (``[cols, cols]``) and ``nsamples = n``; a field is ``None`` when the
    method does not need it. Handed to a reducer, every needed field is a tensor (zeros when the module
    saw no input), so all processes of a group present the same fields.
    """

    xtx: torch.Tensor | None = None
    act_sq: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    nsamples: int = 0


#: ``reduce(module_name, sums) -> sums``: combines a module's sums before they are normalised (see module docstring)
SumsReducer = Callable[[str, LayerSums], LayerSums]

_REDUCER: ContextVar[SumsReducer | None] = ContextVar("hfcompress_sums_reducer", default=None)


@contextlib.contextmanager
def reducing(reduce: SumsReducer | None) -> Iterator[None]:
    """Every :class:`StatsCollector` created inside this block and not given ``reduce=`` itself uses ``reduce``.

    This is how code that does not pass collectors around (e.g. :func:`hfcompress.oneshot`) gets its
    statistics reduced; ``None`` switches reduction off inside the block.
    """
    if reduce is not None and not callable(reduce):
        raise TypeError(f"reduce={reduce!r} must be a callable (name, LayerSums) -> LayerSums, or None.")
    token = _REDUCER.set(reduce)
    try:
        yield
    finally:
        _REDUCER.reset(token)


def identity_stats(cols: int, needs: frozenset[str], device: torch.device | str = "cpu") -> LayerStats:
    """Statistics of inputs that carry no information about the weight's columns (identity Hessian)."""
    eye = torch.eye(cols, device=device)
    return LayerStats(
        hessian=eye if "hessian" in needs or "dense_cross" in needs else None,
        act_sq=torch.ones(cols, device=device) if "act_sq" in needs else None,
        nsamples=0,
        dense_cross=eye.clone() if "dense_cross" in needs else None,
    )


def layer_inputs_2d(module: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """The input of ``module`` as vectors ``[n, cols]`` matching ``weight.reshape(rows, cols)``, in ``dtype``
    (``None``: keep the input's dtype)."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        if isinstance(padding, str):  # "same"/"valid": materialise the explicit padding
            if padding == "valid":
                padding = 0
            else:
                pads = []
                for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
                padding = 0
        cols = F.unfold(x if dtype is None else x.to(dtype), module.kernel_size, module.dilation, padding, module.stride)
        per_group = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        n, _, length = cols.shape
        # [N, groups, per_group, L] -> [N * groups * L, per_group]: patches of all channel groups pooled
        return cols.reshape(n, module.groups, per_group, length).permute(0, 1, 3, 2).reshape(-1, per_group)
    x = x.reshape(-1, x.shape[-1])
    return x if dtype is None else x.to(dtype)


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` of one batch, to be added to a float64 accumulator. bfloat16 inputs multiply in bfloat16
    (float32 accumulation inside the kernel, about twice as fast on CPUs with bf16 dot products; the
    rounding of each batch's product averages out over batches), everything else in float32."""
    if not (a.dtype == b.dtype == torch.bfloat16):
        a, b = a.float(), b.float()
    return a.t() @ b


class StopPass(Exception):
    """Raised by a collector hook once every statistic of the current forward pass has been gathered."""


class _Accumulator:
    __slots__ = ("xtx", "sq", "cross", "n")

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.n = 0


def _add(acc: torch.Tensor | None, value: torch.Tensor | None, chunk: int = 256) -> torch.Tensor | None:
    """``acc + value`` in float64, in place. ``value`` is widened a block of rows at a time: a mixed-dtype
    ``add_`` on CPU would first copy all of it to float64."""
    if value is None:
        return acc
    if acc is None:
        return value.to(torch.float64, copy=True)
    if value.dim() < 2 or value.dtype == torch.float64:
        return acc.add_(value)
    for r0 in range(0, value.shape[0], chunk):
        acc[r0 : r0 + chunk].add_(value[r0 : r0 + chunk])
    return acc


def _scaled_float32(total: torch.Tensor, factor: float, chunk: int = 256) -> torch.Tensor:
    """``(total * factor).float()`` computed a block of rows at a time (no float64 temporary of full size)."""
    if total.dim() < 2:
        return (total * factor).float()
    out = torch.empty(total.shape, dtype=torch.float32, device=total.device)
    for r0 in range(0, total.shape[0], chunk):
        out[r0 : r0 + chunk] = total[r0 : r0 + chunk] * factor
    return out


class StatsCollector:
    """Forward pre-hooks accumulating :class:`LayerStats` for some modules while a block runs.

    Use as a context manager; the hooks are removed on exit, also after an exception::

        with StatsCollector({"mlp.up_proj": up}, needs={"hessian"}) as collector:
            block(hidden_states)
        stats = collector.stats("mlp.up_proj")
    """

    def __init__(
        self, modules: dict[str, nn.Module], needs: frozenset[str] | set[str], reduce: SumsReducer | None = None
    ) -> None:
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce={reduce!r} must be a callable (name, LayerSums) -> LayerSums, or None.")
        self.modules = dict(modules)
        self.needs = frozenset(needs)
        #: applied to each module's sums once, when its statistics are first read (default: :func:`reducing`'s)
        self.reduce: SumsReducer | None = reduce if reduce is not None else _REDUCER.get()
        self._reduced: set[str] = set()
        self._acc = {name: _Accumulator() for name in self.modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last: tuple | None = None  # (module, input, reference, x^T x, sum x^2, xd^T x, n) of the latest call
        #: inputs the uncompressed model gives each module for the current batch (``"dense_cross"`` only)
        self.reference: dict[str, torch.Tensor] = {}
        #: hooks do nothing while False (the pipeline's dense passes)
        self.active = True
        #: raise :class:`StopPass` after the last hooked module of a pass (the rest of the block is not needed)
        self.stop_early = False

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "StatsCollector":
        for name, module in self.modules.items():
            if isinstance(module, nn.Embedding):
                continue  # identity statistics, see module docstring
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent) and drop cached inputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None
        self.reference = {}


    # ------------------------------------------------------------------ stopping a pass early
    def start_pass(self) -> None:
        """Call before each forward pass: enables :meth:`stop_after_last` once the call order is known."""
        self._calls_this_pass: list[str] = []

    def end_pass(self) -> None:
        """Call after each forward pass; the first complete pass fixes the call order."""
        calls = getattr(self, "_calls_this_pass", None)
        if calls is not None and getattr(self, "_stop_at", None) is None and not getattr(self, "_order_known", False):
            self._order_known = True
            if calls and len(set(calls)) == len(calls) == len(self._handles):  # every module once per pass
                self._stop_at = calls[-1]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not self.active or not isinstance(x, torch.Tensor):
                return
            self._accumulate(name, module, x)
            calls = getattr(self, "_calls_this_pass", None)
            if calls is not None:
                calls.append(name)
            if self.stop_early and name == getattr(self, "_stop_at", None):
                raise StopPass  # nothing after the last hooked module matters for the statistics

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        ref = self.reference.get(name) if "dense_cross" in self.needs else None
        if "dense_cross" in self.needs and ref is None:
            raise RuntimeError(f"No dense-model input was recorded for {name}; the pipeline must set collector.reference.")
        last = self._last
        if (
            last is not None
            and last[1] is x
            and last[2] is ref
            and type(last[0]) is type(module)
            and _same_geometry(last[0], module)
        ):
            _, _, _, xtx, sq, cross, n = last  # same input tensor as the previous hook (q/k/v): reuse the products
        else:
            x2 = layer_inputs_2d(module, x, None if x.dtype == torch.bfloat16 else torch.float32)
            n = x2.shape[0]
            xtx = _gram(x2, x2) if "hessian" in self.needs or "dense_cross" in self.needs else None
            sq = x2.float().pow(2).sum(0) if "act_sq" in self.needs else None
            cross = None
            if ref is not None:
                ref2 = layer_inputs_2d(module, ref, None if ref.dtype == torch.bfloat16 else torch.float32)
                if ref2.shape != x2.shape:
                    raise RuntimeError(f"{name}: the dense-model input has shape {tuple(ref2.shape)}, expected {tuple(x2.shape)}.")
                cross = _gram(ref2, x2)
            self._last = (module, x, ref, xtx, sq, cross, n)
        acc = self._acc[name]
        acc.xtx = _add(acc.xtx, xtx)
        acc.sq = _add(acc.sq, sq)
        acc.cross = _add(acc.cross, cross)
        acc.n += n

    # ------------------------------------------------------------------ results
    def nsamples(self, name: str) -> int:
        """Vectors seen by module ``name`` (in this process until :meth:`stats` has applied the reducer)."""
        return self._acc[name].n

    def sums(self, name: str) -> LayerSums:
        """The float64 sums of module ``name``, every needed field a tensor (zeros if it saw no input).

        The tensors are the collector's own accumulators, not copies."""
        acc = self._acc[name]
        weight = self.modules[name].weight
        cols = weight.reshape(weight.shape[0], -1).shape[1]

        def field(value, shape, needed):
            if not needed:
                return None
            return value if value is not None else torch.zeros(shape, dtype=torch.float64, device=weight.device)

        return LayerSums(
            xtx=field(acc.xtx, (cols, cols), bool(self.needs & {"hessian", "dense_cross"})),
            act_sq=field(acc.sq, (cols,), "act_sq" in self.needs),
            cross=field(acc.cross, (cols, cols), "dense_cross" in self.needs),
            nsamples=acc.n,
        )

    def _apply_reduce(self, name: str) -> None:
        sums = self.sums(name)
        out = self.reduce(name, sums)
        if not isinstance(out, LayerSums):
            raise TypeError(f"The statistics reducer returned {type(out).__name__} for {name}; it must return a LayerSums.")
        if out.nsamples < 0:
            raise ValueError(f"The statistics reducer returned nsamples={out.nsamples} for {name}; it must be >= 0.")
        acc = self._acc[name]
        acc.n = int(out.nsamples)
        if acc.n == 0:  # nobody saw the module: identity statistics
            acc.xtx = acc.sq = acc.cross = None
        else:
            acc.xtx, acc.sq, acc.cross = out.xtx, out.act_sq, out.cross

    def stats(self, name: str) -> LayerStats:
        """The statistics of module ``name`` (identity statistics when it saw no input), after the reducer."""
        if self.reduce is not None and name not in self._reduced:
            self._apply_reduce(name)
            self._reduced.add(name)
        acc = self._acc[name]
        module = self.modules[name]
        if acc.n == 0:
            cols = module.weight.reshape(module.weight.shape[0], -1).shape[1]
            return identity_stats(cols, self.needs, module.weight.device)
        hessian = _scaled_float32(acc.xtx, 2.0 / acc.n) if acc.xtx is not None else None
        act_sq = acc.sq.float() if acc.sq is not None else None
        cross = _scaled_float32(acc.cross, 2.0 / acc.n) if acc.cross is not None else None
        return LayerStats(hessian=hessian, act_sq=act_sq, nsamples=acc.n, dense_cross=cross)

    def release(self, name: str) -> None:
        """Free the accumulators of ``name`` (:meth:`stats` then gives identity statistics for it)."""
        self._acc[name] = _Accumulator()
        self._reduced.add(name)  # nothing left to reduce


def _same_geometry(a: nn.Module, b: nn.Module) -> bool:
    if isinstance(a, nn.Conv2d):
        keys = ("kernel_size", "stride", "padding", "dilation", "groups", "in_channels", "padding_mode")
        return all(getattr(a, k) == getattr(b, k) for k in keys)
    return True


class InputRecorder:
    """Forward pre-hooks keeping the latest input of each module (the dense pass of ``"dense_cross"``)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "InputRecorder":
        for name, module in self.modules.items():

            def hook(mod, args, _name=name):
                if args and isinstance(args[0], torch.Tensor):
                    self.inputs[_name] = args[0].detach()

            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
