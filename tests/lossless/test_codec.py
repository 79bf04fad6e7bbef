"""The lossless codec: bit-exact round trips on any bit pattern, and damage that always raises."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.lossless import LosslessFormatError, decode_tensor, encode_tensor, read_info
from hfcompress.lossless import coder, planes

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
BYTES = [torch.uint8, torch.int8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` (so NaN payloads and -0.0 compare exactly)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def weights(dtype, shape, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# --------------------------------------------------------------------------- property-based round trips
@st.composite
def float_tensors(draw):
    dtype = draw(st.sampled_from(FLOATS))
    n = draw(st.integers(0, 3000))
    w = dtype.itemsize
    kind = draw(st.sampled_from(["random_bits", "weights", "special"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random_bits":  # every bit pattern: NaNs with payloads, infinities, subnormals, -0.0
        raw = rng.integers(0, 256, size=n * w, dtype=np.uint8)
        t = torch.from_numpy(raw).view(dtype) if n else torch.empty(0, dtype=dtype)
    else:
        t = (torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 0.05).to(dtype)
        if kind == "special" and n:
            info = torch.finfo(dtype)
            specials = torch.tensor(
                [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, info.tiny / 4, -info.tiny / 8, info.max, -info.max],
                dtype=torch.float32,
            ).to(dtype)
            idx = torch.from_numpy(rng.integers(0, n, size=min(n, 40)))
            t[idx] = specials[torch.from_numpy(rng.integers(0, len(specials), size=len(idx)))]
            if dtype.itemsize == 2:  # a NaN with a non-canonical payload and sign
                t.view(torch.int16)[idx[:1]] = torch.tensor([-1], dtype=torch.int16)
    shape = draw(st.sampled_from(["flat", "2d", "3d"]))
    if shape == "2d" and n % 3 == 0:
        t = t.reshape(3, n // 3)
    elif shape == "3d" and n % 6 == 0:
        t = t.reshape(2, 3, n // 6)
    return t


@settings(max_examples=100, deadline=None)
@given(t=float_tensors(), chunk=st.sampled_from([1, 7, 64, 1000, 1 << 18]), threads=st.sampled_from([1, 2]))
def test_float_round_trip_is_bit_exact(t, chunk, threads):
    payload = encode_tensor(t, chunk_elems=chunk, threads=threads)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert_bit_exact(decode_tensor(payload, threads=threads), t)
    info = read_info(payload)
    assert info.dtype == t.dtype and info.shape == tuple(t.shape) and info.nbytes == payload.numel()


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(BYTES),
    n=st.integers(0, 5000),
    alphabet=st.integers(1, 256),
    seed=st.integers(0, 2**31 - 1),
    chunk=st.sampled_from([5, 512, 1 << 18]),
)
def test_byte_round_trip_is_bit_exact(dtype, n, alphabet, seed, chunk):
    raw = np.random.default_rng(seed).integers(0, alphabet, size=n, dtype=np.uint8)
    t = torch.from_numpy(raw) if n else torch.empty(0, dtype=torch.uint8)
    t = (t & 1).bool() if dtype == torch.bool else t.view(dtype)
    assert_bit_exact(decode_tensor(encode_tensor(t, chunk_elems=chunk)), t)


def test_scalar_empty_and_noncontiguous():
    for t in [torch.tensor(1.5, dtype=torch.bfloat16), torch.empty(0, 4, dtype=torch.float16), weights(torch.float32, (40, 30)).t()]:
        assert_bit_exact(decode_tensor(encode_tensor(t)), t.contiguous())


# --------------------------------------------------------------------------- the layout does what it says
def test_float_planes_are_exponent_and_sign_mantissa():
    t = torch.tensor([1.0, -2.0, 0.5, -0.0], dtype=torch.bfloat16)
    hi, lo = planes.split(planes.as_uint_array(t), torch.bfloat16)
    assert hi.tolist() == [127, 128, 126, 0]  # the 8-bit exponents
    assert lo.tolist() == [0, 1, 0, 1]  # mantissa (zero here) shifted up by one, sign in bit 0
    f32 = torch.tensor([3.0], dtype=torch.float32)
    hi, lo = planes.split(planes.as_uint_array(f32), torch.float32)
    assert hi.tolist() == [128] and lo.size == 3


def test_weights_compress_like_their_exponent_entropy():
    t = weights(torch.bfloat16, (512, 512))
    payload = encode_tensor(t)
    hi, _ = planes.split(planes.as_uint_array(t), torch.bfloat16)
    bound = (8 + coder.order0_entropy_bits(hi)) / 16  # raw sign+mantissa, ideal exponent coder
    ratio = payload.numel() / (t.numel() * 2)
    assert bound < ratio < bound + 0.01  # Huffman + headers stay within 1% of the order-0 bound
    info = read_info(payload)
    assert all(c.methods == (coder.METHOD_DEFLATE, coder.METHOD_RAW) for c in info.chunks)


def test_incompressible_planes_are_stored_raw():
    t = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=100_000, dtype=np.uint8))
    payload = encode_tensor(t)
    assert all(c.methods == (coder.METHOD_RAW,) for c in read_info(payload).chunks)
    assert payload.numel() < t.numel() + 64


def test_payloads_decode_without_isal(monkeypatch):
    t = weights(torch.bfloat16, (300, 200))
    payload = encode_tensor(t, chunk_elems=10_000)
    monkeypatch.setattr(coder, "_igzip", None)  # the standard-library decoder reads the same streams
    assert_bit_exact(decode_tensor(payload), t)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="int64 cannot be coded"):
        encode_tensor(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_elems=0"):
        encode_tensor(torch.zeros(3), chunk_elems=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        encode_tensor(np.zeros(3))
    with pytest.raises(LosslessFormatError, match="1-D uint8"):
        decode_tensor(torch.zeros(3, dtype=torch.int32))


# --------------------------------------------------------------------------- damage never yields wrong values
@pytest.fixture(scope="module")
def payload_and_tensor():
    t = weights(torch.bfloat16, (64, 96), seed=3)
    t.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16)
    return encode_tensor(t, chunk_elems=1000), t


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_raises(payload_and_tensor, data):
    payload, _ = payload_and_tensor
    pos = data.draw(st.integers(0, payload.numel() - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = payload.clone()
    bad[pos] ^= flip
    with pytest.raises(LosslessFormatError):
        decode_tensor(bad)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_truncation_or_extension_raises(payload_and_tensor, data):
    payload, _ = payload_and_tensor
    keep = data.draw(st.integers(0, payload.numel() - 1), label="keep")
    with pytest.raises(LosslessFormatError, match="truncated|lossless payload"):
        decode_tensor(payload[:keep].clone())
    longer = torch.cat([payload, torch.zeros(data.draw(st.integers(1, 9)), dtype=torch.uint8)])
    with pytest.raises(LosslessFormatError, match="longer"):
        decode_tensor(longer)


def test_damage_messages_name_the_tensor_and_the_fix(payload_and_tensor):
    payload, _ = payload_and_tensor
    info = read_info(payload)
    bad = payload.clone()
    bad[info.header_bytes + 5] ^= 0x10  # inside the first chunk's coded exponents
    with pytest.raises(LosslessFormatError, match=r"model\.w_lossless: chunk 0 .*(corrupt|checksum)"):
        decode_tensor(bad, where="model.w_lossless")
    bad = payload.clone()
    bad[0] = ord("X")
    with pytest.raises(LosslessFormatError, match="not a lossless payload"):
        decode_tensor(bad)
    bad = payload.clone()
    bad[4] = 9
    with pytest.raises(LosslessFormatError, match="'version' is 9, not supported.*upgrade"):
        decode_tensor(bad)


def test_raw_plane_damage_is_caught_by_the_chunk_checksum(payload_and_tensor):
    payload, _ = payload_and_tensor
    info = read_info(payload)
    first = info.chunks[0]
    raw_start = info.header_bytes + first.sizes[0]  # the chunk's raw sign/mantissa plane
    bad = payload.clone()
    bad[raw_start + 10] ^= 0x01
    with pytest.raises(LosslessFormatError, match="chunk 0 .*checksum"):
        decode_tensor(bad)


def test_header_fields_are_documented_offsets(payload_and_tensor):
    payload, t = payload_and_tensor
    raw = bytes(payload[:32].numpy())
    magic, version, dtype_code, layout, ndim = struct.unpack_from("<4sBBBB", raw)
    assert (magic, version, dtype_code, layout, ndim) == (b"HFCL", 1, planes.DTYPE_CODES[torch.bfloat16], 1, 2)
    assert struct.unpack_from("<2Q", raw, 8) == tuple(t.shape)


def test_decoder_fault_is_caught_by_the_decoded_checksum(payload_and_tensor, monkeypatch):
    payload, _ = payload_and_tensor
    real_merge = planes.merge

    def faulty_merge(parts, dtype, out):
        real_merge(parts, dtype, out)
        out[len(out) // 2] ^= 1  # one wrong bit, as a decoder bug would produce

    monkeypatch.setattr(planes, "merge", faulty_merge)
    with pytest.raises(LosslessFormatError, match="checksum \\(decoded bytes\\)"):
        decode_tensor(payload)


def test_damage_the_inflater_tolerates_still_raises():
    # A bit of the (unused) distance-code lengths of a Huffman-only DEFLATE header: ISA-L decodes the exact
    # same bytes, zlib refuses the stream; the stored-bytes checksum reports the damage either way.
    g = torch.Generator().manual_seed(3)
    t = (torch.randn((64, 96), generator=g) * 0.02).to(torch.bfloat16)
    t.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16)
    payload = encode_tensor(t, chunk_elems=1000)
    bad = payload.clone()
    bad[read_info(payload).header_bytes + 18] ^= 1
    with pytest.raises(LosslessFormatError, match="chunk 0 .*checksum \\(stored bytes\\)"):
        decode_tensor(bad)
