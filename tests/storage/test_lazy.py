"""Deferred decoding of lossless checkpoints (``lossless_decode="lazy"`` / ``"first_forward"``): same bits as on load."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the quantizer)
from hfcompress import HfCompressConfig, compressed_modules
from hfcompress.integrity import IntegrityError
from hfcompress.lossless import LosslessFormatError
from hfcompress import materialize  # the public name
from hfcompress.storage.lazy import deferred

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
MODES = ("lazy", "first_forward")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def load(path, mode: str | None = None, **kwargs):
    if mode is not None:
        kwargs["quantization_config"] = HfCompressConfig(lossless=True, lossless_decode=mode)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def safetensors_content(path) -> tuple[dict, bytes]:
    """(parsed header, data bytes) of a safetensors file (the header's JSON key order is not deterministic)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), k


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


@pytest.fixture(scope="module")
def eager(lossless_dir):
    return load(lossless_dir)


@pytest.fixture(scope="module")
def eager_logits(eager):
    with torch.no_grad():
        return eager(IDS).logits


# ------------------------------------------------------------------------------------------------- config
def test_config_field_validates_and_round_trips(tmp_path):
    assert HfCompressConfig(lossless=True).lossless_decode == "load"
    cfg = HfCompressConfig(lossless=True, lossless_decode="lazy")
    assert cfg.to_dict()["lossless_decode"] == "lazy"
    assert HfCompressConfig.from_dict(cfg.to_dict()) == cfg
    assert HfCompressConfig.from_dict({"quant_method": "hfcompress", "lossless": True}).lossless_decode == "load"
    with pytest.raises(ValueError, match=r"lossless_decode='eager' is not supported; use one of \('load', 'lazy', 'first_forward'\)"):
        HfCompressConfig(lossless=True, lossless_decode="eager")
    with pytest.raises(ValueError, match="lossless_decode='lazy' only applies to lossless checkpoints; set lossless=True"):
        HfCompressConfig(bits=4, lossless_decode="lazy")


def test_saved_config_keeps_the_choice_and_from_pretrained_overrides_it(lossless_dir, tmp_path):
    model = load(lossless_dir, "lazy")
    assert model.config.quantization_config.lossless_decode == "lazy"
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["lossless_decode"] == "lazy"
    again = load(tmp_path / "out")  # the saved choice applies
    assert deferred(again)
    eager = load(tmp_path / "out", "load")  # a config passed to from_pretrained overrides the loading attribute
    assert not deferred(eager) and not is_placeholder(eager.model.layers[0].mlp.up_proj.weight)


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("mode", MODES)
def test_deferred_load_holds_payloads_not_weights(lossless_dir, mode):
    model = load(lossless_dir, mode)
    pending = deferred(model)
    up = model.model.layers[0].mlp.up_proj.weight
    assert "model.layers.0.mlp.up_proj.weight" in pending and is_placeholder(up)
    assert up.shape == (256, 128) and up.dtype == torch.bfloat16 and up.device.type == "cpu"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.isnan(up).all()  # read outside a forward: NaN, never plausible wrong values
    raw = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(pending[k] for k in pending if not k.startswith("lm_head")) < 0.9 * raw


@pytest.mark.parametrize("mode", MODES)
def test_outputs_are_bit_identical_to_eager(lossless_dir, eager_logits, mode):
    model = load(lossless_dir, mode)
    with torch.no_grad():
        first = model(IDS).logits
    with torch.inference_mode():
        second = model(IDS).logits
    assert torch.equal(first, eager_logits) and torch.equal(second, eager_logits)
    up = model.model.layers[0].mlp.up_proj.weight
    assert not up.is_inference()
    if mode == "lazy":  # decoded for each forward, then released: the model holds payloads again
        assert is_placeholder(up) and "model.layers.0.mlp.up_proj.weight" in deferred(model)
    else:  # decoded once and kept, payloads and hooks gone
        assert not is_placeholder(up) and not deferred(model)
        assert not model.model.layers[0].mlp.up_proj._forward_pre_hooks


def test_lazy_keeps_weights_while_autograd_needs_them(lossless_dir, eager):
    model = load(lossless_dir, "lazy")
    up = model.model.layers[0].mlp.up_proj.weight
    assert not up.requires_grad  # deferred parameters are frozen
    loss = model(IDS).logits.float().square().mean()  # grad mode: plain (uncoded) norm weights need gradients
    assert not is_placeholder(up)  # the graph holds the decoded weight
    loss.backward()
    ref = eager(IDS).logits.float().square().mean()
    eager.zero_grad()
    ref.backward()
    assert torch.equal(loss.detach(), ref.detach())
    got, want = model.model.norm.weight.grad, eager.model.norm.weight.grad
    assert got is not None and torch.equal(got, want)
    with torch.no_grad():
        model(IDS)
    assert is_placeholder(up)  # released by the next forward without a graph
    eager.zero_grad()


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_and_save_match_eager(lossless_dir, eager, tmp_path, mode):
    model = load(lossless_dir, mode)
    assert_same_state(model, eager)  # state_dict() decodes deferred tensors
    eager.save_pretrained(tmp_path / "eager")
    model.save_pretrained(tmp_path / "before")  # payloads written as loaded
    with torch.no_grad():
        model(IDS)
    model.save_pretrained(tmp_path / "after")
    want = safetensors_content(tmp_path / "eager" / "model.safetensors")
    assert safetensors_content(tmp_path / "before" / "model.safetensors") == want
    assert safetensors_content(tmp_path / "after" / "model.safetensors") == want


def test_materialize_turns_a_lazy_model_into_an_eager_one(lossless_dir, eager, eager_logits):
    model = load(lossless_dir, "lazy")
    materialize(model)
    assert not deferred(model)
    assert not any(is_placeholder(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_state(model, eager)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, eager_logits)


def test_wider_dtype_decodes_to_the_same_values(lossless_dir, tmp_path):
    eager = load(lossless_dir, dtype=torch.float32)
    model = load(lossless_dir, "lazy", dtype=torch.float32)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, eager(IDS).logits)
    eager.save_pretrained(tmp_path / "eager")
    model.save_pretrained(tmp_path / "lazy")  # float32 tensors: coded again from the decoded values
    assert safetensors_content(tmp_path / "lazy" / "model.safetensors") == safetensors_content(
        tmp_path / "eager" / "model.safetensors"
    )


def test_quantized_modules_decode_on_load_dense_tensors_defer(dense_dir, tmp_path):
    cfg = HfCompressConfig(bits=4, group_size=64, lossless=True)
    AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=cfg).save_pretrained(tmp_path / "w4")
    eager = load(tmp_path / "w4")
    model = load(tmp_path / "w4", "lazy")
    assert compressed_modules(model)
    pending = deferred(model)
    assert "model.embed_tokens.weight" in pending  # the dense, tied embedding
    assert not any(".weight_packed" in k or ".weight_scale" in k for k in pending)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, eager(IDS).logits)
    assert_same_state(model, eager)


def test_bad_payload_is_refused_at_load_in_deferred_modes(lossless_dir, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "damaged"
    shutil.copytree(lossless_dir, path)
    key = "model.layers.0.self_attn.q_proj.weight_lossless"
    file = path / "model.safetensors"
    with safe_open(file, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[key] = tensors[key].clone()
    tensors[key][-7] ^= 0x10  # in the data of the last chunk: only a checksum of the stored bytes sees it
    save_file(tensors, file, metadata=meta)
    for mode in MODES:
        with pytest.raises(IntegrityError, match=rf"{key}' fails its checksum"):  # the file-level checksum, first
            load(path, mode)
        # behind it, the payload's own chunk checksums refuse it too
        with pytest.raises(LosslessFormatError, match=rf"{key}: chunk \d+ .* fails its checksum"):
            load(path, quantization_config=HfCompressConfig.loading(lossless_decode=mode, verify_checksums=False))


def test_lazy_model_saves_over_its_own_checkpoint(lossless_dir, eager, tmp_path):
    import shutil

    path = tmp_path / "same"
    shutil.copytree(lossless_dir, path)
    model = load(path, "lazy")  # payloads are mapped from path/model.safetensors
    model.save_pretrained(path)  # ...which this rewrites: payloads are copied before writing
    assert_same_state(load(path, "load"), eager)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, eager(IDS).logits)


def test_generate_matches_eager(lossless_dir, eager):
    model = load(lossless_dir, "lazy")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:1, :8], **kwargs), eager.generate(IDS[:1, :8], **kwargs))
    assert deferred(model)  # every step decoded and released again


def test_deferred_decoding_asked_of_a_checkpoint_without_the_stage_is_ignored(dense_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=HfCompressConfig(bits=4)).save_pretrained(tmp_path / "w4")
    with pytest.warns(UserWarning, match="lossless_decode='lazy' is ignored: this checkpoint has no lossless stage"):
        model = load(tmp_path / "w4", "lazy")
    assert model.config.quantization_config.lossless_decode == "load" and not deferred(model)
    model.save_pretrained(tmp_path / "again")  # the saved config stays valid
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "again").config.quantization_config.lossless is False
