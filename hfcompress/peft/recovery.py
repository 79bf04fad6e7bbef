"""Sparse finetuning recovery: train a pruned model with its masks held fixed, optionally distilling the dense teacher.

Two ways to recover what pruning lost, both driven by transformers' ``Trainer``:

* **full sparse finetuning** (Kurtic et al., "Sparse Finetuning for Inference Acceleration of LLMs"):
  :func:`prepare_sparse_finetune` turns every sparse, unquantized compressed Linear into a trainable
  ``nn.Linear`` whose gradient is masked, and :class:`SparseRecoveryTrainer` re-applies the masks after
  every optimizer step (so no optimizer, weight decay or momentum can revive a pruned weight);
  :func:`finalize_sparse_finetune` writes the weights back into the compressed format with the very same
  masks and marks the model compressed again (``save_pretrained`` then writes the sparse checkpoint);
* **sparse LoRA** (SQFT): wrap the compressed model with :func:`hfcompress.peft.get_peft_model` (masked
  updates) and train it with the same trainer; merge with :func:`hfcompress.peft.merge_and_unload`.

:class:`SparseRecoveryTrainer` adds an optional distillation loss against the dense teacher
(:class:`DistillationConfig`): per-token KL divergence between the teacher's and the student's output
distributions, and/or a per-layer feature loss (the normalized hidden-state MSE the sparse-finetuning
paper calls SquareHead), next to the usual cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from ..apply import mark_compressed
from ..formats.base import CompressedWeight
from ..modules import CompressedLinear, compressed_modules, set_submodule
from ..spec import LayerSpec
from .masks import sparsity_mask
from .merge import stored_value_dtype

__all__ = [
    "DistillationConfig",
    "SparseMasks",
    "SparseRecoveryTrainer",
    "SparsityMaskCallback",
    "distillation_loss",
    "finalize_sparse_finetune",
    "prepare_sparse_finetune",
]

_STATE_ATTR = "_hfcompress_sparse_masks"


@dataclass
class _Entry:
    mask: torch.Tensor
    spec: LayerSpec
    value_dtype: torch.dtype
    hook: Any = None


class SparseMasks:
    """The fixed masks of a model prepared with :func:`prepare_sparse_finetune` (``{module name: mask}``)."""

    def __init__(self, model: nn.Module, entries: dict[str, _Entry], config: Any) -> None:
        self._model = model
        self.entries = entries
        self.config = config  # the HfCompressConfig to re-attach on finalize

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: e.mask for name, e in self.entries.items()}

    @torch.no_grad()
    def apply_(self, model: nn.Module | None = None) -> None:
        """Zero every pruned weight again (in place)."""
        model = self._model if model is None else model
        for name, e in self.entries.items():
            w = model.get_submodule(name).weight
            w.mul_(e.mask.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def violations(self, model: nn.Module | None = None) -> dict[str, int]:
        """``{module name: count}`` of pruned weights that are not zero (empty when the masks hold)."""
        model = self._model if model is None else model
        out = {}
        for name, e in self.entries.items():
            w = model.get_submodule(name).weight
            bad = int((w[~e.mask.to(w.device)] != 0).sum())
            if bad:
                out[name] = bad
        return out


def prepare_sparse_finetune(model: nn.Module, dtype: torch.dtype | None = torch.float32) -> SparseMasks:
    """Make a sparse compressed model trainable with fixed masks; returns the :class:`SparseMasks`.

    Every sparse, unquantized compressed Linear becomes a plain ``nn.Linear`` (weights decoded to
    ``dtype``, float32 by default; ``None`` keeps the stored dtype) whose gradient is multiplied by the
    mask. The model is un-marked as compressed while it trains (so ``Trainer`` treats it as a normal model
    and its checkpoints are dense); :func:`finalize_sparse_finetune` compresses it back.

    Raises ``ValueError`` (model untouched) when the model has no sparse layers or has compressed modules
    this mode cannot train (quantized ones: finetune those with sparse LoRA, :func:`hfcompress.peft.get_peft_model`).
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("The model is already prepared for sparse finetuning; call finalize_sparse_finetune(model) first.")
    modules = compressed_modules(model)
    blocked = {n: m for n, m in modules.items() if not (isinstance(m, CompressedLinear) and m.spec.sparse and not m.spec.quantized)}
    if blocked:
        name, m = next(iter(blocked.items()))
        raise ValueError(
            f"{len(blocked)} compressed module(s) cannot be finetuned densely with fixed masks, e.g. {name!r} "
            f"({type(m).__name__}, {m.extra_repr()}): only sparse, unquantized Linear layers can. Train quantized "
            "bases with sparse LoRA (hfcompress.peft.get_peft_model + merge_and_unload) instead."
        )
    if not modules:
        raise ValueError("The model has no sparse compressed layers; prune it first (e.g. hfcompress.oneshot with sparsity=0.5).")
    entries: dict[str, _Entry] = {}
    replacements: dict[str, nn.Linear] = {}
    for name, m in modules.items():
        mask = sparsity_mask(m)
        value_dtype = stored_value_dtype(m)
        weight = m.dequantize_weight(dtype or value_dtype)
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=True)
        if m.bias is not None:
            dense.bias = m.bias
        entries[name] = _Entry(mask=mask.to(weight.device), spec=m.spec, value_dtype=value_dtype)
        replacements[name] = dense
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    for name, dense in replacements.items():
        set_submodule(model, name, dense)
        mask = entries[name].mask
        entries[name].hook = dense.weight.register_hook(lambda g, mask=mask: g * mask.to(dtype=g.dtype))
    _unmark(model)
    state = SparseMasks(model, entries, config)
    object.__setattr__(model, _STATE_ATTR, state)
    return state


def _unmark(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "_is_quantized"):
            sub._is_quantized = False


def sparse_masks_of(model: nn.Module) -> SparseMasks | None:
    """The :class:`SparseMasks` attached by :func:`prepare_sparse_finetune` (PEFT/accelerate wrappers looked through)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        state = getattr(candidate, _STATE_ATTR, None) if candidate is not None else None
        if state is not None:
            return state
    return None


@torch.no_grad()
def finalize_sparse_finetune(model: nn.Module) -> nn.Module:
    """Compress the finetuned layers back with their original masks and specs; returns the model.

    Kept values are rounded to the dtype they were stored in before finetuning. Raises ``ValueError``
    (model untouched) if a pruned weight became non-zero. Afterwards ``model.save_pretrained(out)`` writes
    the sparse checkpoint again.
    """
    state = sparse_masks_of(model)
    if state is None:
        raise ValueError("The model was not prepared with prepare_sparse_finetune(model); nothing to finalize.")
    model = state._model
    bad = state.violations()
    if bad:
        name, count = next(iter(bad.items()))
        raise ValueError(
            f"{count} pruned weight(s) of {name!r} became non-zero during finetuning (and {len(bad) - 1} more layers); "
            "call masks.apply_() to re-zero them, or train with SparseRecoveryTrainer which keeps the masks fixed."
        )
    twins = {}
    for name, e in state.entries.items():
        dense = model.get_submodule(name)
        twin = CompressedLinear.from_dense(dense, e.spec)
        twin.value_dtype = e.value_dtype
        mask = e.mask.to(dense.weight.device)
        values = (dense.weight.detach().float() * mask).to(e.value_dtype)
        twin.set_compressed_weight(CompressedWeight(weight=values.float(), mask=mask, dtype=e.value_dtype))
        if twin.bias is not None:
            twin.bias.requires_grad_(False)
        twins[name] = twin.to(dense.weight.device)
    for name, twin in twins.items():
        e = state.entries[name]
        if e.hook is not None:
            e.hook.remove()
        set_submodule(model, name, twin)
    object.__delattr__(model, _STATE_ATTR)
    if state.config is not None:
        mark_compressed(model, state.config)
    return model


# ---------------------------------------------------------------------------------------------- distillation
@dataclass
class DistillationConfig:
    """Weights of the recovery loss ``hard * CE + kl * KL + feature * F``.

    Args:
        hard_weight: cross-entropy on the labels (the model's own loss).
        kl_weight: per-token KL divergence ``KL(teacher || student)`` of the output distributions at
            ``temperature``, multiplied by ``temperature**2``, averaged over the attended tokens.
        feature_weight: per-layer feature loss: ``mean_l ||h_s - h_t||^2 / ||h_t||^2`` over the hidden
            states (token-masked), the normalized MSE ("SquareHead") of the sparse-finetuning paper.
        temperature: softening of both distributions for the KL term.
        feature_layers: indices into ``hidden_states`` (0 = embeddings); ``None`` = every block's output.
    """

    hard_weight: float = 1.0
    kl_weight: float = 0.0
    feature_weight: float = 0.0
    temperature: float = 1.0
    feature_layers: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("hard_weight", "kl_weight", "feature_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative number.")
        if self.hard_weight == self.kl_weight == self.feature_weight == 0:
            raise ValueError("hard_weight, kl_weight and feature_weight are all 0; set at least one, e.g. kl_weight=1.0.")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be a positive number, e.g. 1.0 or 2.0.")
        if self.feature_layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in self.feature_layers):
            raise ValueError(f"feature_layers={self.feature_layers!r} must be a list of hidden-state indices (integers).")

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.feature_weight > 0


def _token_weights(mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor | None:
    if mask is None or tuple(mask.shape) != tuple(shape):
        return None
    return mask.to(device=device, dtype=torch.float32)


def distillation_loss(
    student: Any,
    teacher: Any,
    config: DistillationConfig,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, parts)`` for model outputs ``student`` (with grad) and ``teacher`` (no grad).

    ``student.loss`` supplies the cross-entropy; ``logits`` the KL term; ``hidden_states`` the feature term.
    ``parts`` holds the detached value of each term for logging.
    """
    parts: dict[str, float] = {}
    total = None

    def add(name: str, weight: float, value: torch.Tensor) -> None:
        nonlocal total
        parts[name] = float(value.detach())
        total = weight * value if total is None else total + weight * value

    if config.hard_weight > 0:
        if getattr(student, "loss", None) is None:
            raise ValueError("hard_weight > 0 needs the model's loss: pass labels in the batch (or set hard_weight=0).")
        add("ce", config.hard_weight, student.loss)
    if config.kl_weight > 0:
        s_logits, t_logits = student.logits.float(), teacher.logits.float().to(student.logits.device)
        if s_logits.shape != t_logits.shape:
            raise ValueError(
                f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} differ; the teacher "
                "must share the student's tokenizer and vocabulary."
            )
        t = config.temperature
        log_p_s = F.log_softmax(s_logits / t, dim=-1)
        log_p_t = F.log_softmax(t_logits / t, dim=-1)
        per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (t * t)
        w = _token_weights(attention_mask, per_token.shape, per_token.device)
        kl = per_token.mean() if w is None else (per_token * w).sum() / w.sum().clamp(min=1)
        add("kl", config.kl_weight, kl)
    if config.feature_weight > 0:
        hs, ht = getattr(student, "hidden_states", None), getattr(teacher, "hidden_states", None)
        if hs is None or ht is None:
            raise ValueError("feature_weight > 0 needs hidden states from both models (output_hidden_states=True).")
        if len(hs) != len(ht):
            raise ValueError(f"student has {len(hs)} hidden states, teacher {len(ht)}; they must have the same depth.")
        layers = config.feature_layers if config.feature_layers is not None else list(range(1, len(hs)))
        losses = []
        for i in layers:
            if not -len(hs) <= i < len(hs):
                raise ValueError(f"feature_layers entry {i} is out of range for {len(hs)} hidden states.")
            s, tt = hs[i].float(), ht[i].float().to(hs[i].device)
            err = (s - tt).pow(2).mean(-1)
            ref = tt.pow(2).mean(-1)
            w = _token_weights(attention_mask, err.shape, err.device)
            if w is None:
                losses.append(err.mean() / ref.mean().clamp(min=1e-12))
            else:
                losses.append((err * w).sum() / (ref * w).sum().clamp(min=1e-12))
        add("feature", config.feature_weight, torch.stack(losses).mean())
    return total, parts


class SparsityMaskCallback(TrainerCallback):
    """Re-applies fixed sparsity masks after every optimizer step (exact zeros whatever the optimizer does)."""

    def __init__(self, masks: SparseMasks) -> None:
        self.masks = masks

    def on_step_end(self, args, state, control, **kwargs):
        self.masks.apply_()
        return control


class SparseRecoveryTrainer(Trainer):
    """``transformers.Trainer`` for recovering a pruned model: fixed masks and optional distillation.

    Args:
        teacher: the dense model before pruning (same tokenizer); needed when ``distillation`` has a KL or
            feature term. It runs in eval mode without gradients, on the student's device.
        distillation: a :class:`DistillationConfig`; default: plain cross-entropy.
        Everything else is ``Trainer``'s. A model prepared with :func:`prepare_sparse_finetune` gets its masks
        re-applied after every step; a PEFT model with hfcompress LoRA layers keeps its masks by construction.
    """

    # compute_loss returns per-batch means; Trainer divides by the gradient accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module | None = None, distillation: DistillationConfig | None = None, **kwargs: Any):
        distillation = distillation or DistillationConfig()
        if not isinstance(distillation, DistillationConfig):
            raise TypeError(f"distillation must be a DistillationConfig, got {type(distillation).__name__}.")
        if distillation.needs_teacher and teacher is None:
            raise ValueError("distillation asks for a KL or feature loss but teacher=None; pass the dense model as teacher=.")
        super().__init__(*args, **kwargs)
        self.distillation = distillation
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        masks = sparse_masks_of(self.model)
        self.sparse_masks = masks
        if masks is not None:
            self.add_callback(SparsityMaskCallback(masks))
        self.loss_parts: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distillation
        needs_hidden = cfg.feature_weight > 0
        model_inputs = dict(inputs)
        if cfg.hard_weight == 0:
            model_inputs.pop("labels", None)
        if needs_hidden:
            model_inputs["output_hidden_states"] = True
        outputs = model(**model_inputs)
        teacher_out = None
        if cfg.needs_teacher:
            teacher_inputs = {k: v for k, v in model_inputs.items() if k != "labels"}
            device = outputs.logits.device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            with torch.no_grad():
                teacher_out = self.teacher(**teacher_inputs)
        loss, parts = distillation_loss(outputs, teacher_out, cfg, inputs.get("attention_mask"))
        self.loss_parts = parts
        return (loss, outputs) if return_outputs else loss
