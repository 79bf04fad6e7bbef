"""Attacks on where hfcompress writes: outputs around, inside or onto inputs, crafted shard names, kills mid-write.

Every operation here runs between two hashes of the source folder (and of its parent where the output would
land around it): nothing but the output folder may ever change.
"""

from __future__ import annotations

import json
import types
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures.files import tree_hash
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import HfCompressConfig, convert_checkpoint
from hfcompress.checkpoint import CheckpointError, shard_names
from hfcompress.cli import main as cli
from hfcompress.hub import save_compressed
from hfcompress.inspection import inspect_checkpoint
from hfcompress.outputs import MARKER, OutputFolder, OutputPathError
from hfcompress.streaming import compress_checkpoint

CFG = HfCompressConfig(bits=4, group_size=32)


@pytest.fixture()
def src(tiny_dense_dir, tmp_path):
    """A private copy of the dense checkpoint inside ``tmp_path/parent`` (so PARENT holds SRC and a neighbour)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    folder = parent / "src"
    shutil.copytree(tiny_dense_dir, folder)
    (parent / "neighbour.txt").write_text("not yours")
    return folder


def _writers(src: Path):
    """Every function that writes a checkpoint folder, as ``out -> None``."""
    model = lambda: AutoModelForCausalLM.from_pretrained(src, quantization_config=CFG)  # noqa: E731
    return {
        "convert_checkpoint": lambda out, **kw: convert_checkpoint(src, out, **kw),
        "compress_checkpoint": lambda out, **kw: compress_checkpoint(src, out, CFG, show_progress=False, **kw),
        "save_compressed": lambda out, **kw: save_compressed(model(), out, companions_from=src, **kw),
        "cli compress": lambda out, overwrite=False: _cli_ok(["compress", str(src), "-o", str(out), "--bits", "4", "-q"]
                                                             + (["--overwrite"] if overwrite else [])),  # fmt: skip
    }


def _cli_ok(argv):
    code = cli(argv)
    if code == 2:
        raise OutputPathError(f"exit code 2 for {argv}")
    assert code == 0, argv


WRITERS = ["convert_checkpoint", "compress_checkpoint", "save_compressed", "cli compress"]


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("where", ["parent", "inside", "same", "link-to-src", "inside-through-link", "grandparent"])
def test_an_output_overlapping_the_source_is_refused_and_nothing_changes(src, tmp_path, writer, where):
    parent = src.parent
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    out = {
        "parent": parent, "inside": src / "sub", "same": src, "link-to-src": tmp_path / "link",
        "inside-through-link": tmp_path / "link" / "sub", "grandparent": tmp_path,
    }[where]  # fmt: skip
    before = tree_hash(tmp_path)
    with pytest.raises((OutputPathError, ValueError)):
        _writers(src)[writer](out, overwrite=True)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("writer", WRITERS)
def test_overwrite_replaces_only_folders_hfcompress_wrote(src, tmp_path, writer):
    write = _writers(src)[writer]
    user = tmp_path / "user-folder"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    a_file = tmp_path / "a-file"
    a_file.write_text("data")
    for target in (user, a_file):
        before = tree_hash(tmp_path)
        with pytest.raises((OutputPathError, ValueError)):
            write(target, overwrite=True)
        assert tree_hash(tmp_path) == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")], "leftovers"
    ours = tmp_path / "ours"
    write(ours)
    assert (ours / MARKER).is_file()
    with pytest.raises(FileExistsError if writer != "cli compress" else OutputPathError):
        write(ours)  # no overwrite flag: refused (the CLI: exit code 2)
    write(ours, overwrite=True)  # an output hfcompress wrote: replaced
    assert AutoModelForCausalLM.from_pretrained(ours) is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, overwrite=True)  # an empty folder holds nothing to lose
    assert (empty / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a-file", "empty", "ours", "parent", "user-folder"])


# ---------------------------------------------------------------------------------------------- crafted indexes
def _victim(tmp_path, tiny_dense_dir) -> Path:
    victim = tmp_path / "victim" / "model"
    shutil.copytree(tiny_dense_dir, victim)
    return victim


@pytest.mark.parametrize("how", ["traversal", "absolute", "no-weight-map", "not-json", "backslash", "missing-shard"])
def test_crafted_index_is_refused_everywhere(tiny_dense_dir, tmp_path, how):
    victim = _victim(tmp_path, tiny_dense_dir)
    attacker = tmp_path / "attacker"
    shutil.copytree(tiny_dense_dir, attacker)
    index_path = attacker / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    if how == "traversal":
        index["weight_map"] = {k: f"../victim/model/{v}" for k, v in index["weight_map"].items()}
    elif how == "absolute":
        index["weight_map"][first] = str(victim / index["weight_map"][first])
    elif how == "no-weight-map":
        index = {"metadata": {}}
    elif how == "backslash":
        index["weight_map"][first] = "..\\victim\\x.safetensors"
    elif how == "missing-shard":
        index["weight_map"][first] = "model-00009-of-00009.safetensors"
    index_path.write_text("{not json" if how == "not-json" else json.dumps(index))
    before = tree_hash(tmp_path / "victim")
    with pytest.raises(CheckpointError):
        shard_names(attacker)
    with pytest.raises(ValueError):
        convert_checkpoint(attacker, tmp_path / "out1")
    with pytest.raises(ValueError):
        compress_checkpoint(attacker, tmp_path / "out2", CFG, show_progress=False)
    assert cli(["inspect", str(attacker), "-q"]) == 2
    assert tree_hash(tmp_path / "victim") == before
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_loading_a_compressed_checkpoint_whose_index_points_outside_is_refused(tiny_dense_dir, tmp_path):
    good = tmp_path / "good"
    hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_dense_dir), CFG).save_pretrained(good, max_shard_size="100KB")
    other = tmp_path / "other"
    hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_dense_dir), CFG).save_pretrained(other, max_shard_size="100KB")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"../other/{v}" for k, v in index["weight_map"].items()}
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    # transformers >= 5.25 refuses such an index itself (a ValueError) before hfcompress's own check runs; with
    # older releases the refusal is hfcompress's CheckpointError (a ValueError too)
    refused = "leaves the checkpoint folder|outside its folder|points outside the model directory"
    with pytest.raises(ValueError, match=refused):
        AutoModelForCausalLM.from_pretrained(good)
    index["weight_map"] = {k: str(other / Path(v).name) for k, v in index["weight_map"].items()}  # absolute names
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=refused):
        AutoModelForCausalLM.from_pretrained(good)
    # hfcompress's own check of the files transformers resolved, whatever transformers checks first
    loading = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(good)))
    with pytest.raises(CheckpointError, match="outside its folder"):
        hfcompress.quantizer._checked_files(sorted({str(other / Path(v).name) for v in index["weight_map"].values()}), loading)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        hfcompress.quantizer._checked_files([f"{good}/../other/model-00001-of-00002.safetensors"], loading)


def test_sharded_folder_without_index_is_refused(tiny_dense_dir, tmp_path):
    folder = tmp_path / "noindex"
    shutil.copytree(tiny_dense_dir, folder)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        shard_names(folder)
    assert cli(["inspect", str(folder), "-q"]) == 2


# ---------------------------------------------------------------------------------------------- kills
KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import hfcompress
    from hfcompress import outputs, HfCompressConfig, convert_checkpoint
    phase = sys.argv[3]
    outputs._on_phase = lambda name: os._exit(137) if name == phase else None
    convert_checkpoint(sys.argv[1], sys.argv[2], overwrite=True)
    """
)


@pytest.mark.parametrize("phase", ["started", "written", "moved-aside", "replaced"])
def test_a_kill_at_any_write_phase_leaves_a_whole_output_and_the_next_run_cleans_up(tiny_dense_dir, tmp_path, phase):
    out = tmp_path / "out"
    convert_checkpoint(tiny_dense_dir, out)  # a previous, complete output
    reference = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    before_src = tree_hash(tiny_dense_dir)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tiny_dense_dir), str(out), phase], capture_output=True)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    assert tree_hash(tiny_dense_dir) == before_src
    # the output is the old one or the new one, never a half-written one (after "moved-aside" it is restored next run)
    if out.exists():
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}.keys() == reference.keys()
    convert_checkpoint(tiny_dense_dir, out, overwrite=True)  # the next run to the same output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers == [], leftovers
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_leftovers_of_a_live_run_are_not_touched(tiny_dense_dir, tmp_path):
    out = tmp_path / "out"
    writer = OutputFolder(out)
    with writer as tmp:  # this process is still writing
        convert_checkpoint(tiny_dense_dir, tmp_path / "other")
        (tmp / "part").write_text("in progress")
        assert tmp.exists()  # another run writing 'other' did not take it, and a cleanup of 'out' would skip it:
        from hfcompress.outputs import clean_leftovers

        assert clean_leftovers(out) == [] and tmp.exists()
    assert (out / "part").read_text() == "in progress"


def test_streaming_work_folder_of_someone_else_is_not_deleted(tiny_dense_dir, tmp_path):
    out = tmp_path / "out"
    stranger = tmp_path / ".out.partial"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not written by hfcompress"):
        compress_checkpoint(tiny_dense_dir, out, CFG, show_progress=False, resume=False)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_links_leaving_the_source_are_not_copied_into_outputs(tiny_dense_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dense_dir, src)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (src / "notes.txt").symlink_to(secret)
    for out in (convert_checkpoint(src, tmp_path / "a"), compress_checkpoint(src, tmp_path / "b", CFG, show_progress=False)):
        assert not (out / "notes.txt").exists()
        assert all("password" not in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())


def test_compressed_adapter_never_deletes_a_folder_it_did_not_write(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hfcompress.testing.models import tiny_llama
    from hfcompress.peft.deltas import save_compressed_adapter

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    home = tmp_path / "home"
    home.mkdir()
    (home / "photos.jpg").write_bytes(b"\xff\xd8")
    before = tree_hash(tmp_path)
    with pytest.raises((FileExistsError, OutputPathError)):
        save_compressed_adapter(lora, home)
    with pytest.raises(OutputPathError):
        save_compressed_adapter(lora, home, overwrite=True)
    assert tree_hash(tmp_path) == before
    save_compressed_adapter(lora, tmp_path / "adapter")
    save_compressed_adapter(lora, tmp_path / "adapter", overwrite=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_inspect_and_load_leave_the_checkpoint_untouched(tiny_dense_dir, tmp_path):
    out = save_compressed(hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_dense_dir), CFG), tmp_path / "c")
    before = tree_hash(out)
    inspect_checkpoint(out, measure=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert tree_hash(out) == before


def test_small_files_are_replaced_atomically_or_not_at_all(tmp_path):
    """outputs.write_file_atomic (cards, recipes, eval results, policies, deltas): a failed write leaves the old file
    and no temporary file; a finished one has the permissions a plain open() gives."""
    import os

    from hfcompress.outputs import write_file_atomic

    path = tmp_path / "README.md"
    path.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(path, fails)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    write_file_atomic(path, "new")
    write_file_atomic(tmp_path / "b.bin", b"\x00\x01")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "new" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "b.bin"]
