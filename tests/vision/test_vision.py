"""Vision models: Conv2d packing and sparsity axes (grouped/depthwise), image calibration, reload equality."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification, ConvNextConfig, ConvNextForImageClassification, ViTImageProcessor

import hfcompress
from hfcompress import CompressedConv2d, CompressedLinear, HfCompressConfig, LayerSpec, compressed_modules
from hfcompress.grid import quantize_rtn
from hfcompress.testing.models import tiny_resnet, tiny_vit
from hfcompress.modules import compressed_twin
from hfcompress.plan.targets import resolve_layers
from hfcompress.vision import image_calibration_batches

CONVS = {
    "dense3x3": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    "grouped": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
    "depthwise7x7": dict(in_channels=16, out_channels=16, kernel_size=7, padding=3, groups=16),
    "pointwise": dict(in_channels=16, out_channels=8, kernel_size=1),
    "strided_reflect": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=2, padding=(1, 2), padding_mode="reflect"),
}


def _reloaded_twin(conv, spec, twin):
    """A fresh twin built the way a checkpoint reload builds it: shapes from the stored tensors, then load."""
    state = twin.state_dict()
    fresh = compressed_twin(conv, spec)
    fresh.init_empty({k: (tuple(v.shape), v.dtype) for k, v in state.items() if k != "bias"}, device="cpu")
    fresh.load_state_dict(state)
    return fresh


def _conv(name, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(**CONVS[name])


def _tiny_convnext(seed=0):
    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)
    return ConvNextForImageClassification(cfg).eval()


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("bits,group_size", [(4, 16), (8, None), (3, 32)])
def test_conv_packing_is_exact_per_output_filter(name, bits, group_size):
    """Decoded weight == the shared grid's RTN of the [out, in/groups*kh*kw] rows, reshaped back; reload exact."""
    conv = _conv(name)
    spec = LayerSpec(bits=bits, group_size=group_size)
    twin = compressed_twin(conv, spec)
    twin.compress_(conv.weight)
    rows = conv.weight.detach().reshape(conv.out_channels, -1)
    q = quantize_rtn(rows, bits, group_size, spec.symmetric, torch.float16, clip=spec.clip)
    want = q.dequantize(torch.float32).reshape(conv.weight.shape)
    assert twin.shape2d == tuple(rows.shape)
    assert torch.equal(twin.dequantize_weight(torch.float32), want)
    n_groups = 1 if group_size is None else -(-rows.shape[1] // group_size)
    assert twin.weight_scale.shape == (conv.out_channels, n_groups)
    x = torch.randn(2, conv.in_channels, 9, 11, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode) if conv.padding_mode != "zeros" else x,
        want, conv.bias, conv.stride, 0 if conv.padding_mode != "zeros" else conv.padding, conv.dilation, conv.groups,
    )  # fmt: skip
    torch.testing.assert_close(twin(x), ref, rtol=0, atol=1e-5)
    assert torch.equal(_reloaded_twin(conv, spec, twin)(x), twin(x))


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_sparsity_runs_within_each_output_filter(name):
    """50% unstructured (magnitude, layer-wise): the largest half survives; 2:4: every 4 consecutive weights of a filter's
    flattened (in/groups, kh, kw) row keep at most 2; values kept are the dense ones (no quantization)."""
    conv = _conv(name)
    rows = conv.weight.detach().reshape(conv.out_channels, -1)
    cols = rows.shape[1]
    for structure in ("unstructured", "2:4"):
        spec = LayerSpec(sparsity=0.5, sparsity_structure=structure)
        twin = compressed_twin(conv, spec)
        twin.compress_(conv.weight, method="magnitude")
        w = twin.dequantize_weight(torch.float32).reshape(conv.out_channels, -1)
        kept = w != 0
        assert torch.equal(w[kept], rows[kept]), "sparse formats store the surviving values exactly"
        if structure == "unstructured":  # layer-wise magnitude: exactly half, the largest magnitudes survive
            assert int(kept.sum()) == rows.numel() - rows.numel() // 2
            assert rows.abs()[kept].min() >= rows.abs()[~kept].max()
        else:
            padded = torch.nn.functional.pad(kept, (0, -cols % 4)).reshape(conv.out_channels, -1, 4)
            assert int(padded.sum(-1).max()) <= 2
            # the survivors are the two largest magnitudes of each group of 4 (magnitude pruning)
            mags = torch.nn.functional.pad(rows.abs(), (0, -cols % 4)).reshape(conv.out_channels, -1, 4)
            full = mags[:, : cols // 4]
            top2 = full.topk(2, dim=-1).indices.sort(-1).values
            got = padded[:, : cols // 4].nonzero()[:, -1].reshape(conv.out_channels, cols // 4, 2)
            assert torch.equal(got, top2)
        fresh = _reloaded_twin(conv, spec, twin)
        assert torch.equal(fresh.dequantize_weight(torch.float32), twin.dequantize_weight(torch.float32))


def test_default_ignore_keeps_vision_stems_and_heads_dense():
    cfg = HfCompressConfig(bits=8, targets=["Linear", "Conv2d"])
    for model, stem in (
        (tiny_vit(), "vit.embeddings.patch_embeddings.projection"),
        (tiny_resnet(), "resnet.embedder.embedder.convolution"),
        (_tiny_convnext(), "convnext.embeddings.patch_embeddings"),
    ):
        plan = resolve_layers(model, cfg)
        assert stem not in plan and "classifier" not in plan, type(model).__name__
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n != stem]
        assert set(convs) <= set(plan)
    plan = resolve_layers(_tiny_convnext(), cfg)
    assert "convnext.encoder.stages.0.layers.0.dwconv" in plan  # depthwise 7x7, groups == channels


def _images(n=24, seed=0, size=32):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth random images (blurred noise) so the statistics are not white noise
    base = rng.normal(size=(n, size // 4, size // 4, 3))
    pics = [Image.fromarray(np.uint8(np.clip(np.kron(b, np.ones((4, 4, 1))) * 50 + 128, 0, 255))) for b in base]
    return datasets.Dataset.from_dict({"img": pics, "label": list(rng.integers(0, 10, n))}).cast_column(
        "img", datasets.Image()
    )


PROCESSOR = ViTImageProcessor(size={"height": 32, "width": 32})


def test_image_calibration_batches_are_seeded_and_validated():
    data = _images()
    a = image_calibration_batches(data, PROCESSOR, num_samples=10, batch_size=4, seed=3)
    b = image_calibration_batches(data, PROCESSOR, num_samples=10, batch_size=4, seed=3)
    c = image_calibration_batches(data, PROCESSOR, num_samples=10, batch_size=4, seed=4)
    assert [x["pixel_values"].shape[0] for x in a] == [4, 4, 2]
    assert a[0]["pixel_values"].shape[1:] == (3, 32, 32)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["pixel_values"], c[0]["pixel_values"])
    pil = image_calibration_batches(list(data["img"]), PROCESSOR, num_samples=100, batch_size=8)
    assert sum(x["pixel_values"].shape[0] for x in pil) == 24  # capped at the dataset size
    with pytest.raises(ValueError, match="image_processor"):
        image_calibration_batches(data, None)
    with pytest.raises(ValueError, match="image_column='nope'"):
        image_calibration_batches(data, PROCESSOR, image_column="nope")


def _relative_logit_error(model, dense, x):
    ref = dense(pixel_values=x).logits
    return ((model(pixel_values=x).logits - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "make",
    [pytest.param(tiny_vit, marks=pytest.mark.slow), pytest.param(tiny_resnet, marks=pytest.mark.slow), _tiny_convnext],
    ids=["vit", "resnet", "convnext"],
)
def test_oneshot_on_image_dataset_and_bitexact_reload(make, tmp_path):
    """GPTQ calibrated on an image dataset (through the processor) beats RTN on held-out images; the saved
    checkpoint reloads with plain from_pretrained to bit-identical logits."""
    data = _images(48)
    held_out = torch.cat([b["pixel_values"] for b in image_calibration_batches(_images(16, seed=9), PROCESSOR, num_samples=16)])
    dense = make()
    cfg = HfCompressConfig(method="gptq", bits=3, group_size=16, targets=["Linear", "Conv2d"])
    gptq = make()
    _, results = hfcompress.oneshot(
        gptq, cfg, data, image_processor=PROCESSOR, num_samples=48, batch_size=16, show_progress=False, return_results=True
    )
    mods = compressed_modules(gptq)
    assert set(mods) == set(resolve_layers(dense, cfg)) == set(results)
    assert all(r.nsamples > 0 for r in results.values()), "every layer saw calibration images"
    kinds = {type(m) for m in mods.values()}
    assert kinds <= {CompressedLinear, CompressedConv2d} and (CompressedConv2d in kinds or make is tiny_vit)
    rtn = make()
    hfcompress.compress(rtn, HfCompressConfig(method="rtn", bits=3, group_size=16, targets=["Linear", "Conv2d"]))
    assert _relative_logit_error(gptq, dense, held_out) < _relative_logit_error(rtn, dense, held_out)
    out = tmp_path / "q"
    gptq.save_pretrained(out)
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert torch.equal(reloaded(pixel_values=held_out).logits, gptq(pixel_values=held_out).logits)


def test_sparsegpt_2of4_on_convnext_depthwise_and_reload(tmp_path):
    data = _images(32)
    model = _tiny_convnext()
    cfg = HfCompressConfig(method="sparsegpt", sparsity=0.5, sparsity_structure="2:4", targets=["Linear", "Conv2d"])
    hfcompress.oneshot(model, cfg, data, image_processor=PROCESSOR, num_samples=32, batch_size=16, show_progress=False)
    dw = model.convnext.encoder.stages[1].layers[0].dwconv
    assert isinstance(dw, CompressedConv2d) and dw.groups == dw.in_channels == 32
    rows = dw.dequantize_weight(torch.float32).reshape(32, -1)  # 49 taps per filter: 12 full groups + 1
    groups = torch.nn.functional.pad(rows != 0, (0, 3)).reshape(32, -1, 4).sum(-1)
    assert int(groups.max()) <= 2 and int(groups[:, :12].min()) == 2
    out = tmp_path / "s"
    model.save_pretrained(out)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert torch.equal(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_oneshot_image_data_errors_leave_model_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HfCompressConfig(method="gptq", bits=4, group_size=16)
    with pytest.raises(ValueError, match="image processor"):
        hfcompress.oneshot(model, cfg, _images(8), show_progress=False)  # tiny model has no saved processor
    with pytest.raises(ValueError, match="image_column"):
        hfcompress.oneshot(model, cfg, _images(8), image_processor=PROCESSOR, image_column="pixels", show_progress=False)
    assert not compressed_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
