"""Calibration: data, per-layer statistics and the layer-by-layer pipeline of calibrated methods.

* :mod:`.data`: calibration text/inputs from ``datasets``, local files, strings (default: offline
  Wikipedia summaries), cut into ``num_samples`` windows of ``seq_len`` tokens by seed.
* :mod:`.stats`: :class:`LayerStats` (Hessian ``2/n sum x x^T``, ``act_sq = sum x^2``, ``nsamples``) and
  the forward hooks collecting them (Linear, Conv2d via unfold); ``reduce=``/:func:`reducing` combine each
  module's float64 sums (:class:`LayerSums`) before normalisation, e.g. over processes.
* :mod:`.blocks`: finding the block list and capturing what each block receives.
* :mod:`.pipeline`: :func:`~hfcompress.calibration.pipeline.run_calibration`, used by :func:`hfcompress.oneshot`,
  and :mod:`.step`: :func:`~hfcompress.calibration.step.calibrate_block`, the per-block step it repeats and
  streaming calls directly (a layer above the others: they run the methods on the compressed modules, so
  this package's namespace does not import them).

Writing a calibrated method: register a :class:`hfcompress.algorithms.Method` with ``data_free=False``,
``needs`` (a subset of ``{"hessian", "act_sq"}``) and ``compress_layer(weight2d, stats, spec, method_args)
-> CompressedWeight``; ``oneshot`` does the rest (see :mod:`.pipeline` for the exact contract).
"""

from .data import calibration_batches, iter_texts, text_windows, wikipedia_summaries
from .stats import LayerStats, LayerSums, StatsCollector, SumsReducer, identity_stats, layer_inputs_2d, reducing

__all__ = [
    "LayerStats",
    "LayerSums",
    "StatsCollector",
    "SumsReducer",
    "calibration_batches",
    "identity_stats",
    "iter_texts",
    "layer_inputs_2d",
    "reducing",
    "text_windows",
    "wikipedia_summaries",
]
