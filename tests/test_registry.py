"""The one registry shape behind methods, formats and inference paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hfcompress.formats import FORMATS, format_for
from hfcompress.formats.base import WeightFormat
from hfcompress.kernels import PATHS, available_paths
from hfcompress.algorithms import METHODS, available_methods
from hfcompress.registry import Registry
from hfcompress.spec import LayerSpec


def test_lookup_errors_name_the_parameter_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"method='gtpq' is not a known method; choose one of \[.*'gptq'"):
        METHODS.get("gtpq")
    with pytest.raises(ValueError, match=r"format='bitmap' is not a known weight format; choose one of \['bitmask', 'nm', 'packed'\]"):
        FORMATS.get("bitmap")
    with pytest.raises(ValueError, match=r"path=3 is not a known inference path"):
        PATHS.get(3)


def test_builtins_load_on_first_lookup_and_every_listing_is_a_sorted_list():
    code = (
        "import sys\nfrom hfcompress.algorithms import METHODS\n"
        "assert 'hfcompress.algorithms.gptq' not in sys.modules\n"
        "METHODS.get('gptq')\nassert 'hfcompress.algorithms.gptq' in sys.modules\n"
        "assert 'hfcompress.algorithms.admm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for names in (available_methods(), FORMATS.names(), available_paths()):
        assert isinstance(names, list) and names == sorted(names) and names
    assert "auto" not in available_paths()


def test_names_are_registered_once():
    reg: Registry[int] = Registry("thing", "thing", reserved=("auto",))
    reg.register("a", 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="'auto' is already registered \\(or reserved\\)"):
        reg.register("auto", 3)
    with pytest.raises(ValueError, match="non-empty string name"):
        reg.register("", 4)
    assert reg.get("a") == 1 and "a" in reg and "b" not in reg and 5 not in reg


def test_format_choice_is_by_priority_not_import_order():
    """A format registered later with a higher priority wins; one without ``selects`` is only used by name."""
    assert format_for(LayerSpec(bits=4)) == "packed"
    assert format_for(LayerSpec(sparsity=0.5)) == "bitmask"
    assert format_for(LayerSpec(sparsity=0.5, sparsity_structure="2:4")) == "nm"
    assert format_for(LayerSpec(bits=4, sparsity=0.5, sparsity_structure="2:4")) == "nm"

    class Claims(WeightFormat):
        priority = 5

        def selects(self, spec):
            return spec.quantized

        def encode(self, cw, spec):
            raise NotImplementedError

        def decode(self, tensors, spec, shape2d, dtype):
            raise NotImplementedError

        def expected_tensors(self, shape2d, spec):
            return {}

    registry = Registry("weight format", "format")
    for name, fmt in FORMATS.items().items():
        registry.register(name, fmt)
    claims = Claims()
    claims.name = "claims"
    registry.register("claims", claims)
    assert format_for(LayerSpec(bits=4, sparsity=0.5), registry) == "bitmask"  # sparse formats (10) outrank it (5)
    assert format_for(LayerSpec(bits=4), registry) == "claims"  # it outranks packed (0)
    assert format_for(LayerSpec(bits=4)) == "packed"  # the real registry is untouched
