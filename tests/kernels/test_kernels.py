"""Inference paths: every fast path within its documented error bound of the exact decoded matmul (all bit
widths, ragged and per-channel groups, both grids), path selection, released codes rebuilt bit-exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hfcompress
from hfcompress import CompressedConv2d, CompressedEmbedding, CompressedLinear, HfCompressConfig, LayerSpec
from hfcompress.inference import inference_nbytes, inference_paths, set_inference_path
from hfcompress.kernels import RTOL, candidates, error_bound, set_default_inference_path
from hfcompress.kernels.codes import invert_nibble_layout, kernel_groups
from hfcompress.kernels.int4pack import _converter
from hfcompress.kernels.select import get_default_inference_path
from hfcompress.testing.models import tiny_llama

CPU = torch.device("cpu")
INT_PATHS = ("int4pack", "int8pack")


def _linear(spec: LayerSpec, rows: int, cols: int, bias: bool = True, seed: int = 0, method: str = "rtn") -> CompressedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column: groups with very different scales
    m = CompressedLinear(cols, rows, bias, spec)
    if bias:
        m.bias.data = torch.randn(rows, generator=g) * 0.1
    m.compress_(w, method=method)
    return m


def _check_within_bound(m: CompressedLinear, path: str, dtype: torch.dtype) -> None:
    set_inference_path(m, path)
    assert inference_paths(m) == {"": path}
    m.to(dtype)
    x = torch.randn(2, 3, m.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = m.dequantize_weight(torch.float64)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 3, m.out_features) and y.dtype == dtype
    want = x.double() @ w.t() + (m.bias.double() if m.bias is not None else 0)
    compute = torch.bfloat16 if path in INT_PATHS else dtype
    bound = error_bound(x, w, compute, m.bias).reshape(want.shape)
    err = (y.double() - want).abs()
    assert bool((err <= bound).all()), f"{path} exceeds its bound by {float((err / bound).max()):.2f}x"


GRIDS = {
    "g32": (40, 96, 32),  # rows not a multiple of 16
    "ragged_g64": (48, 200, 64),  # 200 = 3 x 64 + 8: padded input, ragged last group
    "g96_on_32": (32, 200, 96),  # group of 96 split into kernel groups of 32, ragged last group of 8
    "per_channel": (32, 200, None),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric,clip", [(True, "minmax"), (False, "minmax"), (True, "mse")], ids=["sym", "asym", "sym-mse"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_every_path_is_within_its_bound(bits, symmetric, clip, grid):
    rows, cols, group = GRIDS[grid]
    m = _linear(LayerSpec(bits=bits, group_size=group, symmetric=symmetric, clip=clip), rows, cols)
    if clip == "mse" and bits <= 4:  # signed scales: every kernel must decode a negative scale like the reference
        assert bool((m.weight_scale < 0).any())
    ran = []
    for path in ("reference", "dequant_cache", *INT_PATHS):
        if hfcompress.kernels.get_path(path).unsupported(m, CPU):
            continue
        try:
            set_inference_path(m, path)
        except ValueError as exc:  # int8pack refuses 8-bit asymmetric rows wider than int8: nothing else may fail
            assert path == "int8pack" and bits == 8 and not symmetric, exc
            continue
        for dtype in (torch.float32, torch.bfloat16):
            _check_within_bound(copy.deepcopy(m), path, dtype)
        ran.append(path)
    assert "int4pack" in ran  # every grid here maps onto the int4 kernel (one or two nibble planes)
    if group is None and (bits < 8 or symmetric):
        assert "int8pack" in ran


def test_dequant_cache_equals_reference_bit_for_bit():
    m = _linear(LayerSpec(bits=4, group_size=40), 24, 100, bias=False)
    x = torch.randn(5, 100)
    with torch.no_grad():
        set_inference_path(m, "reference")
        ref, ref64 = m(x), m(x.double())
        set_inference_path(m, "dequant_cache")
        assert torch.equal(m(x), ref)
        assert list(m._inference_state.cache) == [torch.float32]
        assert torch.equal(m(x.double()), ref64)
    assert list(m._inference_state.cache) == [torch.float64]  # one dtype cached at a time


@pytest.mark.parametrize(
    "cols, group, size, padded, index",
    [
        (576, 128, 64, 576, (0, 0, 1, 1, 2, 2, 3, 3, 4)),  # SmolLM2: 4 x 128 + 64, split into 64s, no padding
        (600, 128, 32, 608, (0,) * 4 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 3),  # ragged 88: least padding
        (576, None, 64, 576, (0,) * 9),  # per-channel: any split works
        (100, None, 128, 128, (0,)),  # one padded group
        (200, 96, 32, 224, (0, 0, 0, 1, 1, 1, 2)),
    ],
)
def test_kernel_group_mapping(cols, group, size, padded, index):
    kg = kernel_groups(cols, group, (32, 64, 128, 256))
    assert (kg.size, kg.padded_cols, kg.index) == (size, padded, index)


def test_group_sizes_no_kernel_takes_fall_back():
    assert kernel_groups(200, 48, (32, 64, 128, 256)) is None
    m = _linear(LayerSpec(bits=4, group_size=40), 32, 96)
    assert "multiple of 32" in hfcompress.kernels.get_path("int4pack").unsupported(m, CPU)
    assert candidates(m, CPU) == ["int4pack", "int8pack", "dequant_cache", "reference"]
    assert set_inference_path(m, "auto") == {"": "dequant_cache"}
    assert set_inference_path(m, "auto", prefer="memory") == {"": "reference"}


def test_auto_picks_by_bits_group_and_format():
    def chosen(spec, method="rtn", **kw):
        return set_inference_path(_linear(spec, 32, 128, method=method), "auto", **kw)[""]

    assert chosen(LayerSpec(bits=4, group_size=64)) == "int4pack"
    assert chosen(LayerSpec(bits=2, group_size=None, symmetric=False)) == "int4pack"
    assert chosen(LayerSpec(bits=8, group_size=None)) == "int8pack"
    assert chosen(LayerSpec(bits=6, group_size=None, symmetric=False)) == "int8pack"
    assert chosen(LayerSpec(bits=8, group_size=64)) == "int4pack"  # grouped 8-bit: two nibble planes
    sparse = LayerSpec(sparsity=0.5)
    assert chosen(sparse, "magnitude") == "dequant_cache"  # unquantized sparse values: decode once...
    assert chosen(sparse, "magnitude", prefer="memory") == "reference"  # ...or on use
    sparse_q = LayerSpec(bits=4, group_size=64, sparsity=0.5)  # sparse formats: decode once or on use...
    assert chosen(sparse_q, "magnitude") == "dequant_cache"
    assert chosen(sparse_q, "magnitude", prefer="memory") == "reference"
    nm_q = LayerSpec(bits=4, group_size=64, sparsity_structure="2:4")
    assert chosen(nm_q, "magnitude") == "dequant_cache"
    m = _linear(nm_q, 32, 128, method="magnitude")
    assert set_inference_path(m, "int4pack") == {"": "int4pack"}  # ...or, asked for, the kernels (zero codes)
    assert m._buffers["weight_packed"] is not None  # next to the stored tensors: nothing released


def test_int8pack_refuses_wide_asymmetric_rows_and_auto_moves_on():
    w = torch.linspace(0.0, 1.0, 64).repeat(16, 1)  # all positive: zero point 0, codes up to 255
    m = CompressedLinear(64, 16, False, LayerSpec(bits=8, group_size=None, symmetric=False))
    m.compress_(w)
    with pytest.raises(ValueError, match="further than int8"):
        set_inference_path(m, "int8pack")
    assert set_inference_path(m, "auto") == {"": "int4pack"}
    _check_within_bound(m, "int4pack", torch.float32)


@pytest.mark.parametrize("method,spec", [
    ("magnitude", LayerSpec(bits=4, group_size=32, sparsity=0.5)),
    ("magnitude", LayerSpec(bits=3, group_size=32, sparsity_structure="2:4", symmetric=False)),
    ("magnitude", LayerSpec(sparsity=0.5)),
], ids=["bitmask_w4", "nm_w3_asym", "bitmask_values"])
def test_sparse_formats_every_path(method, spec):
    m = _linear(spec, 32, 96, method=method)
    for path in ("reference", "dequant_cache", "int4pack"):
        if hfcompress.kernels.get_path(path).unsupported(m, CPU) is None:
            _check_within_bound(copy.deepcopy(m), path, torch.float32)


def test_released_codes_are_rebuilt_exactly():
    m = _linear(LayerSpec(bits=4, group_size=64), 40, 200)
    stored = {k: v.clone() for k, v in m.state_dict().items()}
    before = inference_nbytes(m)["stored"]
    set_inference_path(m, "int4pack")
    assert m._buffers["weight_packed"] is None and m._inference_state.released == ("weight_packed",)
    assert inference_nbytes(m)["stored"] < before  # the kernel layout is the only copy of the codes
    again = m.state_dict()
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)
    assert torch.equal(m.compressed_tensors()["weight_packed"], stored["weight_packed"])
    m.to(torch.float64)  # moving/casting gives the tensors back and prepares again at the next forward
    assert m._inference_state is None and torch.equal(m._buffers["weight_packed"], stored["weight_packed"])
    with torch.no_grad():
        m(torch.randn(1, 200, dtype=torch.float64))
    assert m._inference_state.path == "int4pack"
    fresh = _linear(LayerSpec(bits=4, group_size=64), 40, 200, seed=5)
    set_inference_path(fresh, "int4pack")
    fresh.load_state_dict(stored)  # loading into a module whose codes are released puts them back first
    assert fresh._inference_state is None and torch.equal(fresh._buffers["weight_packed"], stored["weight_packed"])


@pytest.mark.parametrize("bits,group,symmetric", [(2, 32, False), (6, None, True), (8, 64, False), (8, None, True)])
def test_release_round_trips_for_every_layout(bits, group, symmetric):
    for path in INT_PATHS:
        m = _linear(LayerSpec(bits=bits, group_size=group, symmetric=symmetric), 24, 72)
        if hfcompress.kernels.get_path(path).unsupported(m, CPU):
            continue
        stored = m._buffers["weight_packed"].clone()
        try:
            set_inference_path(m, path)
        except ValueError:
            continue
        assert m._buffers["weight_packed"] is None, path
        assert torch.equal(m.compressed_tensors()["weight_packed"], stored), path


@pytest.mark.parametrize("rows,cols", [(16, 32), (48, 96), (1536 // 8, 576 // 4), (32, 512)])
def test_int4_layout_inversion(rows, cols):
    convert = _converter("cpu", cols)
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(invert_nibble_layout(convert, convert(codes), rows, cols), codes)


def test_model_save_reload_with_fast_paths(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    hfcompress.compress(model, HfCompressConfig(bits=4, group_size=32, overrides=[{"targets": ["re:down_proj"], "bits": 8, "group_size": None}]))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    chosen = set_inference_path(model, "auto")
    assert {p for n, p in chosen.items() if "down_proj" in n} == {"int8pack"}
    assert {p for n, p in chosen.items() if "down_proj" not in n} == {"int4pack"}
    with torch.no_grad():
        fast = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, fast)  # the same kernels on the same reloaded tensors
        set_inference_path(again, "reference")
        ref = again(ids).logits
    assert (ref - fast).abs().max() <= 0.05 * ref.abs().max()
    assert set(inference_paths(again).values()) == {"reference"}


def test_autograd_uses_the_differentiable_reference():
    m = _linear(LayerSpec(bits=4, group_size=32), 32, 64)
    set_inference_path(m, "int4pack")
    x = torch.randn(3, 64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    w = m.dequantize_weight(torch.float32)
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1))
    assert torch.equal(y, torch.nn.functional.linear(x, w, m.bias))


def test_instance_level_decoding_override_is_respected():
    m = _linear(LayerSpec(bits=4, group_size=32), 32, 64)
    set_inference_path(m, "int4pack")
    m.__dict__["dequantize_weight"] = lambda dtype=torch.float32: torch.zeros(32, 64, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(m(torch.randn(2, 64)), m.bias.expand(2, -1))


def test_explicit_path_errors_leave_model_untouched():
    model = tiny_llama()
    hfcompress.compress(model, HfCompressConfig(bits=4, group_size=32))
    set_inference_path(model, "dequant_cache")
    with pytest.raises(ValueError, match="int8pack.*cannot run 14 of 14.*group_size=32"):
        set_inference_path(model, "int8pack")
    assert set(inference_paths(model).values()) == {"dequant_cache"}
    with pytest.raises(ValueError, match="path='fast' is not an inference path"):
        set_inference_path(model, "fast")
    with pytest.raises(ValueError, match="prefer='small'"):
        set_inference_path(model, "auto", prefer="small")
    with pytest.raises(ValueError, match="no compressed module"):
        set_inference_path(tiny_llama())
    only = set_inference_path(model, "reference", modules=["re:layers\\.0\\."])
    assert len(only) == 7 and set(only.values()) == {"reference"}
    assert set(inference_paths(model).values()) == {"reference", "dequant_cache"}


def test_default_path_applies_at_first_forward():
    previous = get_default_inference_path()
    try:
        set_default_inference_path("reference")
        m = _linear(LayerSpec(bits=4, group_size=32), 32, 64)
        assert inference_paths(m) == {"": "(at first forward)"}
        with torch.no_grad():
            m(torch.randn(1, 64))
        assert inference_paths(m) == {"": "reference"}
        set_default_inference_path("auto")
        m = _linear(LayerSpec(bits=4, group_size=32), 32, 64)
        with torch.no_grad():
            m(torch.randn(1, 64))
        assert inference_paths(m) == {"": "int4pack"}
        with pytest.raises(ValueError, match="not an inference path"):
            set_default_inference_path("int3")
    finally:
        set_default_inference_path(previous.path, previous.prefer)


def test_conv_decodes_once_or_on_use_and_embeddings_gather_rows():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    cc = CompressedConv2d(conv, LayerSpec(bits=4, group_size=None))
    cc.compress_(conv.weight)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert set_inference_path(cc, "auto") == {"": "dequant_cache"}
        cached = cc(x)
        assert set_inference_path(cc, "auto", prefer="memory") == {"": "reference"}
        assert torch.equal(cc(x), cached)
    with pytest.raises(ValueError, match="runs Linear layers"):
        set_inference_path(cc, "int4pack")
    for spec in (LayerSpec(bits=4, group_size=32), LayerSpec(bits=3, group_size=None, symmetric=False)):
        emb = nn.Embedding(50, 40)
        ce = CompressedEmbedding(emb, spec)
        ce.compress_(emb.weight)
        ids = torch.tensor([[3, 7, 3, 49], [0, 7, 7, 12]])
        with torch.no_grad():
            ref = ce(ids) if set_inference_path(ce, "reference") else None
            for prefer in ("speed", "memory"):
                assert set_inference_path(ce, "auto", prefer=prefer) == {"": "gather_rows"}
                assert torch.equal(ce(ids), ref)  # only rows 0, 3, 7, 12, 49 decoded, same values
        with pytest.raises(ValueError, match="runs Linear layers"):
            set_inference_path(ce, "int4pack")


def test_rtol_table_is_the_documented_one():
    assert RTOL[torch.bfloat16] == 2.0**-6 and RTOL[torch.float32] == 2.0**-16


def test_verification_rejects_a_wrong_kernel(monkeypatch):
    """What guards the GPU kernels (not runnable here): a prepared kernel that disagrees with the reference is
    refused and ``auto`` moves on; an explicit request fails."""
    from hfcompress.kernels import int4pack

    m = _linear(LayerSpec(bits=4, group_size=32), 32, 64)
    assert set_inference_path(m, "auto", verify=True) == {"": "int4pack"}  # the real kernel passes
    wrong = lambda x, w, g, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, g, sz) * 1.1  # noqa: E731
    monkeypatch.setattr(int4pack, "_mm", lambda device_type: wrong)
    assert set_inference_path(m, "auto", verify=True) == {"": "dequant_cache"}
    with pytest.raises(ValueError, match="disagrees with the reference"):
        set_inference_path(m, "int4pack", verify=True)
    assert set_inference_path(m, "int4pack") == {"": "int4pack"}  # unverified on the CPU by default
