"""Bit packing and the quantization grid: exact round trips and error bounds."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.bitpack import pack_codes, packed_row_bytes, unpack_codes
from hfcompress.grid import compute_qparams, dequantize, num_groups, quantize, quantize_rtn


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_exact(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols).long(), codes)


def test_pack_layout_is_little_endian_per_row():
    # 4-bit: code 2i is the low nibble of byte i; 3-bit: codes form a little-endian bit stream.
    assert pack_codes(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    assert pack_codes(torch.tensor([[5, 6, 7]]), 3).tolist() == [[0b11_110_101, 0b1]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 1]]), 2).tolist() == [[0b00_11_10_01, 0b01]]


@pytest.mark.parametrize("bad", [torch.tensor([[16]]), torch.tensor([[-1]])])
def test_pack_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="outside"):
        pack_codes(bad, 4)


def test_unpack_rejects_truncated_rows():
    with pytest.raises(ValueError, match="truncated"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
    cols=st.integers(1, 300),
    group=st.sampled_from([None, 7, 32, 64, 128]),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_rtn_error_bound_ragged_groups(bits, cols, group, symmetric, seed):
    w = torch.randn(4, cols, generator=torch.Generator().manual_seed(seed))
    q = quantize_rtn(w, bits, group, symmetric, torch.float32)
    assert q.scale.shape == (4, num_groups(cols, group))
    assert int(q.codes.max()) < (1 << bits)
    err = (q.dequantize() - w).abs()
    # Round-to-nearest: at most half a step inside the range; the symmetric top code clips by one step.
    step = q.scale.float().repeat_interleave(min(group or cols, cols), dim=1)[:, :cols]
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert torch.all(err <= bound)


def test_ragged_group_statistics_are_per_group():
    w = torch.zeros(1, 10)
    w[0, 8:] = torch.tensor([4.0, -2.0])  # the short last group (size 2 of group_size 4)
    scale, zero = compute_qparams(w, 4, 4, symmetric=False, scale_dtype=torch.float32)
    assert scale.shape == (1, 3)
    assert scale[0, 2].item() == pytest.approx(6.0 / 15)
    codes = quantize(w, scale, zero, 4, 4)
    assert torch.allclose(dequantize(codes, scale, zero, 4, 4), w, atol=0.2)


def test_mse_clip_never_worse_than_minmax():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 12.0  # an outlier that min-max pays for
    base = (quantize_rtn(w, 3, 64).dequantize() - w).pow(2).sum()
    mse = (quantize_rtn(w, 3, 64, clip="mse").dequantize() - w).pow(2).sum()
    assert mse < base


def test_signed_scales_use_the_extra_negative_code_and_never_lose():
    """Symmetric codes span -2**(b-1) .. 2**(b-1)-1: a group whose extreme is positive is better served by a negative
    scale that puts it on the wide side (llama.cpp's Q4_0 grid). The mse search tries both signs at every range."""
    w = torch.tensor([[1.0, 0.5, -0.25, 0.75, 0.125, -0.5, 0.875, 0.0]])  # extreme +1: minmax step 2/15 clips it to 7/7.5
    q = quantize_rtn(w, 4, 8, clip="mse", scale_dtype=torch.float32)
    assert q.scale.item() == pytest.approx(-1 / 8)  # 1.0 lands exactly on code 0 (value -8 * -1/8)
    assert torch.equal(q.dequantize(), w)  # every weight here is a multiple of 1/8: exact
    g = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 8):
        x = torch.randn(32, 128, generator=g)
        err = {c: (quantize_rtn(x, bits, 32, clip=c).dequantize() - x).pow(2).sum(-1) for c in ("minmax", "mse")}
        assert bool((err["mse"] <= err["minmax"] * (1 + 1e-6)).all())  # per row: the search keeps minmax as a candidate
        assert float(err["mse"].sum()) < float(err["minmax"].sum())


def test_scales_are_rounded_before_codes():
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(w, 4, 32, scale_dtype=torch.float16)
    assert q.scale.dtype == torch.float16
    again = quantize(w, q.scale, None, 4, 32)
    assert torch.equal(again, q.codes)
