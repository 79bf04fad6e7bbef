"""``reference``: decode the weight on every call, then the dense op (the modules' own code; decode-on-use).

Serves every compressed module on every device, keeps nothing but the stored tensors in memory, and is the
numerical reference every other path is measured against. For sparse formats with unquantized values and for
layers no kernel fits, this is the memory-lean choice (``prefer="memory"``).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import InferencePath, Prepared, register_path


@register_path
class ReferencePath(InferencePath):
    name = "reference"
    description = "decode the stored tensors on every call, then the dense op (decode-on-use; least memory)"

    def unsupported(self, module: nn.Module, device: torch.device) -> str | None:
        return None

    def prepare(
        self, module: nn.Module, device: torch.device, release: bool = True, dtype: torch.dtype | None = None
    ) -> Prepared:
        return Prepared(self.name, device, None, differentiable=True)
