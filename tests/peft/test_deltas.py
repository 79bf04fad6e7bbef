"""ComPEFT / DARE compressed deltas: exact selection, file round trips, compressed adapters, task vectors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from hfcompress import HfCompressConfig, compress
from hfcompress import peft as hpeft
from hfcompress.testing.models import tiny_llama
from hfcompress.modules import compressed_modules

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_compeft_keeps_exactly_the_largest_entries_as_ternary():
    t = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    c = hpeft.compeft(t, density=0.2)
    k = round(0.2 * t.numel())
    assert c.kept == k
    d = c.decode()
    assert set(d.unique().tolist()) == {-c.scale, 0.0, c.scale}
    kept = d != 0
    assert t.abs()[kept].min() >= t.abs()[~kept].max()  # the top-k by magnitude
    assert torch.equal(torch.sign(d[kept]), torch.sign(t[kept]))
    assert c.scale == pytest.approx(t.abs()[kept].mean().item(), rel=1e-6)  # least-squares scale
    # the least-squares scale beats any other scale for these signs
    err = (d - t).norm()
    for f in (0.8, 1.25):
        assert err < (d * f - t).norm()
    paper = hpeft.compeft(t, density=0.2, alpha=2.0)
    assert paper.scale == pytest.approx(2.0 * t.std().item(), rel=1e-6)


def test_dare_is_unbiased_and_rescales():
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    first = hpeft.dare(t, density=0.25, generator=g)
    kept = first.mask.reshape(t.shape)
    assert torch.equal(first.decode()[kept], t[kept] / 0.25)
    assert abs(first.kept / t.numel() - 0.25) < 0.03
    mean = sum(hpeft.dare(t, density=0.25, generator=g).decode() for _ in range(400)) / 400
    assert (mean - t).abs().mean() < 0.1 * t.abs().mean()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 19), min_size=1, max_size=3),
    density=st.floats(0.01, 1.0),
    method=st.sampled_from(["compeft", "dare"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_delta_file_round_trip_is_exact(tmp_path_factory, shape, density, method, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {"x.lora_A.weight": torch.randn(shape, generator=g).to(dtype), "y": torch.randn(7, generator=g).to(dtype)}
    delta = hpeft.compress_delta(tensors, method, density, seed=seed)
    path = tmp_path_factory.mktemp("delta") / "d.safetensors"
    delta.save(path)
    back = hpeft.CompressedDelta.load(path)
    assert back.method == method and back.params == delta.params
    for name, t in tensors.items():
        a, b = delta.tensors[name].decode(), back.tensors[name].decode()
        assert a.dtype == b.dtype == dtype and tuple(b.shape) == tuple(t.shape)
        assert torch.equal(a, b)


def test_delta_files_are_small_and_damage_is_caught(tmp_path):
    t = {"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(0))}
    delta = hpeft.compress_delta(t, "compeft", 0.1)
    path = delta.save(tmp_path / "d.safetensors")
    dense = tmp_path / "dense.safetensors"
    save_file(t, dense)
    assert path.stat().st_size < dense.stat().st_size / 20  # < 1.6 bits per entry all included
    assert delta.stats()["bits_per_entry"] == pytest.approx(1.1, abs=0.01)
    # damaged mask
    raw = load_file(path)
    raw["w.mask"] = raw["w.mask"][:-3]
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(raw, bad, metadata=meta)
    with pytest.raises(ValueError, match="mask of 'w'"):
        hpeft.CompressedDelta.load(bad)
    save_file(load_file(path), bad, metadata={**meta, "format": "other"})
    with pytest.raises(ValueError, match="not an hfcompress delta"):
        hpeft.CompressedDelta.load(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="zip"), "method"),
        (dict(density=0), "density"),
        (dict(density=1.5), "density"),
        (dict(alpha=-1.0), "alpha"),
    ],
)
def test_compress_delta_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hpeft.compress_delta({"w": torch.randn(4, 4)}, **kwargs)
    with pytest.raises(ValueError, match="floating"):
        hpeft.compress_delta({"w": torch.arange(4)})


@pytest.mark.parametrize("method", ["compeft", "dare"])
def test_compressed_adapter_round_trip(method, tmp_path):
    cfg = HfCompressConfig(method="magnitude", sparsity=0.5, bits=4, group_size=32)
    model = tiny_llama()
    compress(model, cfg)
    lora = hpeft.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    delta = hpeft.save_compressed_adapter(lora, tmp_path / "ad", method=method, density=0.3)
    files = {p.name for p in (tmp_path / "ad").iterdir()}
    assert hpeft.COMPRESSED_ADAPTER_FILE in files and "adapter_config.json" in files
    assert "adapter_model.safetensors" not in files
    fresh = tiny_llama()
    compress(fresh, cfg)
    loaded = hpeft.load_compressed_adapter(fresh, tmp_path / "ad")
    state = get_peft_model_state_dict(loaded)
    decoded = delta.decode()
    assert state.keys() == decoded.keys() and all(torch.equal(state[k], decoded[k]) for k in decoded)
    # same outputs as the original adapter with its tensors replaced by the decoded ones
    set_peft_model_state_dict(lora, decoded)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    lora.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lora(ids).logits)


def test_task_vector_on_a_sparse_base_keeps_the_mask():
    base = tiny_llama(seed=0)
    tuned = tiny_llama(seed=0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "proj" in n or "norm" in n:
                p.add_(torch.randn_like(p) * 1e-3)
    tv = hpeft.task_vector(tuned, base)
    assert tv and all(n.endswith("weight") for n in tv)
    # dense base + task vector = finetuned
    target = tiny_llama(seed=0)
    hpeft.apply_task_vector(target, tv)
    for (n, p), (_, q) in zip(target.named_parameters(), tuned.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # compressed sparse base: the update lands on kept weights only, compressed with ComPEFT
    sparse = tiny_llama(seed=0)
    compress(sparse, HfCompressConfig(method="magnitude", sparsity=0.5))
    masks = hpeft.sparsity_masks(sparse)
    before = {n: m.dequantize_weight() for n, m in compressed_modules(sparse).items()}
    report = hpeft.apply_task_vector(sparse, hpeft.compress_delta(tv, "compeft", 0.5))
    assert report.masks_preserved and len(report.layers) == 14
    after = hpeft.sparsity_masks(sparse)
    assert all(torch.equal(after[k], masks[k]) for k in masks)
    changed = sum(int((m.dequantize_weight() != before[n]).sum()) for n, m in compressed_modules(sparse).items())
    assert changed > 0
    with pytest.raises(ValueError, match="not weights of the model"):
        hpeft.apply_task_vector(sparse, {"nope.weight": torch.zeros(1)})
