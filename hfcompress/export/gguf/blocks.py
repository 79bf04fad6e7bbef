"""Our integer grids as ggml blocks, bit for bit.

ggml's legacy block types hold 32 consecutive weights of a row with a float16 scale ``d`` (and minimum ``m``);
in each, weight ``j`` sits in the low nibble of byte ``j`` for ``j < 16`` and in the high nibble of byte
``j - 16`` after (Q8_0 stores one signed byte per weight; Q5 types add one 32-bit word of fifth bits, bit
``j`` for weight ``j``). They decode to:

======  ====================  ==========================================================
type    bytes per 32 weights  decoded weight                  = our grid when
======  ====================  ==========================================================
Q4_0    18                    ``d * (q - 8)``                 4-bit symmetric, group 32
Q5_0    22                    ``d * (q - 16)``                5-bit symmetric, group 32
Q8_0    34                    ``d * q`` (q signed)            8-bit symmetric, group 32
Q4_1    20                    ``d * q + m``                   4-bit asymmetric, group 32, ``m = -z*d`` in float16
Q5_1    24                    ``d * q + m``                   5-bit asymmetric, group 32, ``m = -z*d`` in float16
======  ====================  ==========================================================

Our symmetric grid decodes ``(q - 2**(bits-1)) * s``, so with ``d = s`` (float16) both sides compute the same
exact product in float32. An asymmetric grid maps to ``d = s, m = -z*s`` exactly when ``z*s`` is itself a
float16 value (then ``d*q + m`` is the exact ``(q - z)*s``); otherwise the block needs re-quantization.
"""

from __future__ import annotations

import numpy as np
import torch

from ..source import QuantizedLayer

__all__ = ["BLOCK", "EXACT_TYPES", "encodable", "encode_exact", "exact_type", "inexact_reason"]

#: weights per block of every type we write from our grids
BLOCK = 32
#: (bits, symmetric) -> the ggml type that holds the grid exactly
EXACT_TYPES = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0", (4, False): "Q4_1", (5, False): "Q5_1"}


def exact_type(layer: QuantizedLayer) -> str | None:
    """The ggml type our grid maps to (before the per-block checks), or ``None``."""
    return EXACT_TYPES.get((layer.spec.bits, layer.spec.symmetric))


def inexact_reason(layer: QuantizedLayer, qtype: str) -> str:
    """Why ``layer`` cannot be written as ``qtype`` bit for bit (``""`` when it can)."""
    spec = layer.spec
    natural = exact_type(layer)
    if natural is None:
        return f"ggml has no block type for {spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} codes"
    if natural != qtype:
        return f"its {spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} grid is {natural}, not {qtype}"
    if spec.group_size != BLOCK or layer.cols % BLOCK:
        return f"ggml blocks are {BLOCK} weights wide; this layer has group_size={spec.group_size} over {layer.cols} columns"
    s = layer.scale
    if not (torch.equal(s.to(torch.float16).float(), s.float()) and torch.isfinite(s.to(torch.float16)).all()):
        return f"its {spec.scale_dtype} scales are not all float16 values (ggml block scales are float16)"
    if not spec.symmetric:
        m = layer.zero.float() * s.float()
        if not torch.equal(m.to(torch.float16).float(), m):
            bad = (m.to(torch.float16).float() != m).float().mean().item()
            return f"{bad:.1%} of its blocks have a minimum -zero*scale that float16 cannot hold exactly"
    return ""


def encodable(layer: QuantizedLayer, qtype: str) -> bool:
    """Whether :func:`encode_exact` can write ``layer`` as ``qtype`` keeping its codes and scales, the minima of an
    asymmetric grid rounded to float16 if need be (far closer than re-quantizing the weights)."""
    spec = layer.spec
    s = layer.scale
    return (
        exact_type(layer) == qtype
        and spec.group_size == BLOCK
        and layer.cols % BLOCK == 0
        and bool(torch.equal(s.to(torch.float16).float(), s.float()))
    )


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().view(torch.uint8).numpy().reshape(*t.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``q[..., 32]`` (values < 16) -> ``[..., 16]`` bytes: weight j low nibble of byte j, weight j+16 its high nibble."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 weights of a block as one little-endian uint32 (4 bytes)."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(axis=-1, dtype=np.uint32)).view(np.uint8).reshape(*q.shape[:-1], 4)


def encode_exact(layer: QuantizedLayer, qtype: str, rows: torch.Tensor | None = None) -> np.ndarray:
    """The ggml bytes ``uint8 [rows, n_blocks * block_bytes]`` of ``layer`` as ``qtype`` (checked by :func:`inexact_reason`).

    ``rows`` optionally reorders the output rows (llama.cpp's rotary layout of q/k projections).
    """
    codes, scale, zero = layer.codes, layer.scale, layer.zero
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        zero = zero[rows] if zero is not None else None
    n, nb = codes.shape[0], codes.shape[1] // BLOCK
    q = codes.numpy().reshape(n, nb, BLOCK)
    d = _f16_bytes(scale)
    if qtype == "Q8_0":
        parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif qtype == "Q4_0":
        parts = [d, _nibbles(q)]
    elif qtype == "Q5_0":
        parts = [d, _fifth_bits(q), _nibbles(q)]
    elif qtype in ("Q4_1", "Q5_1"):
        m = _f16_bytes(-(zero.float() * scale.float()))
        parts = [d, m] + ([_fifth_bits(q)] if qtype == "Q5_1" else []) + [_nibbles(q)]
    else:
        raise ValueError(f"no exact encoder for {qtype}")
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(n, -1))
