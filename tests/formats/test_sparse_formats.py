"""The sparse formats round-trip exactly (property-based), validate checkpoints, and hit their byte targets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.formats import format_for, get_format
from hfcompress.formats.base import CompressedWeight
from hfcompress.grid import quantize_rtn, scale_torch_dtype
from hfcompress.sparsity.masks import nm_mask, unstructured_mask
from hfcompress.spec import LayerSpec


def _compressed(spec: LayerSpec, rows: int, cols: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype).float()
    keep = nm_mask(w.abs(), *spec.nm) if spec.nm else unstructured_mask(w.abs(), spec.sparsity)
    w = w * keep
    q = None
    if spec.quantized:
        q = quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, scale_torch_dtype(spec.scale_dtype))
        w = q.dequantize() * keep
    return CompressedWeight(weight=w, quantized=q, mask=keep, dtype=dtype)


specs = st.builds(
    lambda structure, sparsity, bits, group, symmetric: LayerSpec(
        sparsity=0.0 if structure != "unstructured" else sparsity,
        sparsity_structure=structure, bits=bits, group_size=group, symmetric=symmetric,
    ),
    structure=st.sampled_from(["unstructured", "2:4", "4:8", "1:3", "3:7", "8:16"]),
    sparsity=st.floats(0.01, 0.95),
    bits=st.sampled_from([None, None, 2, 3, 4, 8]),
    group=st.sampled_from([None, 8, 13, 64]),
    symmetric=st.booleans(),
)  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(spec=specs, rows=st.integers(1, 12), cols=st.integers(1, 90), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))  # fmt: skip
def test_round_trip_is_exact(spec, rows, cols, seed, dtype):
    fmt = get_format(format_for(spec))
    assert fmt.name == ("nm" if spec.nm else "bitmask")
    cw = _compressed(spec, rows, cols, seed, dtype)
    tensors = fmt.encode(cw, spec)
    fmt.check(tensors, (rows, cols), spec, "layer")  # shapes/dtypes agree with expected_tensors
    out = fmt.decode(tensors, spec, (rows, cols), torch.float32)
    assert torch.equal(out, cw.weight)
    assert bool((out[~cw.mask] == 0).all())
    if not spec.quantized:
        assert tensors["weight_values"].dtype == dtype


@pytest.mark.parametrize(
    "spec, fmt, limit",
    [
        (LayerSpec(sparsity=0.5), "bitmask", 9.0),
        (LayerSpec(sparsity_structure="2:4"), "nm", 8.75),
        (LayerSpec(sparsity_structure="4:8"), "nm", 8.875),
        (LayerSpec(sparsity=0.5, bits=4, group_size=64), "bitmask", 3.25),
        (LayerSpec(sparsity_structure="2:4", bits=4, group_size=64), "nm", 3.0),
    ],
)
def test_bits_per_weight(spec, fmt, limit):
    rows, cols = 64, 576
    cw = _compressed(spec, rows, cols, 0)
    tensors = get_format(format_for(spec)).encode(cw, spec)
    assert format_for(spec) == fmt
    bits = 8 * sum(t.numel() * t.element_size() for t in tensors.values()) / (rows * cols)
    assert bits == pytest.approx(limit, abs=1e-9)


def test_corrupt_tensors_are_clear_errors():
    spec = LayerSpec(sparsity=0.5)
    fmt = get_format("bitmask")
    tensors = fmt.encode(_compressed(spec, 4, 16, 0), spec)
    tensors["weight_values"] = tensors["weight_values"][:-1]
    with pytest.raises(ValueError, match="corrupt"):
        fmt.decode(tensors, spec, (4, 16), torch.float32)
    nm_spec = LayerSpec(sparsity_structure="2:4")
    nm = get_format("nm")
    tensors = nm.encode(_compressed(nm_spec, 4, 16, 0), nm_spec)
    with pytest.raises(ValueError, match="has shape"):
        nm.check({**tensors, "weight_values": tensors["weight_values"][:, :-1]}, (4, 16), nm_spec, "layer")
    with pytest.raises(ValueError, match="floating dtype"):
        nm.check({**tensors, "weight_values": tensors["weight_values"].to(torch.int16)}, (4, 16), nm_spec, "layer")


def test_updated_values_round_to_the_storage_dtype():
    spec = LayerSpec(sparsity=0.5)
    cw = _compressed(spec, 4, 16, 0, dtype=torch.float32)
    cw.weight = cw.weight + 1e-3 * cw.mask  # e.g. SparseGPT's reconstruction, not representable in bf16
    cw.dtype = torch.bfloat16
    fmt = get_format("bitmask")
    out = fmt.decode(fmt.encode(cw, spec), spec, (4, 16), torch.float32)
    assert torch.equal(out, cw.weight.to(torch.bfloat16).float())


def test_mask_that_prunes_nonzero_weights_is_rejected():
    spec = LayerSpec(sparsity=0.5)
    cw = _compressed(spec, 4, 16, 0)
    cw.mask = ~cw.mask
    with pytest.raises(ValueError, match="not zero"):
        get_format("bitmask").encode(cw, spec)
