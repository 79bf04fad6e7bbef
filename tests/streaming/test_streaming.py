"""Streaming (out-of-core) compression: same tensors as the in-memory path, resumable, never half-finished."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.algorithms import Method, get_method, register_method
from hfcompress.testing.models import tiny_llama
from hfcompress.streaming import compress_checkpoint, parse_size, partial_dir
from hfcompress.streaming import run as stream_run
from hfcompress.streaming.reader import CheckpointReader


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny 3-block Llama saved in several shards (tied embeddings)."""
    path = tmp_path_factory.mktemp("dense")
    tiny_llama(num_hidden_layers=3).save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _ids(n=4, seq=16, seed=0):
    return torch.randint(1, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _in_memory(dense_dir, config, tmp_path, **oneshot_kwargs):
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    if config.is_data_free:
        hfcompress.compress(model, config)
    else:
        hfcompress.oneshot(model, config, show_progress=False, **oneshot_kwargs)
    out = tmp_path / "in_memory"
    model.save_pretrained(out)
    return _saved_tensors(out)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_rtn_streaming_matches_in_memory_and_reloads(dense_dir, tmp_path):
    config = HfCompressConfig(bits=4, group_size=32)
    out = compress_checkpoint(dense_dir, tmp_path / "out", config, shard_size="20KB", show_progress=False)
    assert not partial_dir(out).exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded as save_pretrained shards
    assert "lm_head.weight" not in index["weight_map"]  # tied, as save_pretrained drops it
    _assert_same(_saved_tensors(out), _in_memory(dense_dir, config, tmp_path))
    assert json.loads((out / "config.json").read_text())["quantization_config"] == config.to_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    hfcompress.compress(reference, config)
    ids = _ids()
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_gptq_streaming_matches_in_memory_oneshot(dense_dir, tmp_path):
    config = HfCompressConfig(method="gptq", bits=4, group_size=32)
    kwargs = dict(batch_size=2, true_sequential=True)
    out = compress_checkpoint(dense_dir, tmp_path / "out", config, _ids(), shard_size="30KB", show_progress=False, **kwargs)
    _assert_same(_saved_tensors(out), _in_memory(dense_dir, config, tmp_path, dataset=_ids(), **kwargs))


def test_lossless_stage_composes(dense_dir, tmp_path):
    config = HfCompressConfig(bits=4, group_size=32, lossless=True)
    out = compress_checkpoint(dense_dir, tmp_path / "out", config, show_progress=False)
    assert (out / "model.safetensors").is_file()  # the per-unit parts merged into one shard
    assert any(k.endswith("_lossless") for k in _saved_tensors(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = hfcompress.compress(AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32), HfCompressConfig(bits=4, group_size=32))
    _assert_same(reloaded.state_dict(), reference.state_dict())


class _Crash(RuntimeError):
    pass


def _crash_loading_the_last_block(monkeypatch) -> list[str]:
    """Make the next run crash once, while loading block 2 of 3; returns the prefixes loaded (grows as they are)."""
    materialized: list[str] = []
    crashed: list[bool] = []
    original = stream_run._materialize

    def crashing(module, prefix, *args, **kw):
        materialized.append(prefix)
        if prefix == "model.layers.2." and not crashed:
            crashed.append(True)
            raise _Crash("simulated crash while loading the last block")
        return original(module, prefix, *args, **kw)

    monkeypatch.setattr(stream_run, "_materialize", crashing)
    return materialized


@pytest.mark.parametrize("method", ["rtn", pytest.param("gptq", marks=pytest.mark.slow)])
def test_interrupted_run_resumes_from_last_written_block(dense_dir, tmp_path, monkeypatch, method):
    config = HfCompressConfig(method=method, bits=4, group_size=32)
    data = None if method == "rtn" else _ids()
    kwargs = dict(batch_size=2, shard_size=1, show_progress=False)  # one shard per unit
    reference = compress_checkpoint(dense_dir, tmp_path / "ref", config, data, **kwargs)

    materialized = _crash_loading_the_last_block(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(_Crash):
        compress_checkpoint(dense_dir, out, config, data, **kwargs)
    assert not out.exists()  # nothing that looks finished
    progress = json.loads((partial_dir(out) / "progress.json").read_text())
    assert progress["units_done"] == 3  # head + blocks 0 and 1 are on disk
    materialized.clear()
    compress_checkpoint(dense_dir, out, config, data, **kwargs)
    assert "model.layers.1." not in materialized and "model.layers.2." in materialized  # finished blocks not redone
    assert not partial_dir(out).exists()
    _assert_same(_saved_tensors(out), _saved_tensors(reference))


@pytest.mark.slow
def test_offloaded_activations_are_memory_mapped_and_change_nothing(dense_dir, tmp_path, monkeypatch):
    config = HfCompressConfig(method="gptq", bits=4, group_size=32)
    kwargs = dict(batch_size=2, shard_size=1, show_progress=False)
    reference = compress_checkpoint(dense_dir, tmp_path / "ref", config, _ids(), **kwargs)

    seen: list[tuple[str, bool, bool]] = []
    original = stream_run._calibrate_block

    def spy(run, block_inputs, block, i, names, state, spill=None):
        prefix = f"model.layers.{i}."
        if prefix == "model.layers.2." and not seen[-1][0] == "crash":
            seen.append(("crash", False, False))
            raise _Crash("simulated crash before the last block")
        out = original(run, block_inputs, block, i, names, state, spill)
        # inputs and outputs of every block are the memory-mapped copies, never plain in-memory tensors
        seen.append((prefix, all(h in spill for h in state.hidden), all(h in spill for h in out.hidden)))
        return out

    monkeypatch.setattr(stream_run, "_calibrate_block", spy)
    out = tmp_path / "out"
    with pytest.raises(_Crash):
        compress_checkpoint(dense_dir, out, config, _ids(), offload_activations=True, **kwargs)
    done = compress_checkpoint(dense_dir, out, config, _ids(), offload_activations=True, **kwargs)  # resumes
    assert seen == [
        ("model.layers.0.", True, True), ("model.layers.1.", True, True), ("crash", False, False),
        ("model.layers.2.", True, True),  # after the resume: fed from the saved hidden states, memory-mapped
    ]  # fmt: skip
    _assert_same(_saved_tensors(done), _saved_tensors(reference))
    assert not [p.name for p in done.iterdir() if p.name.startswith("hidden-")]  # no spill files left behind


def _gptq_on_dense_cross(weight, stats, spec, args):
    return get_method("gptq").compress_layer(weight, stats, spec, args)


try:
    get_method("test_stream_cross")
except ValueError:  # a method reading the dense model's inputs (``dense_cross``), as quantease variants may
    register_method(Method("test_stream_cross", False, True, False, "test", needs=frozenset({"hessian", "dense_cross"}), compress_layer=_gptq_on_dense_cross))


@pytest.mark.parametrize(("method", "method_args", "offload"), [
    ("blocktune", {"tune_samples": 2, "tune_batch_size": 2}, False),  # targets for the first batch only
    ("blocktune", {"tune_samples": 4, "tune_batch_size": 2}, True),
    ("test_stream_cross", {}, True),
])  # fmt: skip
def test_methods_following_the_dense_model_stream_and_resume_like_in_memory(dense_dir, tmp_path, monkeypatch, method, method_args, offload):
    config = HfCompressConfig(method=method, bits=4, group_size=32, method_args=method_args)
    kwargs = dict(batch_size=2, true_sequential=True)
    _crash_loading_the_last_block(monkeypatch)
    out = tmp_path / "out"
    stream = dict(shard_size=1, offload_activations=offload, show_progress=False, **kwargs)
    with pytest.raises(_Crash):
        compress_checkpoint(dense_dir, out, config, _ids(), **stream)
    saved = torch.load(partial_dir(out) / "hidden-u00003-rank0.pt", weights_only=True)
    assert saved["dense_hidden"] is not None  # the dense model's hidden states are saved for the resume too
    done = compress_checkpoint(dense_dir, out, config, _ids(), **stream)  # resumes before the last block
    _assert_same(_saved_tensors(done), _in_memory(dense_dir, config, tmp_path, dataset=_ids(), **kwargs))


def test_resume_refuses_other_settings(dense_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def crash(*a, **k):
        raise _Crash("stop")

    monkeypatch.setattr(stream_run, "_compress_data_free", crash)
    with pytest.raises(_Crash):
        compress_checkpoint(dense_dir, out, HfCompressConfig(bits=4), shard_size=1, show_progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different settings"):
        compress_checkpoint(dense_dir, out, HfCompressConfig(bits=3), shard_size=1, show_progress=False)
    done = compress_checkpoint(dense_dir, out, HfCompressConfig(bits=3), shard_size=1, resume=False, show_progress=False)
    assert AutoModelForCausalLM.from_pretrained(done).config.quantization_config.bits == 3


def test_bad_arguments_leave_no_output(dense_dir, tmp_path):
    config = HfCompressConfig(bits=4)
    with pytest.raises(ValueError, match="shard_size"):
        compress_checkpoint(dense_dir, tmp_path / "o", config, shard_size="lots")
    with pytest.raises(ValueError, match="is the input"):
        compress_checkpoint(dense_dir, dense_dir, config)
    with pytest.raises(TypeError, match="HfCompressConfig"):
        compress_checkpoint(dense_dir, tmp_path / "o", {"bits": 4})
    with pytest.raises(FileNotFoundError, match="config.json"):
        compress_checkpoint(tmp_path, tmp_path / "o", config)
    with pytest.raises(ValueError, match="lm_head"):
        compress_checkpoint(dense_dir, tmp_path / "o", HfCompressConfig(method="gptq", bits=4, ignore=[]), _ids())
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        compress_checkpoint(dense_dir, tmp_path / "exists", config)
    with pytest.raises(TypeError, match="offload_activations"):
        compress_checkpoint(dense_dir, tmp_path / "o", config, offload_activations="yes")
    with pytest.raises(ValueError, match="offload_activations=True.*device='cuda'"):
        compress_checkpoint(dense_dir, tmp_path / "o", config, offload_activations=True, device="cuda")
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()
    assert parse_size("1.5KB") == 1500 and parse_size("2MiB") == 2 * 2**20


def test_reader_reads_every_tensor_exactly(dense_dir):
    reader = CheckpointReader(dense_dir)
    state = tiny_llama(num_hidden_layers=3).state_dict()
    for name in reader.keys():
        assert torch.equal(reader.read(name), state[name]), name
