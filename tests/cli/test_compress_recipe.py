"""YAML recipes map 1:1 onto HfCompressConfig."""

from __future__ import annotations

import pytest
import yaml

from hfcompress import HfCompressConfig
from hfcompress.recipes import config_from_recipe, load_recipe, recipe_from_config, recipe_to_yaml, save_recipe

CONFIGS = [
    HfCompressConfig(bits=4, group_size=128),
    HfCompressConfig(bits=8, group_size=None, symmetric=False, scale_dtype="bfloat16", clip="mse"),
    HfCompressConfig(
        bits=4, group_size=64, targets=["Linear", "re:embed"], ignore=["lm_head"],
        overrides=[{"targets": ["re:mlp\\.down_proj$"], "bits": 8, "group_size": None}],
    ),  # fmt: skip
]


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_through_a_file(config, tmp_path):
    path = save_recipe(config, tmp_path / "recipe.yaml")
    assert load_recipe(path) == config
    assert yaml.safe_load(path.read_text()) == config.to_dict() == recipe_from_config(config)
    assert list(yaml.safe_load(recipe_to_yaml(config))) == ["quant_method", *HfCompressConfig._FIELDS]


def test_short_recipe_uses_config_defaults():
    assert config_from_recipe({"bits": 4}) == HfCompressConfig(bits=4)
    assert config_from_recipe({"bits": 4, "group_size": -1}) == HfCompressConfig(bits=4, group_size=None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("bits: 4\ngroupsize: 32\n", "unknown key(s) ['groupsize']"),
        ("bits: 7\n", "bits=7"),
        ("- bits: 4\n", "must be a YAML mapping"),
        ("quant_method: gptq\nbits: 4\n", "quant_method='gptq'"),
        ("bits: [4\n", "not valid YAML"),
        ("bits: 4\noverrides:\n  - bits: 8\n", "overrides[0]"),
    ],
)
def test_bad_recipes_name_the_problem(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    assert message in str(err.value) and "bad.yaml" in str(err.value)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(TypeError, match="HfCompressConfig"):
        recipe_from_config({"bits": 4})


def test_save_is_atomic(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("old")
    save_recipe(HfCompressConfig(bits=4), path)
    assert load_recipe(path) == HfCompressConfig(bits=4)
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]
