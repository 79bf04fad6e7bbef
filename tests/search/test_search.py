"""Size-budgeted search (tiny Llama, fast): budgets, exact byte accounting, the database, the search's invariants."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from hfcompress import HfCompressConfig, compress
from hfcompress.plan.targets import resolve_layers
from hfcompress.search import (
    build_level_database,
    evolutionary_search,
    greedy_allocation,
    model_bytes,
    parse_budget,
    parse_level,
    search_allocation,
    stored_bytes,
)
from hfcompress.spec import LayerSpec
from hfcompress.testing.models import tiny_llama

LEVELS = ["w2g32", "w3g32", "w4g32", "w8g32"]
CONFIG = HfCompressConfig(bits=4, group_size=32)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def data():
    return torch.randint(0, 256, (24, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def db(model):
    return build_level_database(model, CONFIG, LEVELS, show_progress=False)


def checkpoint_tensor_bytes(folder) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                total += torch.empty((), dtype=getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "U8": "uint8", "I64": "int64", "I32": "int32"}[t.get_dtype()])).element_size() * int(torch.tensor(t.get_shape()).prod())
    return total


def test_budgets_parse_to_bytes(model):
    sizes = model_bytes(model, list(resolve_layers(model, CONFIG)))
    assert parse_budget("16bits", sizes).nbytes == sizes.params * 2 == parse_budget(1.0, sizes).nbytes
    assert parse_budget("1MB", sizes).nbytes == 10**6 and parse_budget("1MiB", sizes).nbytes == 2**20
    assert parse_budget(10**6, sizes).nbytes == 10**6
    for bad, error in ((True, TypeError), (0.0, ValueError), (1.5, ValueError), ("3.5 bytes", ValueError), ("1KB", ValueError)):
        with pytest.raises(error, match="budget"):
            parse_budget(bad, sizes)


def test_levels_parse():
    base = LayerSpec(bits=4, group_size=128, symmetric=False)
    assert parse_level("w3g64", base) == LayerSpec(bits=3, group_size=64, symmetric=False)
    assert parse_level("W8", base).group_size is None
    with pytest.raises(ValueError, match="w<bits>g<group size>"):
        parse_level("int4", base)
    with pytest.raises(ValueError, match="bits"):
        parse_level("w7g64", base)


def test_stored_bytes_are_what_save_pretrained_writes(model, db, tmp_path):
    """The accounting of every searched level assignment is exact: the saved tensors weigh what it says."""
    assignment = {n: i % len(LEVELS) for i, n in enumerate(db.names)}  # every level used
    config, _ = __import__("hfcompress.plan.allocation", fromlist=["x"]).config_with_layer_specs(model, CONFIG, db.specs(assignment))
    import copy

    work = copy.deepcopy(model)
    compress(work, config)
    work.save_pretrained(tmp_path / "mixed")
    assert checkpoint_tensor_bytes(tmp_path / "mixed") == db.total_bytes(assignment)
    spec = LayerSpec(bits=3, group_size=32, symmetric=False)
    assert stored_bytes(spec, (96, 160)) == 96 * 60 + 96 * 5 * 2 + 96 * 2 + 16  # codes, fp16 scales, zero points, shape


def test_database_holds_each_module_at_each_level(model, db):
    assert db.levels == LEVELS  # cheapest first
    plan = resolve_layers(model, CONFIG)
    assert sorted(db.names) == sorted(plan)
    for level in LEVELS:
        assert {m.spec.bits for m in db.modules[level].values()} == {int(level[1])}
    # more bits, less error, for every module
    for name in db.names:
        errors = [db.errors[level][name] for level in LEVELS]
        assert errors == sorted(errors, reverse=True) and errors[-1] > 0


def test_greedy_allocation_fits_and_spends_the_budget(db):
    sizes = db.sizes
    budget = parse_budget(sizes.fixed + (db.total_bytes(db.uniform(1)) + db.total_bytes(db.uniform(2))) // 2 - sizes.fixed, sizes)
    assignment = greedy_allocation(db, budget)
    total = db.total_bytes(assignment)
    assert db.total_bytes(db.uniform(1)) < total <= budget.nbytes
    cheapest_step = min(db.nbytes[LEVELS[i + 1]][n] - db.nbytes[LEVELS[i]][n] for n in db.names for i in range(3))
    assert budget.nbytes - total < cheapest_step * 4  # nothing left that a further upgrade could use (near enough)
    with pytest.raises(ValueError, match="below the smallest checkpoint"):
        greedy_allocation(db, parse_budget(db.total_bytes(db.uniform(0)) - 1, sizes))


def test_search_fits_improves_on_its_start_and_is_reproducible(model, db, data):
    budget = parse_budget((db.total_bytes(db.uniform(1)) + db.total_bytes(db.uniform(2))) // 2, db.sizes)
    runs = [evolutionary_search(model, CONFIG, db, budget, data[16:], generations=6, offspring=6, seed=s, show_progress=False) for s in (0, 0, 1)]
    first = runs[0]
    assert first.nbytes <= budget.nbytes and first.kl <= first.baseline_kl
    assert first.history == sorted(first.history, reverse=True)  # the parent never gets worse
    assert runs[1].levels == first.levels and runs[1].kl == first.kl  # same seed, same result
    # the result is an ordinary config: it gives every module its level, and compresses to the accounted size
    plan = resolve_layers(model, first.config)
    assert {n: plan[n] for n in first.layer_specs} == first.layer_specs
    assert first.uniform is not None and first.uniform[0] == "w3g32"


def test_search_allocation_end_to_end_and_database_reuse(model, data):
    result = search_allocation(model, CONFIG, 0.8, data, levels=LEVELS, num_samples=16, fitness_samples=8, seq_len=64,
                               fitness_seq_len=32, generations=3, offspring=4, show_progress=False)  # fmt: skip
    assert result.nbytes <= result.budget.nbytes and result.seconds["database"] > 0
    gptq = HfCompressConfig(method="gptq", bits=4, group_size=32)
    db = build_level_database(model, gptq, ["w3g32", "w4g32"], [{"input_ids": data[:8]}], show_progress=False)
    middle = (db.total_bytes(db.uniform(0)) + db.total_bytes(db.uniform(1))) // 2
    for budget in (middle, f"{8 * middle / db.sizes.params:.4f}bits"):
        again = search_allocation(model, gptq, budget, data, database=db, num_samples=8,
                                  fitness_samples=8, seq_len=64, fitness_seq_len=32, generations=2, offspring=4, show_progress=False)  # fmt: skip
        assert again.seconds["database"] == 0 and set(again.levels.values()) <= {"w3g32", "w4g32"}
    with pytest.raises(ValueError, match="database was built for other modules"):
        search_allocation(model, HfCompressConfig(bits=4, targets=["re:mlp"]), 0.8, data, database=db, num_samples=8, fitness_samples=8, seq_len=64, fitness_seq_len=32, show_progress=False)


def test_bad_search_arguments_are_refused_before_work(model, data):
    with pytest.raises(ValueError, match="at least two levels"):
        build_level_database(model, CONFIG, ["w4g32"], show_progress=False)
    with pytest.raises(ValueError, match="twice"):
        build_level_database(model, CONFIG, ["w4g32", "W4G32"], show_progress=False)
    with pytest.raises(ValueError, match="sparsity"):
        build_level_database(model, HfCompressConfig(method="magnitude", sparsity=0.5), LEVELS, show_progress=False)
    with pytest.raises(ValueError, match="fitness_seq_len"):
        search_allocation(model, CONFIG, 0.6, data, seq_len=32, fitness_seq_len=64, show_progress=False)
    with pytest.raises(TypeError, match="HfCompressConfig"):
        search_allocation(model, {"bits": 4}, 0.6, data)
