"""The layer-by-layer calibration pipeline behind :func:`hfcompress.oneshot`.

Contract with calibrated methods (see :mod:`hfcompress.algorithms`): a method declares the statistics it
``needs`` (``"hessian"``, ``"act_sq"``, ``"dense_cross"``; see :mod:`.stats`) and a
``compress_layer(weight2d, stats, spec, method_args)`` that returns a
:class:`~hfcompress.formats.base.CompressedWeight`. The pipeline

1. finds the model's block list (:func:`~hfcompress.calibration.blocks.find_blocks`) and records what
   the blocks receive for every calibration batch, running only the layers before the first block;
2. for each block, in order: onloads it (accelerate offloading), runs it on the current hidden states
   with forward pre-hooks collecting exactly the statistics the method needs for the targeted modules
   inside the block, calls ``compress_layer`` for each of them (on the dense float32 weight and the
   module's :class:`~hfcompress.spec.LayerSpec`), installs the result as a compressed twin
   (:func:`~hfcompress.modules.compressed_twin` + ``set_compressed_weight``), then re-runs the block with
   the compressed weights to produce the next block's inputs, so quantization errors propagate as in
   GPTQ's sequential mode. Statistics passes stop right after the last hooked module; re-runs compute
   with each compressed weight decoded once (the original module holds it meanwhile), which is exactly
   the reference arithmetic of the compressed modules. For ``"dense_cross"`` the block also runs on the
   uncompressed model's hidden states, which the pipeline carries along. ``true_sequential=True`` additionally calibrates the modules *inside* a block
   in the order they run (q/k/v, then o, then gate/up, then down), each on inputs produced by the
   already-compressed modules before it; it costs one extra block pass per stage;
3. targeted modules outside the blocks are calibrated as well: those running before the first block
   during input capture, the rest (e.g. a BERT pooler) with one final forward of the whole model;
4. records per module the relative output error ``|dW X|^2 / |W X|^2`` on the calibration inputs
   (logged at INFO level and returned).

Memory stays near one block's activations plus the calibration hidden states: statistics are freed
after each module is compressed and hidden states are replaced block by block. The dense modules that
were replaced are kept until the end so that an exception restores the model exactly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import Method
from ..algorithms.blocktune import BlockTuneOptions, BlockTuneResult, tune_block_scales
from ..formats.base import CompressedWeight
from ..modules import CompressedModule, compressed_twin, set_submodule
from ..spec import LayerSpec
from .blocks import BlockInputs, capture_block_inputs, find_blocks, first_tensor, model_call_kwargs
from .memory import trim_heap
from .stats import InputRecorder, LayerStats, StatsCollector, StopPass, SumsReducer

logger = logging.getLogger("hfcompress.calibration")

__all__ = ["LayerResult", "run_calibration", "relative_output_error"]


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
    model: nn.Module,
    block: nn.Module,
    index: int,
    block_inputs: BlockInputs,
    hidden: list[torch.Tensor],
    targets: list[torch.Tensor],
    run: "_Run",
    twins: dict[str, CompressedModule],
    options: BlockTuneOptions,
    progress: Any,
) -> BlockTuneResult | None:
    """Tune the scales of the block's quantized weights on its output (see :mod:`~hfcompress.algorithms.blocktune`)."""
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
    with _with_originals(model, run.replaced, names):
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
    progress.set_postfix(tune=f"{result.loss_before:.3g}->{result.loss_after:.3g}", refresh=False)
    return result


# ---------------------------------------------------------------------- the pipeline
class _Run:
    def __init__(
        self,
        model: nn.Module,
        plan: dict[str, LayerSpec],
        method: Method,
        method_args: dict[str, Any],
        show_progress: bool,
    ) -> None:
        self.model = model
        self.plan = plan
        self.method = method
        self.method_args = dict(method_args)
        self.show_progress = show_progress
        self.results: dict[str, LayerResult] = {}
        self.replaced: dict[str, nn.Module] = {}  # name -> original dense module (for rollback)
        #: block tuning only (else ``None``): the grids of the current block's quantized (not pruned) weights
        self.quantized: dict[str, Any] | None = None

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
        for name, dense in self.replaced.items():
            set_submodule(self.model, name, dense)
        self.replaced.clear()


@contextlib.contextmanager
def _with_originals(model: nn.Module, replaced: dict[str, nn.Module], names: list[str]) -> Iterator[None]:
    """Temporarily put the original dense modules back for ``names`` that were already compressed."""
    swapped = {n: model.get_submodule(n) for n in names if n in replaced}
    for n in swapped:
        set_submodule(model, n, replaced[n])
    try:
        yield
    finally:
        for n, twin in swapped.items():
            set_submodule(model, n, twin)


def _pre_needs(needs: frozenset[str]) -> frozenset[str]:
    return (needs - {"dense_cross"}) | ({"hessian"} if "dense_cross" in needs else set())


class _CrossFromHessian:
    """Statistics of modules whose compressed-model and dense-model inputs are the same (``G = H``)."""

    def __init__(self, collector: StatsCollector) -> None:
        self._collector = collector

    def stats(self, name: str) -> LayerStats:
        s = self._collector.stats(name)
        s.dense_cross = s.hessian.clone() if s.hessian is not None else None
        return s

    def nsamples(self, name: str) -> int:
        return self._collector.nsamples(name)

    def release(self, name: str) -> None:
        self._collector.release(name)


def _check_result(name: str, cw: Any, shape: tuple[int, int]) -> None:
    if not isinstance(cw, CompressedWeight):
        raise TypeError(f"compress_layer returned {type(cw).__name__} for {name}; it must return a CompressedWeight.")
    if tuple(cw.weight.shape) != shape:
        raise ValueError(f"compress_layer returned a weight of shape {tuple(cw.weight.shape)} for {name}, expected {shape}.")
    if not torch.isfinite(cw.weight).all():
        raise FloatingPointError(f"compress_layer produced non-finite weights for {name}.")


def _stages(
    blocks_in: BlockInputs, block: nn.Module, index: int, names: list[str], prefix: str
) -> list[list[str]]:
    """Targeted modules of a block grouped by shared input, in the order the block calls them."""
    # The inputs themselves are kept (not their id()): a freed tensor's address can be reused by the next
    # one, which made unrelated modules look like they shared an input (o_proj grouped with gate/up) at random.
    order: list[tuple[str, object]] = []
    modules = {n: block.get_submodule(n[len(prefix) :]) for n in names}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, _name=name):
            order.append((_name, args[0] if args else None))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        blocks_in.call(block, index, 0, blocks_in.hidden[0])
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
    model: nn.Module, run: _Run, twins: dict[str, CompressedModule], stage: list[str], needs, reduce,
    block_inputs, block: nn.Module, i: int, hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor] | None,
    dense_out: list[torch.Tensor] | None,
) -> StatsCollector:
    """The statistics of one stage's modules over the calibration windows (the block runs up to the last of them).

    With ``dense_hidden`` (methods aiming at the dense model's outputs) each window also runs through the dense
    block first, recording the modules' dense inputs as the collector's reference; ``dense_out``, when given,
    receives the dense block's outputs.
    """
    modules = {n: model.get_submodule(n) for n in stage}
    with StatsCollector(modules, needs, reduce) as collector, _decoded_stand_ins(model, run.replaced, twins) as stand_ins:
        collector.stop_early = True  # the block's output is not needed in this pass
        for b, h in enumerate(hidden):
            if dense_hidden is not None:
                collector.active = False
                with stand_ins.dense(), InputRecorder(modules) as rec:
                    out = block_inputs.call(block, i, b, dense_hidden[b])
                if dense_out is not None:
                    dense_out.append(out)
                collector.reference, collector.active = rec.inputs, True
            collector.start_pass()
            try:
                block_inputs.call(block, i, b, h)
            except StopPass:
                pass
            collector.end_pass()
            collector.reference = {}
    return collector


def _compress_late(model: nn.Module, run: _Run, late: list[str], batches, needs, reduce, use_dense: bool) -> None:
    """Compress the modules after the blocks (poolers, heads) from full forwards of the model."""
    modules = {n: model.get_submodule(n) for n in late}
    extra = model_call_kwargs(model)
    with StatsCollector(modules, needs, reduce) as collector:
        for batch in batches:
            if use_dense:
                collector.active = False
                with _with_originals(model, run.replaced, list(run.replaced)), InputRecorder(modules) as rec:
                    model(**batch, **extra)
                collector.reference, collector.active = rec.inputs, True
            model(**batch, **extra)
            collector.reference = {}
    run.compress_modules(late, collector)


def run_calibration(
    model: nn.Module,
    plan: dict[str, LayerSpec],
    method: Method,
    method_args: dict[str, Any],
    batches: list[dict[str, torch.Tensor]],
    blocks: str | None = None,
    true_sequential: bool = False,
    show_progress: bool = True,
    reduce: SumsReducer | None = None,
) -> dict[str, LayerResult]:
    """Compress the modules of ``plan`` in place with the calibrated ``method`` (see module docstring).

    ``reduce`` is handed to every :class:`~.stats.StatsCollector` of the run: it combines each module's
    float64 sums before the method sees them (e.g. :func:`hfcompress.distributed.all_reduce_sums` under
    data-parallel calibration). Without it, the collectors use the one set by :func:`.stats.reducing`, if any.

    On an exception every replaced module is put back, so the model is left as it was.
    """
    if method.compress_layer is None:
        raise ValueError(f"method={method.name!r} is data-free; use hfcompress.compress(model, config) instead.")
    if not batches:
        raise ValueError("The calibration set is empty; pass at least one sample.")
    blocks_name, block_list = find_blocks(model, blocks)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(block_list))]
    per_block: list[list[str]] = [[n for n in plan if n.startswith(p)] for p in prefixes]
    inside = {n for names in per_block for n in names}
    outside = [n for n in plan if n not in inside]
    needs = method.needs
    use_dense = "dense_cross" in needs
    tune: BlockTuneOptions | None = method.tune_options(method_args) if method.tune_options is not None else None
    track_dense = use_dense or tune is not None  # the dense model's hidden states are followed block by block
    run = _Run(model, plan, method, method_args, show_progress)
    if tune is not None:
        run.quantized = {}
    was_training = model.training
    model.eval()
    try:
        outside_modules = {n: model.get_submodule(n) for n in outside}
        with StatsCollector(outside_modules, _pre_needs(needs), reduce) as pre_collector:
            block_inputs = capture_block_inputs(model, block_list, batches)
        first_hidden = block_inputs.hidden  # what the uncompressed model feeds block 0
        early = [n for n in outside if pre_collector.nsamples(n) > 0]
        if early:  # modules before the first block (embeddings projections...): compress, then re-capture
            pre_stats = pre_collector
            if use_dense:  # before the first block the compressed and dense inputs coincide
                pre_stats = _CrossFromHessian(pre_collector)
            run.compress_modules(early, pre_stats)
            del pre_stats
            block_inputs = capture_block_inputs(model, block_list, batches)
        del pre_collector
        hidden = block_inputs.hidden
        block_inputs.hidden = []
        # methods aiming at the dense model's outputs follow the uncompressed model too
        dense_hidden = list(first_hidden) if track_dense else None
        if tune is not None and not use_dense:  # tuning targets are needed for the first tune.samples windows only
            dense_hidden = dense_hidden[: _batches_covering(block_inputs.rows, tune.samples)]
        del first_hidden
        with tqdm(total=len(block_list), desc=f"oneshot {method.name}", disable=not show_progress, unit="block") as progress:  # closed on errors too: no redraw under the error report
            for i, block in enumerate(block_list):
                names = per_block[i]
                with onloaded(block):
                    own_aligned_storage(block)
                    if names:
                        block_inputs.hidden = hidden
                        stages = _stages(block_inputs, block, i, names, prefixes[i]) if true_sequential else [names]
                        block_inputs.hidden = []
                        twins: dict[str, CompressedModule] = {}
                        next_dense: list[torch.Tensor] = []
                        for stage in stages:
                            dense_out = next_dense if stage is stages[0] else None
                            collector = _stage_statistics(model, run, twins, stage, needs, reduce, block_inputs, block, i, hidden, dense_hidden if use_dense else None, dense_out)
                            twins.update(run.compress_modules(stage, collector))
                            del collector
                        if tune is not None:
                            if not use_dense:  # the dense block's outputs: the tuning targets
                                with _with_originals(model, run.replaced, names):
                                    next_dense = [block_inputs.call(block, i, b, h) for b, h in enumerate(dense_hidden)]
                            _tune_block(model, block, i, block_inputs, hidden, next_dense, run, twins, tune, progress)
                        with _decoded_stand_ins(model, run.replaced, twins):
                            hidden = [block_inputs.call(block, i, b, h) for b, h in enumerate(hidden)]
                        if track_dense:
                            dense_hidden = next_dense
                    else:
                        hidden = [block_inputs.call(block, i, b, h) for b, h in enumerate(hidden)]
                        if track_dense:
                            dense_hidden = [block_inputs.call(block, i, b, h) for b, h in enumerate(dense_hidden)]
                progress.update(1)
        del hidden, dense_hidden
        late = [n for n in outside if n not in run.results]
        if late:  # modules after the blocks (poolers, heads that are not ignored)
            _compress_late(model, run, late, batches, needs, reduce, use_dense)
    except BaseException:
        run.rollback()
        raise
    finally:
        model.train(was_training)
    run.replaced.clear()
    return run.results


__all__ += ["first_tensor", "onloaded", "own_aligned_storage"]
