"""The layer-by-layer calibration pipeline behind :func:`hfcompress.oneshot`.

Contract with calibrated methods (see :mod:`hfcompress.algorithms`): a method declares the statistics it
``needs`` (``"hessian"``, ``"act_sq"``, ``"dense_cross"``; see :mod:`.stats`) and a
``compress_layer(weight2d, stats, spec, method_args)`` that returns a
:class:`~hfcompress.formats.base.CompressedWeight`. The pipeline

1. finds the model's block list (:func:`~hfcompress.calibration.blocks.find_blocks`) and records what
   the blocks receive for every calibration batch, running only the layers before the first block;
2. for each block, in order, the public per-block step :func:`~hfcompress.calibration.step.calibrate_block`
   (which streaming calls too): onloads it (accelerate offloading), runs it on the current hidden states
   with forward pre-hooks collecting exactly the statistics the method needs for the targeted modules
   inside the block, calls ``compress_layer`` for each of them (on the dense float32 weight and the
   module's :class:`~hfcompress.spec.LayerSpec`), installs the result as a compressed twin
   (:func:`~hfcompress.modules.compressed_twin` + ``set_compressed_weight``), then re-runs the block with
   the compressed weights to produce the next block's inputs, so quantization errors propagate as in
   GPTQ's sequential mode. Statistics passes stop right after the last hooked module; re-runs compute
   with each compressed weight decoded once (the original module holds it meanwhile), which is exactly
   the reference arithmetic of the compressed modules. For ``"dense_cross"`` and block tuning the block also runs on
   the uncompressed model's hidden states, which the pipeline carries along
   (:class:`~hfcompress.calibration.step.CalibrationState`). ``true_sequential=True`` additionally calibrates the modules *inside* a block
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

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import Method
from ..spec import LayerSpec
from .blocks import BlockInputs, capture_block_inputs, find_blocks, first_tensor, model_call_kwargs
from .stats import InputRecorder, LayerStats, StatsCollector, SumsReducer
from .step import (
    CalibrationRun,
    CalibrationState,
    LayerResult,
    calibrate_block,
    entry_state,
    onloaded,
    own_aligned_storage,
    relative_output_error,
)

__all__ = ["LayerResult", "run_calibration", "relative_output_error"]


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



def _compress_late(model: nn.Module, run: CalibrationRun, late: list[str], batches) -> None:
    """Compress the modules after the blocks (poolers, heads) from full forwards of the model."""
    modules = {n: model.get_submodule(n) for n in late}
    extra = model_call_kwargs(model)
    with StatsCollector(modules, run.needs, run.reduce) as collector:
        for batch in batches:
            if run.use_dense:
                collector.active = False
                with run.originals(list(run.replaced)), InputRecorder(modules) as rec:
                    model(**batch, **extra)
                collector.reference, collector.active = rec.inputs, True
            model(**batch, **extra)
            collector.reference = {}
    run.compress_modules(late, collector)


def _enter_blocks(
    run: CalibrationRun, block_list: nn.ModuleList, batches: list[dict[str, torch.Tensor]], outside: list[str]
) -> tuple[BlockInputs, CalibrationState]:
    """Capture what the blocks receive; modules running before the first block are compressed on the way."""
    model = run.model
    outside_modules = {n: model.get_submodule(n) for n in outside}
    with StatsCollector(outside_modules, _pre_needs(run.needs), run.reduce) as pre_collector:
        block_inputs = capture_block_inputs(model, block_list, batches)
    first_hidden = block_inputs.hidden  # what the uncompressed model feeds block 0
    early = [n for n in outside if pre_collector.nsamples(n) > 0]
    if early:  # modules before the first block (embeddings projections...): compress, then re-capture
        pre_stats = pre_collector
        if run.use_dense:  # before the first block the compressed and dense inputs coincide
            pre_stats = _CrossFromHessian(pre_collector)
        run.compress_modules(early, pre_stats)
        del pre_stats
        block_inputs = capture_block_inputs(model, block_list, batches)
    del pre_collector
    hidden = block_inputs.hidden
    block_inputs.hidden = []
    return block_inputs, entry_state(run, hidden, block_inputs.rows, first_hidden)


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
    run = CalibrationRun(model, plan, method, method_args, reduce=reduce, true_sequential=true_sequential)
    if not batches:
        raise ValueError("The calibration set is empty; pass at least one sample.")
    blocks_name, block_list = find_blocks(model, blocks)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(block_list))]
    per_block: list[list[str]] = [[n for n in plan if n.startswith(p)] for p in prefixes]
    inside = {n for names in per_block for n in names}
    outside = [n for n in plan if n not in inside]
    was_training = model.training
    model.eval()
    try:
        block_inputs, state = _enter_blocks(run, block_list, batches, outside)
        with tqdm(total=len(block_list), desc=f"oneshot {method.name}", disable=not show_progress, unit="block") as progress:  # closed on errors too: no redraw under the error report
            for i, block in enumerate(block_list):
                state = calibrate_block(run, block_inputs, block, i, per_block[i], state, progress=progress)
                progress.update(1)
        del state
        late = [n for n in outside if n not in run.results]
        if late:  # modules after the blocks (poolers, heads that are not ignored)
            _compress_late(model, run, late, batches)
    except BaseException:
        run.rollback()
        raise
    finally:
        model.train(was_training)
    run.commit()
    return run.results


__all__ += ["first_tensor", "onloaded", "own_aligned_storage"]
