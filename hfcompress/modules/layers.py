"""Compressed twins of ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``.

Each forward asks :mod:`hfcompress.kernels` for its prepared inference path (an integer kernel, a decode-once
cache) and otherwise decodes the weight for the call, the reference decode-then-compute path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import LayerSpec
from .base import CompressedModule


def _copy_bias(dst: nn.Module, src: nn.Module) -> None:
    bias = getattr(src, "bias", None)
    dst.register_parameter("bias", None if bias is None else nn.Parameter(bias.data, requires_grad=bias.requires_grad))


class CompressedLinear(CompressedModule, nn.Linear):
    """An ``nn.Linear`` whose weight is stored compressed (``isinstance(m, nn.Linear)`` holds, so code that
    looks for Linear layers, PEFT's among them, finds it; ``weight`` is the decoded dense weight)."""

    dense_cls = nn.Linear
    #: transformers' weight initialisation (``_init_weights``, which knows ``nn.Linear``) skips it: the weight is
    #: the stored one, and decoding it only to draw into the decoded copy would cost a decode per layer at load
    _is_hf_initialized = True

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec, **factory) -> None:
        super().__init__(spec, (out_features, in_features))
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)

    @classmethod
    def from_dense(cls, module: nn.Linear, spec: LayerSpec) -> "CompressedLinear":
        new = cls(module.in_features, module.out_features, False, spec)
        _copy_bias(new, module)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._inference(x)
        if fast is not None and fast.run is not None:
            return fast.run(x)
        return F.linear(x, self._compute_weight(x.dtype, fast), self.bias)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the weight is the stored compressed one (``nn.Linear``'s would draw a new bias)."""


class CompressedConv2d(CompressedModule):
    """Conv2d whose ``[out, in/groups, kh, kw]`` weight is compressed as ``[out, in/groups*kh*kw]`` rows:
    scales and sparsity run along each output filter, so grouped and depthwise convolutions work unchanged."""

    dense_cls = nn.Conv2d

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec) -> None:
        super().__init__(spec, tuple(conv.weight.shape))
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            setattr(self, attr, getattr(conv, attr))
        self._reversed_padding_repeated_twice = getattr(conv, "_reversed_padding_repeated_twice", None)
        _copy_bias(self, conv)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, spec: LayerSpec) -> "CompressedConv2d":
        return cls(module, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._compute_weight(x.dtype, self._inference(x))
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CompressedEmbedding(CompressedModule):
    """Embedding compressed row by row; a lookup decodes the whole table once per call."""

    dense_cls = nn.Embedding

    def __init__(self, emb: nn.Embedding, spec: LayerSpec) -> None:
        super().__init__(spec, (emb.num_embeddings, emb.embedding_dim))
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(emb, attr))
        self.register_parameter("bias", None)
        self._out_dtype = emb.weight.dtype if emb.weight.is_floating_point() else torch.float32

    @classmethod
    def from_dense(cls, module: nn.Embedding, spec: LayerSpec) -> "CompressedEmbedding":
        return cls(module, spec)

    def _dense_dtype(self) -> torch.dtype:
        return self._out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fast = self._inference(ids)
        if fast is not None and fast.run is not None:
            return fast.run(ids)
        return F.embedding(ids, self._compute_weight(self._out_dtype, fast), self.padding_idx)
