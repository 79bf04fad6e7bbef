"""A PEFT LoRA layer for :class:`~hfcompress.modules.CompressedLinear`, plugged in through PEFT's custom-module API.

PEFT lets a :class:`peft.LoraConfig` map a layer type it does not know to a user-provided LoRA layer
(``LoraConfig._register_custom_module``; its LoRA model dispatches on the mapping before its own
layer types). :func:`register_compressed_lora` adds ``CompressedLinear -> CompressedLoraLinear`` to a
config, after which ``peft.get_peft_model(compressed_model, config)`` wraps every targeted compressed
Linear. A config without the mapping gets the same layer (default policy) through :func:`adopt_peft_linear`.
Nothing inside PEFT is patched.

What the layer does:

* the compressed base stays packed and frozen (its tensors are buffers; PEFT freezes its bias); each
  forward decodes the weight and the gradient reaches the input through the decoded weight;
* **dense quantized bases**: plain LoRA, ``y = base(x) + s * B A x``;
* **sparse bases** (SQFT's SparsePEFT / PST): the effective update is masked, ``ΔW = (s * B A) ⊙ M``
  with ``M`` the base's stored mask, and the forward uses ``W + ΔW`` directly. Merging then keeps the
  exact sparsity pattern, and the merged module computes what the adapter computed;
* **quantization-aware** (``quant_aware=True``, SQFT's QA-SparsePEFT): the forward uses
  ``Q_base(W + ΔW) ⊙ M``, ``Q_base`` rounding to the base's own grid with a straight-through gradient,
  so merging (which re-quantizes on that grid) reproduces the trained forward exactly.

Merging (``merge``/``merge_and_unload``) re-encodes the base in its own format (see
:mod:`hfcompress.peft.merge`) and records a :class:`~hfcompress.peft.merge.LayerMergeReport` in
``layer.merge_reports``; ``unmerge`` restores the exact pre-merge tensors.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..modules import CompressedLinear
from .masks import sparsity_mask
from .merge import GRIDS, LayerMergeReport, merge_into, project_to_base

__all__ = ["CompressedLoraLinear", "adopt_peft_linear", "check_lora_config", "compressed_lora_layer", "register_compressed_lora"]

#: LoraConfig.init_lora_weights values that never read or rewrite the base weight
_SAFE_INITS = (True, False, "gaussian")


class CompressedLoraLinear(nn.Module, LoraLayer):
    """LoRA around a :class:`~hfcompress.modules.CompressedLinear` (see the module docstring).

    Class attributes set the policy (use :func:`register_compressed_lora` to pick them):
    ``mask_update`` masks the update of sparse bases (default ``True``), ``quant_aware`` trains through
    the base's integer grid, ``merge_grid`` is the grid a merge into a quantized base uses (``"base"``
    or ``"refit"``).
    """

    mask_update: bool = True
    quant_aware: bool = False
    merge_grid: str = "base"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if not isinstance(base_layer, CompressedLinear):
            raise TypeError(f"CompressedLoraLinear wraps an hfcompress CompressedLinear, got {type(base_layer).__name__}.")
        _check_config(config, base_layer, self.quant_aware)
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._attach(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _attach(self, base_layer: CompressedLinear) -> None:
        """The layer's own state beside PEFT's: merge reports, the pre-merge tensors, the base's sparsity mask."""
        self.merge_reports: dict[str, LayerMergeReport] = {}
        self._premerge: dict[str, torch.Tensor] | None = None
        # the mask never changes (merges keep it), so it is cached as a non-persistent buffer
        self.register_buffer("sparsity_mask", sparsity_mask(base_layer), persistent=False)
        if getattr(base_layer, "_subclass_forward", False) and self._fused():
            raise ValueError(
                f"The compressed module is a {type(base_layer).__name__}, whose class computes its own forward; a masked "
                "or quantization-aware LoRA update (which computes with W + dW directly) would skip it. Leave this module "
                "out of target_modules, or use mask_update=False and quant_aware=False (hfcompress.peft.register_compressed_lora)."
            )

    # ------------------------------------------------------------------ PEFT hooks
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # without decoding the weight: the device of the compressed tensors, the dtype the base computes in
        tensors = list(base_layer.compressed_tensors().values())
        return (tensors[0].device if tensors else None), base_layer._dense_dtype()

    @property
    def lora_variants(self):
        return {(): None}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError:
            raise ValueError(
                "hfcompress's LoRA layer for compressed Linear modules supports plain LoRA; LoRA variants "
                "(use_dora, arrow, bdlora, aLoRA, VeLoRA, ...) are not supported on compressed bases. Leave them unset."
            ) from None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _check_config(config, self.get_base_layer(), self.quant_aware)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ------------------------------------------------------------------ the update
    @property
    def _masked(self) -> bool:
        return self.mask_update and self.sparsity_mask is not None

    def _fused(self) -> bool:
        """Whether the forward must build ``W + ΔW`` (a masked or quantization-aware update)."""
        return self._masked or self.quant_aware

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's effective update ``ΔW`` (float32 ``[out, in]``), masked for a sparse base."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        delta = (b @ a) * self.scaling[adapter]
        if self._masked:
            delta = delta * self.sparsity_mask.to(delta.device)
        return delta

    def effective_weight(self, adapters: list[str]) -> torch.Tensor:
        """The float32 weight the layer computes with when ``adapters`` are active (differentiable)."""
        base = self.get_base_layer()
        w = base.dequantize_weight(torch.float32)
        for adapter in adapters:
            w = w + self.get_delta_weight(adapter)
        if self.quant_aware:
            w = project_to_base(base, w, self.sparsity_mask, straight_through=True)
        return w

    # ------------------------------------------------------------------ forward
    def _lora_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if not adapters:
            return base(x, *args, **kwargs)
        if self._fused():
            if not all(isinstance(self.lora_dropout[a], nn.Identity) for a in adapters) and self.training:
                # dropout acts on the adapter's input only: base path and masked update computed apart
                out = base(x, *args, **kwargs)
                for a in adapters:
                    xd = self.lora_dropout[a](x)
                    out = out + F.linear(xd.to(torch.float32), self.get_delta_weight(a)).to(out.dtype)
                return out
            w = self.effective_weight(adapters)
            return F.linear(x, w.to(x.dtype), base.bias)
        out = base(x, *args, **kwargs)
        result_dtype = out.dtype
        for a in adapters:
            lora_a, lora_b = self.lora_A[a], self.lora_B[a]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            out = out + lora_b(lora_a(self.lora_dropout[a](xa))) * self.scaling[a]
        return out.to(result_dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.get_base_layer()(x, *args, **kwargs)
        if self.merged:
            return self.get_base_layer()(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        return self._lora_forward(x, active, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]}.")
        out = None
        for adapter in dict.fromkeys(adapter_names):
            rows = [i for i, a in enumerate(adapter_names) if a == adapter]
            active = [adapter] if adapter in self.lora_A else []  # "__base__" or unknown names: base only
            part = self._lora_forward(x[rows], active, *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the compressed base, in its own format (mask kept, codes on the base grid)."""
        adapter_names = [a for a in (check_adapters_to_merge(self, adapter_names) or []) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if self._premerge is None:
            self._premerge = {n: t.clone() for n, t in base.compressed_tensors().items()}
        with torch.no_grad():
            target = self.effective_weight(adapter_names).detach()
            if not self.mask_update and self.sparsity_mask is not None:
                # an unmasked update cannot be stored in a sparse base: merge_into keeps the mask and reports
                # the dropped part as error
                warnings.warn(
                    "Merging an unmasked LoRA update into a sparse base drops the update of the pruned weights; "
                    "train with mask_update=True (the default) for an exact, sparsity-preserving merge.",
                    stacklevel=2,
                )
        report = merge_into(
            base, target, adapters=adapter_names, grid=self.merge_grid, safe=safe_merge
        )
        for a in adapter_names:
            self.merge_reports[a] = report
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the exact compressed tensors the base had before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().set_compressed(self._premerge)
        self._premerge = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def check_lora_config(model: nn.Module, config: LoraConfig, quant_aware: bool = False) -> None:
    """Refuse, before PEFT changes anything, a config that a targeted compressed module of ``model`` cannot take.

    PEFT wraps the targets one by one, so an error raised at a compressed module would leave the modules it
    reached earlier already wrapped (a dense one even rewritten, with ``init_lora_weights="pissa"``).
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        targeted = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    else:
        targeted = [m for n, m in model.named_modules() if isinstance(m, CompressedLinear) and check_target_module_exists(config, n)]
    for module in targeted[:1]:  # the settings checked do not depend on the module
        _check_config(config, module, quant_aware)


def _check_config(config: LoraConfig, base: nn.Module, quant_aware: bool) -> None:
    if config.lora_bias:
        raise ValueError("lora_bias=True is not supported on compressed bases; set LoraConfig(lora_bias=False).")
    if config.fan_in_fan_out:
        raise ValueError("fan_in_fan_out=True does not apply to compressed Linear modules ([out, in] weights); set it to False.")
    if config.init_lora_weights not in _SAFE_INITS:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} reads or rewrites the base weight, which is compressed "
            f"and frozen here; use one of {_SAFE_INITS}."
        )
    if quant_aware and base.spec.quantized and config.lora_dropout:
        raise ValueError(
            f"lora_dropout={config.lora_dropout} cannot be combined with quant_aware=True (the rounding acts on the whole "
            "weight, so the adapter's input cannot be dropped out separately); set lora_dropout=0."
        )


def adopt_peft_linear(layer: nn.Module, base_layer: CompressedLinear) -> None:
    """Turn PEFT's own ``lora.Linear``, at the moment it receives a compressed Linear as its base, into a
    :class:`CompressedLoraLinear` (the default policy).

    Called by hfcompress's module-registration hook (:func:`hfcompress.bindings.install_model_methods`) from
    inside PEFT's ``LoraLayer.__init__``, when ``self.base_layer = base_layer`` runs and before PEFT creates the
    adapter: PEFT's constructor goes on with this class's ``update_layer`` (which checks the config), so a plain
    ``peft.get_peft_model(model, LoraConfig(...))`` builds exactly the layer :func:`register_compressed_lora` would.
    """
    layer.__class__ = CompressedLoraLinear
    layer._attach(base_layer)


@lru_cache(maxsize=None)
def compressed_lora_layer(mask_update: bool = True, quant_aware: bool = False, merge_grid: str = "base") -> type:
    """The :class:`CompressedLoraLinear` class with a given policy (one class per policy, cached)."""
    if merge_grid not in GRIDS:
        raise ValueError(f"merge_grid={merge_grid!r} is not supported; use one of {GRIDS}.")
    if quant_aware and merge_grid != "base":
        raise ValueError("quant_aware=True trains on the base grid; it needs merge_grid='base'.")
    if (mask_update, quant_aware, merge_grid) == (True, False, "base"):
        return CompressedLoraLinear
    name = f"CompressedLoraLinear_{'masked' if mask_update else 'unmasked'}{'_qat' if quant_aware else ''}_{merge_grid}"
    return type(name, (CompressedLoraLinear,), {"mask_update": mask_update, "quant_aware": quant_aware, "merge_grid": merge_grid})


def register_compressed_lora(
    config: LoraConfig, *, mask_update: bool = True, quant_aware: bool = False, merge_grid: str = "base"
) -> LoraConfig:
    """Let ``config`` wrap hfcompress's compressed Linear modules; returns the same config.

    Args:
        config: the :class:`peft.LoraConfig` (plain LoRA; ``r``, ``lora_alpha``, ``target_modules``, ...).
        mask_update: on sparse bases, mask the adapter's update with the base's sparsity mask so merging keeps
            the exact pattern (SparsePEFT). ``False`` trains an unmasked update (a merge then drops the
            update of pruned weights and reports the difference).
        quant_aware: on quantized bases, train through the base's integer grid (QA-SparsePEFT), so the merge
            is exact. Needs ``lora_dropout=0``.
        merge_grid: ``"base"`` re-quantizes merges on the base's scales/zero points; ``"refit"`` recomputes them.

    Uses PEFT's own extension point (``LoraConfig._register_custom_module``), so the config keeps working
    with ``get_peft_model``, ``PeftModel.from_pretrained(..., config=config)`` and transformers'
    ``model.load_adapter(..., peft_config=config)``. The policy is not written to ``adapter_config.json``:
    pass the same options when loading (see :func:`hfcompress.peft.load_adapter`).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}.")
    for name, value in (("mask_update", mask_update), ("quant_aware", quant_aware)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True or False.")
    config._register_custom_module({CompressedLinear: compressed_lora_layer(mask_update, quant_aware, merge_grid)})
    return config
