"""``dequant_cache``: decode the weight once and keep it dense (decode-once).

The fastest path for prefill and for formats no integer kernel serves (unquantized sparse values,
``group_size`` not a multiple of 32), at the price of the dense weight's memory next to the stored tensors.
The cache holds one dtype, the one of the first input (or the ``dtype`` given to
:func:`hfcompress.set_inference_path`); an input of another dtype re-decodes. It is the reference weight,
so the result equals the reference path's bit for bit, and gradients flow to the input (adapters train on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import InferencePath, Prepared, register_path


@register_path
class DequantCachePath(InferencePath):
    name = "dequant_cache"
    description = "decode once and keep the dense weight (decode-once; fastest prefill, dense memory)"

    def unsupported(self, module: nn.Module, device: torch.device) -> str | None:
        return None

    def prepare(
        self, module: nn.Module, device: torch.device, release: bool = True, dtype: torch.dtype | None = None
    ) -> Prepared:
        cache: dict[torch.dtype, torch.Tensor] = {}

        def dense_weight(dt: torch.dtype) -> torch.Tensor:
            w = cache.get(dt)
            if w is None:
                cache.clear()  # one dtype at a time: memory stays one dense copy
                w = cache[dt] = module.dequantize_weight(dt).detach()
            return w

        run = None
        if isinstance(module, nn.Module) and hasattr(module, "in_features"):

            def run(x: torch.Tensor) -> torch.Tensor:
                return F.linear(x, dense_weight(x.dtype), module.bias)

        prepared = Prepared(self.name, device, run, dense_weight=dense_weight, differentiable=True)
        prepared.cache = cache
        if dtype is not None:
            dense_weight(dtype)
        return prepared
