"""Registry of compression methods (the ``method=`` of :class:`~hfcompress.HfCompressConfig`).

A method is either *data-free* (it compresses one weight on its own, so it runs while
``from_pretrained`` loads the checkpoint) or *calibrated* (it needs activations and runs through
:func:`hfcompress.oneshot`). Data-free methods provide ``compress(weight2d, spec) -> CompressedWeight``.

Calibrated methods set ``data_free=False`` and provide
``compress_layer(weight2d, stats, spec, method_args) -> CompressedWeight``:

* ``weight2d``: the dense weight as float32 ``[rows, cols]`` (a copy the method may modify);
* ``stats``: a :class:`~hfcompress.calibration.stats.LayerStats` holding only what ``needs`` asks for
  (``"hessian"``: ``2/n * sum x x^T`` over the ``n`` calibration tokens, ``[cols, cols]`` float32;
  ``"act_sq"``: ``sum x**2`` per input feature, ``[cols]`` float32; ``"dense_cross"``: ``2/n * sum xd x^T``
  with ``xd`` the input of the uncompressed model, for methods that target the dense model's output,
  implies the Hessian and costs one extra block pass). Stats may be shared between modules
  that read the same input (q/k/v projections), so a method must not modify them in place;
* ``spec``: the :class:`~hfcompress.spec.LayerSpec` of this module (a per-layer override may differ from
  the config's defaults, e.g. OWL's non-uniform sparsity);
* ``method_args``: ``config.method_args`` (a dict).

Every method validates its ``method_args`` when the config is built: ``Method.check_args`` (``method_args ->
None``, raising ``ValueError``/``TypeError`` naming the key) runs in ``HfCompressConfig.post_init``, so a typo
fails before any model is touched. A method registered without ``check_args`` takes no arguments: any key is
refused.

The calibration pipeline (:mod:`hfcompress.calibration.pipeline`) collects the statistics block by
block, calls ``compress_layer`` for each targeted module and installs the result. A method that also
sets ``tune_options`` (``method_args -> BlockTuneOptions``) has each block's quantization scales tuned
afterwards on the block output against the dense model (:mod:`hfcompress.algorithms.blocktune`).
"""

from .base import METHODS, STAT_KINDS, Method, available_methods, get_method, register_method

__all__ = ["METHODS", "STAT_KINDS", "Method", "available_methods", "get_method", "register_method"]
