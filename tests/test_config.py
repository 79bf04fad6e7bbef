"""HfCompressConfig: shortest forms, validation errors, exact JSON round trip, target resolution."""

import json

import pytest
from transformers import AutoConfig
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hfcompress
from hfcompress import HfCompressConfig, HfCompressQuantizer, LayerSpec
from hfcompress.testing.models import tiny_llama, tiny_resnet, tiny_vit
from hfcompress.plan.targets import resolve_layers


def test_registered_with_transformers():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hfcompress"] is HfCompressConfig
    assert AUTO_QUANTIZER_MAPPING["hfcompress"] is HfCompressQuantizer


def test_shortest_form_defaults():
    c = HfCompressConfig(bits=4, group_size=128)
    assert (c.method, c.symmetric, c.targets, c.ignore) == ("rtn", True, ["Linear"], None)
    assert c.default_spec() == LayerSpec(bits=4, group_size=128)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=4, group_size=64, symmetric=False, scale_dtype="bfloat16", clip="mse"),
        dict(bits=3, group_size=None, targets=["Linear", "re:mlp"], ignore=["lm_head", "re:layers\\.0\\."]),
        dict(bits=4, overrides=[{"targets": ["re:down_proj"], "bits": 8, "group_size": None}]),
    ],
)
def test_json_round_trip_is_exact(tmp_path, kwargs):
    c = HfCompressConfig(**kwargs)
    again = HfCompressConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.to_dict() == c.to_dict()
    # through a model config.json as transformers writes it
    model_cfg = tiny_llama().config
    model_cfg.quantization_config = c
    model_cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path).quantization_config
    assert HfCompressConfig.from_dict(loaded) == c


def test_group_size_minus_one_means_per_channel():
    assert HfCompressConfig(bits=8, group_size=-1).group_size is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=7), "bits=7"),
        (dict(bits=1), "bits=1"),
        (dict(bits=4, group_size=0), "group_size=0"),
        (dict(bits=4, group_size=12.5), "group_size=12.5"),
        (dict(bits=4, scale_dtype="int8"), "scale_dtype='int8'"),
        (dict(bits=4, clip="max"), "clip='max'"),
        (dict(), "compress nothing"),
        (dict(bits=4, method="nope"), "method='nope'"),
        (dict(bits=4, targets=["LayerNorm"]), "LayerNorm"),
        (dict(bits=4, targets=["re:("]), "regular expression"),
        (dict(bits=4, sparsity=0.5), "does not prune"),
        (dict(bits=4, sparsity=1.0), "sparsity=1.0"),
        (dict(bits=4, sparsity_structure="4:2"), "0 <= N < M"),
        (dict(bits=4, overrides=[{"bits": 8}]), "overrides\\[0\\]"),
        (dict(bits=4, overrides=[{"targets": ["Linear"], "bitz": 8}]), "bitz"),
        (dict(bits=4, overrides=[{"targets": ["Linear"], "bits": 9}]), "bits=9"),
        (dict(bits=4, colour="red"), "colour"),
    ],
)
def test_validation_errors_name_the_parameter(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HfCompressConfig(**kwargs)


def test_resolve_default_keeps_heads_dense():
    plan = resolve_layers(tiny_llama(), HfCompressConfig(bits=4))
    assert "lm_head" not in plan and len(plan) == 2 * 7
    vit = resolve_layers(tiny_vit(), HfCompressConfig(bits=4, targets=["Linear", "Conv2d"]))
    assert "classifier" not in vit and not any("patch_embeddings" in n for n in vit)
    resnet = resolve_layers(tiny_resnet(), HfCompressConfig(bits=4, targets=["Conv2d"]))
    assert resnet and not any(n.endswith("embedder.embedder.convolution") for n in resnet)


def test_overrides_first_match_wins_and_inherit():
    cfg = HfCompressConfig(bits=4, group_size=32, overrides=[{"targets": ["re:down_proj$"], "bits": 8}])
    plan = resolve_layers(tiny_llama(), cfg)
    assert plan["model.layers.0.mlp.down_proj"] == LayerSpec(bits=8, group_size=32)
    assert plan["model.layers.0.mlp.up_proj"] == LayerSpec(bits=4, group_size=32)


def test_config_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(tiny_llama(), HfCompressConfig(bits=4, targets=["re:does_not_exist"]))


def test_tied_embedding_cannot_be_compressed_alone():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        resolve_layers(tiny_llama(), HfCompressConfig(bits=4, targets=["Embedding"]))
    untied = tiny_llama(tie_word_embeddings=False)
    assert "model.embed_tokens" in resolve_layers(untied, HfCompressConfig(bits=4, targets=["Embedding"]))


def test_public_names_are_exported():
    for name in ("HfCompressConfig", "HfCompressQuantizer", "compress", "compression_report", "LayerSpec"):
        assert hasattr(hfcompress, name)
