"""One block of a calibrated compression: the step that :func:`~.pipeline.run_calibration` repeats.

:func:`calibrate_block` takes the hidden states entering one block (:class:`CalibrationState`), collects
the statistics the method needs for the block's targeted modules, compresses them in place (stage by
stage with ``true_sequential``), tunes the block's scales for methods with ``tune_options``, and re-runs
the compressed block to make the hidden states entering the next block. Methods that aim at the dense
model's outputs (``"dense_cross"`` statistics, block tuning) also follow the uncompressed model: the state
then carries its hidden states too (``dense_hidden``) and the step moves them on through the dense block.

The in-memory pipeline (:func:`hfcompress.oneshot`) and streaming
(:func:`hfcompress.streaming.compress_checkpoint`) both walk the blocks with this step, so a block is
calibrated the same way, to the same bits, on either path. A :class:`CalibrationRun` holds what the steps
of one run share (model, plan, method, statistics reducer) and what they did (results, and the replaced
dense modules until :meth:`CalibrationRun.commit`, for :meth:`CalibrationRun.rollback`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms import Method
from ..algorithms.blocktune import BlockTuneOptions, BlockTuneResult, tune_block_scales
from ..formats.base import CompressedWeight
from ..modules import CompressedModule, compressed_twin, set_submodule
from ..spec import LayerSpec
from .blocks import BlockInputs
from .memory import trim_heap
from .stats import InputRecorder, LayerStats, StatsCollector, StopPass, SumsReducer

logger = logging.getLogger("hfcompress.calibration")

__all__ = [
    "CalibrationRun",
    "CalibrationState",
    "LayerResult",
    "calibrate_block",
    "entry_state",
    "onloaded",
    "own_aligned_storage",
    "relative_output_error",
]


@dataclass
class LayerResult:
    """What the pipeline measured for one compressed module."""

    name: str
    error: float  # |dW X|^2 / |W X|^2 on the calibration inputs (nan when no statistic allows computing it)
    nsamples: int  # calibration vectors the module saw
    seconds: float  # time spent in compress_layer


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, stats: LayerStats) -> float:
    """``|(W - W') X|^2 / |W X|^2`` from the Hessian (or its diagonal from ``act_sq``)."""
    w = w.float()
    delta = w_hat.float() - w
    if stats.hessian is not None:
        h = stats.hessian.float()
        num = ((delta @ h) * delta).sum()
        den = ((w @ h) * w).sum()
    elif stats.act_sq is not None:
        num = (delta.pow(2) * stats.act_sq).sum()
        den = (w.pow(2) * stats.act_sq).sum()
    else:
        return float("nan")
    return float(num / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------- accelerate offloading
@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Keep the accelerate-offloaded weights of ``module`` on their execution device inside the block.

    Each offloaded submodule is loaded once and its hook told not to offload after every forward call
    (as it otherwise would between our calibration passes); on exit the weights go back to the offload
    store. Compressed twins installed meanwhile have no hook and stay on the execution device.
    """
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # pragma: no cover - accelerate is a dependency
        yield
        return
    loaded = []
    try:
        for sub in module.modules():
            if has_offloaded_params(sub):
                hook = sub._hf_hook
                hook.pre_forward(sub)
                hook.offload = False
                loaded.append((sub, hook))
        yield
    finally:
        for sub, hook in loaded:
            hook.offload = True
            hook.post_forward(sub, None)


_ALIGNMENT = 64  # bytes: a cache line, what BLAS kernels (MKL's AVX-512 paths) assume for bit-reproducible sums


def own_aligned_storage(module: nn.Module) -> int:
    """Give every CPU parameter/buffer of ``module`` that is not 64-byte aligned an aligned copy of its own.

    ``from_pretrained`` leaves weights as views into the memory-mapped safetensors file and a streamed
    checkpoint reads them into arbitrary buffers; some BLAS kernels sum in an order that depends on the
    pointer's alignment, so the same block would calibrate to (slightly) different results depending on
    how it was loaded. Copying into torch-allocated (aligned) storage makes calibration bit-reproducible
    across loading paths. Returns how many tensors were copied.
    """
    copied = 0
    for sub in module.modules():
        for tensors in (sub._parameters, sub._buffers):
            for tensor in tensors.values():
                if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
                    continue
                if tensor.data_ptr() % _ALIGNMENT:
                    tensor.data = tensor.data.clone()
                    copied += 1
    return copied


def _weight_device(module: nn.Module) -> torch.device:
    w = module.weight
    return w.device


class _StandIns:
    """Decoded compressed weights installed in the original dense modules (see :func:`_decoded_stand_ins`)."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, nn.Module, nn.Parameter, nn.Parameter]] = []

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Temporarily give the stand-ins their original (uncompressed) weights back."""
        for _, original, param, _ in self.saved:
            original._parameters["weight"] = param
        try:
            yield
        finally:
            for _, original, _, decoded in self.saved:
                original._parameters["weight"] = decoded


@contextlib.contextmanager
def _decoded_stand_ins(model: nn.Module, replaced: dict[str, nn.Module], twins: dict[str, CompressedModule]) -> Iterator[_StandIns]:
    """While re-running a block, compute with the decoded compressed weights in the original dense modules.

    Each compressed weight is decoded once (instead of once per batch) and the original module, holding
    it as its weight, stands in for the twin; everything is put back on exit.
    """
    stand_ins = _StandIns()
    try:
        for name, twin in twins.items():
            original = replaced[name]
            param = original._parameters["weight"]
            decoded = twin.dequantize_weight(param.dtype).reshape(param.shape).to(param.device)
            decoded = nn.Parameter(decoded, requires_grad=False)
            original._parameters["weight"] = decoded
            stand_ins.saved.append((name, original, param, decoded))
            set_submodule(model, name, original)
        yield stand_ins
    finally:
        for name, original, param, _ in stand_ins.saved:
            original._parameters["weight"] = param
            set_submodule(model, name, twins[name])


def _batches_covering(rows: list[int], samples: int) -> int:
    """How many leading calibration batches hold the first ``samples`` windows."""
    total = 0
    for n, size in enumerate(rows, 1):
        total += size
        if total >= samples:
            return n
    return len(rows)


def _tune_block(
    run: CalibrationRun,
    block: nn.Module,
    index: int,
    block_inputs: BlockInputs,
    hidden: list[torch.Tensor],
    targets: list[torch.Tensor],
    twins: dict[str, CompressedModule],
    progress: Any,
) -> BlockTuneResult | None:
    """Tune the scales of the block's quantized weights on its output (see :mod:`~hfcompress.algorithms.blocktune`)."""
    model, options = run.model, run.tune
    names = [n for n in twins if n in run.quantized]
    if not names:
        return None
    try:
        from accelerate.utils import has_offloaded_params

        offloaded = any(has_offloaded_params(m) for m in block.modules())
    except ImportError:  # pragma: no cover - accelerate is a dependency
        offloaded = False
    originals = {n: run.replaced[n] for n in names}
    # tuning steps over micro-batches of ``options.batch_size`` samples, the first ``options.samples`` only
    micro: list[tuple[int, slice]] = []
    taken = 0
    for b, h in enumerate(hidden[: len(targets)]):
        for a in range(0, h.shape[0], options.batch_size):
            if taken >= options.samples:
                break
            stop = min(a + options.batch_size, h.shape[0], a + options.samples - taken)
            micro.append((b, slice(a, stop)))
            taken += stop - a
    start = time.perf_counter()
    with run.originals(names):
        result, new = tune_block_scales(
            block, lambda k, x: block_inputs.call_rows(block, index, micro[k][0], micro[k][1], x),
            [hidden[b][sl] for b, sl in micro], [targets[b][sl] for b, sl in micro], originals,
            {n: run.quantized[n] for n in names}, options, can_tune_dense=not offloaded,
        )  # fmt: skip
    for name, cw in new.items():
        twins[name].set_compressed_weight(cw)
    for name in names:
        run.quantized.pop(name, None)
    logger.info(
        "block %d: tuned output error %.4g -> %.4g (%s, %d steps, %.1fs)", index, result.loss_before,
        result.loss_after, "kept" if result.kept else "not kept", result.steps, time.perf_counter() - start,
    )  # fmt: skip
    if progress is not None:
        progress.set_postfix(tune=f"{result.loss_before:.3g}->{result.loss_after:.3g}", refresh=False)
    return result


# ---------------------------------------------------------------------- one run, one block
class CalibrationRun:
    """One calibrated compression in progress: what the block steps of a run share, and what they did.

    Args:
        model: the model being compressed; ``plan`` names its modules.
        plan: the modules to compress and how (:func:`hfcompress.plan.targets.resolve_layers`).
        method: a calibrated method (one with ``compress_layer``).
        method_args: the method's arguments (``HfCompressConfig.method_args``).
        reduce: combines each module's float64 statistics before the method sees them (e.g.
            :func:`hfcompress.distributed.all_reduce_sums`); ``None``: the one set by :func:`.stats.reducing`, if any.
        true_sequential: calibrate the modules inside a block in the order they run, each on inputs made by
            the already-compressed modules before it (one extra block pass per stage).

    ``results`` holds a :class:`LayerResult` per compressed module; ``replaced`` the dense modules the
    compressed twins replaced, until :meth:`commit` forgets them or :meth:`rollback` puts them back.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: dict[str, LayerSpec],
        method: Method,
        method_args: dict[str, Any],
        *,
        reduce: SumsReducer | None = None,
        true_sequential: bool = False,
    ) -> None:
        if method.compress_layer is None:
            raise ValueError(f"method={method.name!r} is data-free; use hfcompress.compress(model, config) instead.")
        self.model = model
        self.plan = plan
        self.method = method
        self.method_args = dict(method_args)
        self.reduce = reduce
        self.true_sequential = true_sequential
        self.needs: frozenset[str] = method.needs
        #: the method reads its modules' dense-model inputs (``"dense_cross"`` statistics)
        self.use_dense = "dense_cross" in method.needs
        #: block tuning options (methods with ``tune_options``, e.g. ``blocktune``), else ``None``
        self.tune: BlockTuneOptions | None = method.tune_options(method_args) if method.tune_options is not None else None
        self.results: dict[str, LayerResult] = {}
        self.replaced: dict[str, nn.Module] = {}  # name -> original dense module (for rollback)
        #: block tuning only (else ``None``): the grids of the current block's quantized (not pruned) weights
        self.quantized: dict[str, Any] | None = {} if self.tune is not None else None

    @property
    def track_dense(self) -> bool:
        """Whether the run follows the dense model's hidden states block by block (``CalibrationState.dense_hidden``)."""
        return self.use_dense or self.tune is not None

    def compress_modules(self, names: list[str], collector: StatsCollector | None) -> dict[str, CompressedModule]:
        twins = {}
        for name in names:
            dense = self.model.get_submodule(name)
            spec = self.plan[name]
            weight = dense.weight.detach()
            w2d = weight.reshape(weight.shape[0], -1).to(torch.float32, copy=True)
            stats = collector.stats(name) if collector is not None else LayerStats()
            if collector is not None:
                if stats.nsamples == 0 and not isinstance(dense, nn.Embedding):
                    logger.warning("%s received no calibration input; it is compressed with identity statistics.", name)
                collector.release(name)  # the float64 sums are no longer needed: free them before the method runs
            trim_heap()  # the method's workspace starts from what this layer holds, not from past layers' debris
            start = time.perf_counter()
            cw: CompressedWeight = self.method.compress_layer(w2d, stats, spec, self.method_args)
            seconds = time.perf_counter() - start
            _check_result(name, cw, tuple(w2d.shape))
            if self.quantized is not None and cw.quantized is not None and cw.mask is None:
                self.quantized[name] = cw.quantized
            twin = compressed_twin(dense, spec)
            twin.set_compressed_weight(cw)
            twin = twin.to(_weight_device(dense))
            error = relative_output_error(weight.reshape(w2d.shape), cw.weight, stats)
            self.results[name] = LayerResult(name, error, stats.nsamples, seconds)
            logger.info("%s: relative output error %.3e (%d samples, %.2fs)", name, error, stats.nsamples, seconds)
            set_submodule(self.model, name, twin)
            self.replaced[name] = dense
            twins[name] = twin
            del stats, cw, w2d
        return twins

    def rollback(self) -> None:
        """Put back every dense module compressed since the last :meth:`commit`."""
        for name, dense in self.replaced.items():
            set_submodule(self.model, name, dense)
        self.replaced.clear()

    @contextlib.contextmanager
    def originals(self, names: list[str]) -> Iterator[None]:
        """Temporarily put the original dense modules back for ``names`` that were already compressed."""
        swapped = {n: self.model.get_submodule(n) for n in names if n in self.replaced}
        for n in swapped:
            set_submodule(self.model, n, self.replaced[n])
        try:
            yield
        finally:
            for n, twin in swapped.items():
                set_submodule(self.model, n, twin)

    def commit(self) -> None:
        """Forget the dense modules compressed so far (frees them; no :meth:`rollback` reaches them any more)."""
        self.replaced.clear()


def _check_result(name: str, cw: Any, shape: tuple[int, int]) -> None:
    if not isinstance(cw, CompressedWeight):
        raise TypeError(f"compress_layer returned {type(cw).__name__} for {name}; it must return a CompressedWeight.")
    if tuple(cw.weight.shape) != shape:
        raise ValueError(f"compress_layer returned a weight of shape {tuple(cw.weight.shape)} for {name}, expected {shape}.")
    if not torch.isfinite(cw.weight).all():
        raise FloatingPointError(f"compress_layer produced non-finite weights for {name}.")


def _stages(
    model: nn.Module, blocks_in: BlockInputs, block: nn.Module, index: int, names: list[str], first: torch.Tensor
) -> list[list[str]]:
    """Targeted modules of a block grouped by shared input, in the order the block calls them (on the batch ``first``)."""
    # The inputs themselves are kept (not their id()): a freed tensor's address can be reused by the next
    # one, which made unrelated modules look like they shared an input (o_proj grouped with gate/up) at random.
    order: list[tuple[str, object]] = []
    modules = {n: model.get_submodule(n) for n in names}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, _name=name):
            order.append((_name, args[0] if args else None))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        blocks_in.call(block, index, 0, first)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if stages and x is not None and x is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = x
    missing = [n for n in names if n not in seen]
    if missing:
        stages.append(missing)  # never called: compressed with identity statistics
    return stages


@torch.no_grad()
def _stage_statistics(
    run: CalibrationRun, twins: dict[str, CompressedModule], stage: list[str], block_inputs: BlockInputs,
    block: nn.Module, i: int, hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor] | None,
    dense_out: Callable[[torch.Tensor], Any] | None,
) -> StatsCollector:
    """The statistics of one stage's modules over the calibration windows (the block runs up to the last of them).

    With ``dense_hidden`` (methods aiming at the dense model's outputs) each window also runs through the dense
    block first, recording the modules' dense inputs as the collector's reference; ``dense_out``, when given,
    is called with each of the dense block's outputs.
    """
    modules = {n: run.model.get_submodule(n) for n in stage}
    with StatsCollector(modules, run.needs, run.reduce) as collector, _decoded_stand_ins(run.model, run.replaced, twins) as stand_ins:
        collector.stop_early = True  # the block's output is not needed in this pass
        for b, h in enumerate(hidden):
            if dense_hidden is not None:
                collector.active = False
                with stand_ins.dense(), InputRecorder(modules) as rec:
                    out = block_inputs.call(block, i, b, dense_hidden[b])
                if dense_out is not None:
                    dense_out(out)
                collector.reference, collector.active = rec.inputs, True
            collector.start_pass()
            try:
                block_inputs.call(block, i, b, h)
            except StopPass:
                pass
            collector.end_pass()
            collector.reference = {}
    return collector




# ---------------------------------------------------------------------- the step
@dataclass
class CalibrationState:
    """The calibration hidden states entering a block, one tensor per calibration batch.

    ``hidden``: the compressed model's (what the blocks compressed so far produce); ``dense_hidden``: the
    uncompressed model's, for runs that follow it (:attr:`CalibrationRun.track_dense`), else ``None``.
    Block tuning without ``"dense_cross"`` only keeps the batches it takes its tuning samples from.
    """

    hidden: list[torch.Tensor]
    dense_hidden: list[torch.Tensor] | None = None


def entry_state(
    run: CalibrationRun, hidden: list[torch.Tensor], rows: list[int], dense_hidden: list[torch.Tensor] | None = None
) -> CalibrationState:
    """The state entering the first block, from the hidden states captured for it (:func:`.blocks.capture_block_inputs`).

    ``rows``: the samples of each batch (``BlockInputs.rows``); ``dense_hidden``: what the uncompressed model
    feeds the first block when it differs from ``hidden`` (modules before the blocks were compressed).
    """
    if not run.track_dense:
        return CalibrationState(list(hidden))
    dense = list(hidden if dense_hidden is None else dense_hidden)
    if run.tune is not None and not run.use_dense:  # tuning targets are needed for the first tune.samples windows only
        dense = dense[: _batches_covering(rows, run.tune.samples)]
    return CalibrationState(list(hidden), dense)


def _check_step(run: CalibrationRun, block_inputs: BlockInputs, index: int, names: list[str], state: CalibrationState) -> None:
    """Refuse a step whose arguments do not fit together, naming the argument, its value and the fix."""
    if not state.hidden or len(state.hidden) != len(block_inputs.args[index]):
        raise ValueError(
            f"state.hidden holds {len(state.hidden)} batches but block_inputs recorded {len(block_inputs.args[index])} "
            f"for block {index}; pass the state entry_state() or the previous calibrate_block() returned."
        )
    if run.track_dense and state.dense_hidden is None:
        raise ValueError(
            f"state.dense_hidden=None, but method={run.method.name!r} follows the dense model's hidden states; "
            "build the first state with entry_state(run, hidden, rows) and pass on the state calibrate_block() returns."
        )
    unknown = [n for n in names if n not in run.plan]
    if unknown:
        raise ValueError(f"names={unknown[:3]!r} are not in run.plan; pass the modules of run.plan inside block {index}.")


def _forward_all(
    block_inputs: BlockInputs, block: nn.Module, index: int, hidden: list[torch.Tensor], keep: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """The block's output for every batch, each handed to ``keep`` as soon as it is computed."""
    return [keep(block_inputs.call(block, index, b, h)) for b, h in enumerate(hidden)]


def _compress_stages(
    run: CalibrationRun, block_inputs: BlockInputs, block: nn.Module, index: int, names: list[str],
    state: CalibrationState, keep: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[dict[str, CompressedModule], list[torch.Tensor]]:
    """Compress the block's modules stage by stage; also the dense block's outputs when the method reads dense inputs."""
    stages = _stages(run.model, block_inputs, block, index, names, state.hidden[0]) if run.true_sequential else [names]
    twins: dict[str, CompressedModule] = {}
    dense_out: list[torch.Tensor] = []
    dense_hidden = state.dense_hidden if run.use_dense else None
    for stage in stages:
        record = (lambda t: dense_out.append(keep(t))) if stage is stages[0] else None
        collector = _stage_statistics(run, twins, stage, block_inputs, block, index, state.hidden, dense_hidden, record)
        twins.update(run.compress_modules(stage, collector))
        del collector
    return twins, dense_out


def _tuned(
    run: CalibrationRun, block_inputs: BlockInputs, block: nn.Module, index: int, names: list[str], state: CalibrationState,
    twins: dict[str, CompressedModule], dense_out: list[torch.Tensor], keep: Callable[[torch.Tensor], torch.Tensor], progress: Any,
) -> list[torch.Tensor]:
    """Tune the block against the dense block's outputs; returns those outputs (the next block's dense hidden states)."""
    if not run.use_dense:  # the dense block's outputs: the tuning targets
        with run.originals(names):
            dense_out = _forward_all(block_inputs, block, index, state.dense_hidden, keep)
    _tune_block(run, block, index, block_inputs, state.hidden, dense_out, twins, progress)
    return dense_out


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def calibrate_block(
    run: CalibrationRun,
    block_inputs: BlockInputs,
    block: nn.Module,
    index: int,
    names: list[str],
    state: CalibrationState,
    *,
    store: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Any = None,
) -> CalibrationState:
    """Compress the modules ``names`` of block ``index`` in place; returns the state entering the next block.

    Args:
        run: the run the block belongs to; ``block`` must be ``run.model``'s block number ``index``.
        block_inputs: what the blocks receive besides their hidden states, per batch
            (:func:`.blocks.capture_block_inputs`).
        block: the block; accelerate-offloaded weights are onloaded for the step.
        index: the block's position in the model's block list.
        names: the modules of ``run.plan`` inside the block, as ``run.model`` names them; with none the
            block only runs, to move the hidden states on.
        state: the hidden states entering the block (:func:`entry_state` for the first block, then what
            the previous step returned).
        store: called on every hidden state the step produces, as soon as it is computed; what it returns
            is kept instead (e.g. a memory-mapped copy). Default: kept as is.
        progress: a tqdm bar on which block tuning shows its loss, or ``None``.

    The statistics pass, the compression, block tuning and the re-run of the compressed block are those of
    :func:`~.pipeline.run_calibration`, which calls this step for every block. The compressed modules'
    dense originals go to ``run.replaced``; their measurements to ``run.results``.
    """
    _check_step(run, block_inputs, index, names, state)
    keep = _unchanged if store is None else store
    with onloaded(block):
        own_aligned_storage(block)
        if not names:
            hidden = _forward_all(block_inputs, block, index, state.hidden, keep)
            dense = _forward_all(block_inputs, block, index, state.dense_hidden, keep) if run.track_dense else None
            return CalibrationState(hidden, dense)
        twins, dense_out = _compress_stages(run, block_inputs, block, index, names, state, keep)
        if run.tune is not None:
            dense_out = _tuned(run, block_inputs, block, index, names, state, twins, dense_out, keep, progress)
        with _decoded_stand_ins(run.model, run.replaced, twins):
            hidden = _forward_all(block_inputs, block, index, state.hidden, keep)
    return CalibrationState(hidden, dense_out if run.track_dense else None)
