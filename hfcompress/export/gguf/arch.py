"""Architectures llama.cpp runs: each one's GGUF metadata, tensor names and weight layout.

Supported ``model_type`` values: ``llama`` (and ``mistral``, which llama.cpp runs as ``llama``), ``qwen2``,
``qwen3``, ``gemma``, ``gemma2`` and ``gemma3_text``. Tensor names come from the ``gguf`` package's own map
of each architecture. Two layout differences are applied on the way, both exact:

* ``llama``: llama.cpp applies rotary embeddings to interleaved pairs, transformers to the two halves of each
  head, so the rows of ``q_proj``/``k_proj`` are reordered (codes and scales move with their rows; a row's
  blocks are untouched).
* Gemma: its RMSNorm multiplies by ``1 + w``; llama.cpp multiplies by the stored weight, so norms are written
  as ``w + 1`` (in float32, where the sum of a bfloat16/float16 weight and 1 is exact for the magnitudes
  norms have; the report flags any that is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "qk_row_order"]


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False
    norm_plus_one: bool = False
    softcapping: bool = False
    sliding_window: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2"),
    "qwen3": Architecture("QWEN3"),
    "gemma": Architecture("GEMMA", norm_plus_one=True),
    "gemma2": Architecture("GEMMA2", norm_plus_one=True, softcapping=True, sliding_window=True),
    "gemma3_text": Architecture("GEMMA3", norm_plus_one=True, sliding_window=True),
}


def architecture_of(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} has no GGUF export yet; supported: {sorted(ARCHITECTURES)}. "
            "Export it to compressed-tensors (to='compressed-tensors') instead."
        )
    unsupported = _rope_types(config) - {"default", "linear"}
    if unsupported:
        raise ValueError(
            f"rope_type={sorted(unsupported)[0]!r} of this {model_type} model is not exported to GGUF yet "
            "(supported: 'default', 'linear')."
        )
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if model_type.startswith("gemma") and scalar is not None and scalar != head_dim(config):
        raise ValueError(
            f"query_pre_attn_scalar={scalar} of this {model_type} model differs from its head_dim={head_dim(config)}: "
            "llama.cpp scales attention by 1/sqrt(head_dim) (GGUF has no key for another scale), so it would run a "
            "different model."
        )
    return ARCHITECTURES[model_type]


def _rope_types(config) -> set[str]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {"default"}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (gemma3)
        return {v.get("rope_type", "default") for v in rope.values()}
    return {rope.get("rope_type", rope.get("type", "default"))}


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row indices turning transformers' half-split rotary layout of one projection into llama.cpp's pairs.

    Within each head of ``d`` rows, new row ``2i`` is old row ``i`` and new row ``2i + 1`` is old row ``i + d/2``.
    """
    d = rows // n_head
    idx = torch.arange(rows).reshape(n_head, 2, d // 2)
    return idx.transpose(1, 2).reshape(rows)


def _rope(config) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # gemma3: per layer type
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None)) if isinstance(rope, dict) else None
    return {"theta": theta if theta is not None else 10000.0, "params": rope if isinstance(rope, dict) else {}}


def write_metadata(writer, config, arch: Architecture, name: str) -> None:
    """The hyper-parameters llama.cpp reads for ``arch`` (``gguf.GGUFWriter`` keys)."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["theta"]))
    if rope["params"].get("rope_type", rope["params"].get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["params"]["factor"]))
    if arch.gguf_name == "LLAMA":
        writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if arch.softcapping:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    elif getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if arch.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_vocab_size(int(config.vocab_size))
