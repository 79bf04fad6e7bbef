"""PEFT on compressed models: LoRA on packed bases, sparsity-preserving merges, recovery, compressed deltas.

* :func:`get_peft_model`, :func:`save_adapter`, :func:`load_adapter`, :func:`merge_and_unload`: the LoRA
  workflow on hfcompress models, through PEFT's custom-layer API (:func:`register_compressed_lora`).
* :mod:`.merge`: merges that keep the sparsity mask and re-quantize on the base's grid, with a report.
* :mod:`.masks`: the stored sparsity mask / integer grid of a compressed module.
* :mod:`.recovery`: sparse finetuning with fixed masks and distillation (:class:`SparseRecoveryTrainer`).
* :mod:`.deltas`: ComPEFT / DARE compressed adapters and task vectors, in a documented file format.
"""

from .api import (
    POLICY_FILE,
    compressed_lora_layers,
    expand_all_linear,
    get_peft_model,
    load_adapter,
    lora_policy,
    merge_and_unload,
    save_adapter,
)
from .deltas import (
    COMPRESSED_ADAPTER_FILE,
    CompressedDelta,
    CompressedTensor,
    apply_task_vector,
    compeft,
    compress_delta,
    dare,
    load_compressed_adapter,
    save_compressed_adapter,
    task_vector,
)
from .layer import CompressedLoraLinear, compressed_lora_layer, register_compressed_lora
from .masks import base_grid, model_sparsity, sparsity_mask, sparsity_masks
from .merge import LayerMergeReport, MergeReport, merge_into, project_to_base
from .recovery import (
    DistillationConfig,
    SparseMasks,
    SparseRecoveryTrainer,
    SparsityMaskCallback,
    distillation_loss,
    finalize_sparse_finetune,
    prepare_sparse_finetune,
)

__all__ = [
    "COMPRESSED_ADAPTER_FILE",
    "POLICY_FILE",
    "CompressedDelta",
    "CompressedTensor",
    "DistillationConfig",
    "SparseMasks",
    "SparseRecoveryTrainer",
    "SparsityMaskCallback",
    "apply_task_vector",
    "compeft",
    "compress_delta",
    "dare",
    "distillation_loss",
    "finalize_sparse_finetune",
    "load_compressed_adapter",
    "prepare_sparse_finetune",
    "save_compressed_adapter",
    "task_vector",
    "CompressedLoraLinear",
    "LayerMergeReport",
    "MergeReport",
    "base_grid",
    "compressed_lora_layer",
    "compressed_lora_layers",
    "expand_all_linear",
    "get_peft_model",
    "load_adapter",
    "lora_policy",
    "merge_and_unload",
    "merge_into",
    "model_sparsity",
    "project_to_base",
    "register_compressed_lora",
    "save_adapter",
    "sparsity_mask",
    "sparsity_masks",
]
