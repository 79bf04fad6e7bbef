"""``magnitude``: data-free pruning of the smallest ``|w|``, optionally followed by round-to-nearest.

Layer-wise by default: the ``round(sparsity * numel)`` smallest weights of each matrix are pruned
(N:M: the ``M - N`` smallest of every ``M`` consecutive inputs). Global magnitude (one threshold over all
layers) and LAMP are per-layer allocations (:mod:`hfcompress.sparsity.allocation`,
``method_args={"allocation": "global"}`` or ``"lamp"``) that set each layer's sparsity before this
layer-wise step. Needing no data, it also runs inside ``from_pretrained(..., quantization_config=...)``.
"""

from __future__ import annotations

import torch

from ..formats.base import CompressedWeight
from ..sparsity.prune import mask_for_spec, masked_weight, method_options
from ..spec import LayerSpec
from . import Method, register_method


def magnitude_compress(weight: torch.Tensor, spec: LayerSpec) -> CompressedWeight:
    """Prune ``weight[rows, cols]`` by magnitude to ``spec``'s sparsity/pattern, then quantize if ``spec.bits``."""
    weight = weight.float()
    keep = mask_for_spec(weight.abs(), spec, per_row=False)
    return masked_weight(weight, keep, spec)


register_method(
    Method(
        name="magnitude",
        data_free=True,
        quantizes=True,
        prunes=True,
        description="Magnitude pruning (layer-wise; global/LAMP through allocation), unstructured or N:M, "
        "optionally followed by RTN; needs no data, runs during from_pretrained.",
        compress=magnitude_compress,
        check_args=lambda args: method_options("magnitude", args, {}),
    )
)
