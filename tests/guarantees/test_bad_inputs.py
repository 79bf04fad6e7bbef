"""Attacks with wrong inputs: wrongly typed configs, unknown method arguments, data for another model, plain
torch modules, resumed runs with other data. Each is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.files import tree_hash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.testing.models import tiny_llama
from hfcompress.streaming import compress_checkpoint, partial_dir
from hfcompress.plan.targets import resolve_layers


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def _unchanged(model, before) -> bool:
    tensors, types = before
    now = model.state_dict()
    return tensors.keys() == now.keys() and all(torch.equal(tensors[k], now[k]) for k in now) and types == {
        n: type(m) for n, m in model.named_modules()
    }


# ---------------------------------------------------------------------------------------------- config types
def test_a_string_is_one_pattern_never_its_characters():
    cfg = HfCompressConfig(bits=4, ignore="q_proj", targets="Linear")
    assert cfg.ignore == ["q_proj"] and cfg.targets == ["Linear"]
    plan = resolve_layers(tiny_llama(tie_word_embeddings=False), cfg)
    assert not any(n.endswith("q_proj") for n in plan)
    assert any(n.endswith("k_proj") for n in plan) and any(n.endswith("o_proj") for n in plan)  # other *_proj kept
    assert "lm_head" in plan  # the list replaces the default ignore, as documented
    assert HfCompressConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=4.0), "bits"), (dict(bits="4"), "bits"), (dict(bits=True), "bits"), (dict(bits=4, group_size=64.0), "group_size"),
        (dict(bits=4, ignore=5), "ignore"), (dict(bits=4, targets=[1]), "targets"), (dict(bits=4, method_args="damp=0.1"), "method_args"),
        (dict(bits=4, symmetric="no"), "symmetric"), (dict(bits=4, scale_dtype=None), "scale_dtype"),
        (dict(bits=4, overrides={"targets": ["x"]}), "overrides"), (dict(bits=4, overrides=["x"]), "overrides"),
        (dict(bits=4, lossless=1), "lossless"), (dict(method=3, bits=4), "method"),
        (dict(method="magnitude", sparsity="0.5"), "sparsity"),
    ],  # fmt: skip
)
def test_wrong_types_raise_type_error_naming_the_field(kwargs, field):
    with pytest.raises(TypeError, match=field):
        HfCompressConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=4, method_args={"bogus": 1}), "takes no method_args"),
        (dict(method="magnitude", sparsity=0.5, method_args={"bogus": 1}), "unknown method_args"),
        (dict(method="gptq", bits=4, method_args={"dampp": 0.1}), "dampp"),
        (dict(method="sparsegpt", sparsity=0.5, method_args={"dampening": float("nan")}), "finite"),
        (dict(method="wanda", sparsity=0.5, method_args={"allocation": "best"}), "allocation"),
        (dict(method="magnitude", sparsity_structure="2:65"), "M <= 64"),
        (dict(method="magnitude", sparsity=float("nan")), "sparsity=nan"),
        (dict(bits=4, overrides=[{"targets": "re:down", "bits": 9}]), "bits=9"),
        (dict(bits=4, overrides=[{"targets": "re:down", "bitz": 8}]), "bitz"),
    ],
)
def test_everything_a_later_step_would_refuse_is_refused_when_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HfCompressConfig(**kwargs)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["bits", "group_size", "symmetric", "scale_dtype", "clip", "sparsity", "sparsity_structure",
                         "method", "method_args", "targets", "ignore", "overrides", "lossless", "lossless_decode"]),  # fmt: skip
        st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(allow_nan=True), st.text(max_size=6),
                  st.lists(st.text(max_size=4), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),  # fmt: skip
        max_size=5,
    )
)
def test_any_config_is_built_valid_or_refused_with_type_or_value_error(kwargs):
    try:
        cfg = HfCompressConfig(**kwargs)
    except (TypeError, ValueError):
        return
    again = HfCompressConfig.from_dict(cfg.to_dict())  # a valid config round-trips exactly
    assert again == cfg


# ---------------------------------------------------------------------------------------------- models and data
def test_plain_torch_modules_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    before = _state(model)
    for call in (lambda: hfcompress.compress(model, HfCompressConfig(bits=4)),
                 lambda: hfcompress.oneshot(model, HfCompressConfig(method="gptq", bits=4), dataset=torch.zeros(2, 4, dtype=torch.long))):  # fmt: skip
        with pytest.raises(TypeError, match="needs a transformers model"):
            call()
        assert _unchanged(model, before)


def test_a_failure_while_replacing_modules_restores_the_model(monkeypatch):
    from hfcompress import apply

    model = tiny_llama()
    before = _state(model)
    monkeypatch.setattr(apply, "mark_compressed", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        hfcompress.compress(model, HfCompressConfig(bits=4, group_size=32))
    assert _unchanged(model, before)


def test_a_failure_during_calibration_restores_the_model(monkeypatch):
    from hfcompress.algorithms import get_method

    model = tiny_llama()
    before = _state(model)
    calls = []
    real = get_method("gptq").compress_layer

    def fail_late(w, stats, spec, args):
        calls.append(1)
        if len(calls) > 9:  # a few layers in, in the second block
            raise RuntimeError("out of memory")
        return real(w, stats, spec, args)

    object.__setattr__(get_method("gptq"), "compress_layer", fail_late)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            hfcompress.oneshot(model, HfCompressConfig(method="gptq", bits=4, group_size=32),
                               dataset=torch.randint(0, 256, (2, 16)), show_progress=False)  # fmt: skip
    finally:
        object.__setattr__(get_method("gptq"), "compress_layer", real)
    assert _unchanged(model, before)


@pytest.mark.parametrize("ids", [torch.full((2, 8), 256), torch.full((2, 8), -1), torch.rand(2, 8)])
def test_token_ids_the_model_cannot_embed_are_refused(ids):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises((ValueError, TypeError), match="vocabulary|token ids"):
        hfcompress.oneshot(model, HfCompressConfig(method="gptq", bits=4), dataset=ids, show_progress=False)
    assert _unchanged(model, before)


def test_compeft_refuses_non_finite_values():
    from hfcompress.peft.deltas import compress_delta

    with pytest.raises(ValueError, match="finite"):
        compress_delta({"a": torch.randn(4, 4)}, "compeft", 0.5, alpha=float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        compress_delta({"a": torch.tensor([1.0, float("inf")])}, "dare", 0.5)


# ---------------------------------------------------------------------------------------------- resumed runs
def test_a_resumed_stream_refuses_other_calibration_data(tiny_dense_dir, tmp_path, monkeypatch):
    from hfcompress.streaming import run as stream_run

    ids = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = HfCompressConfig(method="gptq", bits=4, group_size=32)
    out = tmp_path / "out"
    real = stream_run._calibrate_block
    calls = []

    def crash_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # killed after the first block was written
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_run, "_calibrate_block", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(tiny_dense_dir, out, cfg, ids, show_progress=False, batch_size=2)
    monkeypatch.setattr(stream_run, "_calibrate_block", real)
    assert partial_dir(out).is_dir() and not out.exists()
    work = tree_hash(partial_dir(out))
    for other in (ids.flip(1), ids.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor([7]))):
        with pytest.raises(ValueError, match="different settings"):
            compress_checkpoint(tiny_dense_dir, out, cfg, other, show_progress=False, batch_size=2)
        assert tree_hash(partial_dir(out)) == work  # the unfinished run is kept
    with pytest.raises(ValueError, match="different settings"):  # the same data batched differently
        compress_checkpoint(tiny_dense_dir, out, cfg, ids, show_progress=False, batch_size=4)
    done = compress_checkpoint(tiny_dense_dir, out, cfg, ids, show_progress=False, batch_size=2)  # same: resumes
    fresh = compress_checkpoint(tiny_dense_dir, tmp_path / "fresh", cfg, ids, show_progress=False, batch_size=2)
    from safetensors.torch import load_file

    a, b = load_file(done / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_compress_refuses_an_already_compressed_folder(tiny_dense_dir, tmp_path):
    from hfcompress.cli import main

    compressed = tmp_path / "c"
    assert main(["compress", str(tiny_dense_dir), "-o", str(compressed), "--bits", "4", "-q"]) == 0
    before = tree_hash(tmp_path)
    assert main(["compress", str(compressed), "-o", str(tmp_path / "again"), "--bits", "8", "-q"]) == 2
    assert tree_hash(tmp_path) == before


def test_a_copy_of_the_model_is_not_needed_to_recover(tiny_dense_dir):
    """compress() on a model whose config cannot be compressed leaves it usable as it was."""
    model = tiny_llama()
    clone = copy.deepcopy(model)
    with pytest.raises(ValueError, match="matches no module"):
        hfcompress.compress(model, HfCompressConfig(bits=4, targets=["re:nothing"]))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clone(ids).logits)
