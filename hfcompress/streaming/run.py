"""``compress_checkpoint``: compress a checkpoint folder block by block, never holding the whole model.

The model is built on the meta device (accelerate's ``init_empty_weights``), so it costs no memory. The
run then goes through *units*: first the weights outside the repeated blocks (embeddings, final norm,
untied head), then each block in order. For a unit, its weights are read from the safetensors shards
(:class:`~hfcompress.streaming.reader.CheckpointReader`), its targeted modules are compressed, its
tensors (named exactly as ``model.state_dict()`` names them) go to the
:class:`~hfcompress.streaming.writer.ShardWriter`, and the unit goes back to the meta device.

* Data-free methods (``rtn``, ``magnitude``) compress each weight on its own: no forward pass runs.
* Calibrated methods (``gptq``, ``sparsegpt``, ``wanda``, ``blocktune``...) go through the per-block step
  of the in-memory pipeline, :func:`hfcompress.calibration.step.calibrate_block`: the block inputs are
  captured once with only the non-block weights loaded, then each block collects its statistics on the
  current hidden states, is compressed through ``Method.compress_layer`` (and tuned, for block tuning) and
  re-run to produce the next block's inputs. Methods that follow the dense model (``dense_cross``
  statistics, block tuning) carry its hidden states along too. Memory holds one block plus the
  calibration hidden states, or only the block with ``offload_activations=True`` (the hidden states then
  live in memory-mapped files of the work folder). Under ``torch.distributed`` each process
  forwards its share of the batches and the statistics are all-reduced (:mod:`hfcompress.distributed`).

Every time a shard is written, the hidden states entering the next block are saved next to it, so an
interrupted run (crash, kill, power loss) restarts from the last written shard with the same call.
Targets, output tensors and values are those of the in-memory path
(``from_pretrained`` + :func:`hfcompress.compress`/:func:`hfcompress.oneshot` + ``save_pretrained``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from ..algorithms import get_method
from ..calibration.blocks import capture_block_inputs, find_blocks
from ..calibration.step import CalibrationRun, CalibrationState, calibrate_block, entry_state
from ..config import HfCompressConfig
from ..integrity import CHECKSUMS_KEY, checksum_metadata
from ..modules import CompressedModule, compressed_twin, set_submodule
from ..outputs import check_containment, check_replaceable, write_file_atomic
from ..plan.targets import resolve_layers
from .reader import CheckpointReader
from .writer import ShardWriter, partial_dir

logger = logging.getLogger("hfcompress.streaming")

__all__ = ["compress_checkpoint", "parse_size"]

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"2GB"``/``"500MiB"``/an int -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        text = size.strip().upper()
        for unit in sorted(_UNITS, key=len, reverse=True):
            if text.endswith(unit):
                try:
                    value = float(text[: -len(unit)])
                except ValueError:
                    break
                if value > 0:
                    return int(value * _UNITS[unit])
    raise ValueError(f"shard_size={size!r} is not a size; use bytes (int > 0) or a string such as '2GB' or '500MiB'.")


# ---------------------------------------------------------------------- model on the meta device
def _model_class(hf_config, model_class):
    if model_class is not None:
        return model_class
    import transformers

    for arch in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _empty_model(hf_config, model_class, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights

    cls = _model_class(hf_config, model_class)
    with init_empty_weights():
        if hasattr(cls, "_from_config"):
            model = cls._from_config(hf_config, dtype=dtype)
        else:  # AutoModel
            model = cls.from_config(hf_config, dtype=dtype)
    model.eval()
    return model


def _checkpoint_key(name: str, reader: CheckpointReader, base: str) -> str:
    if name in reader:
        return name
    if base:
        if name.startswith(base + ".") and name[len(base) + 1 :] in reader:
            return name[len(base) + 1 :]
        if f"{base}.{name}" in reader:
            return f"{base}.{name}"
    raise KeyError(f"The checkpoint has no tensor for {name!r}; it does not match the model class of its config.json.")


def _materialize(module: nn.Module, prefix: str, reader: CheckpointReader, base: str, device, skip: set[str]) -> list[str]:
    """Load the meta parameters/buffers of ``module`` (state-dict names under ``prefix``) from the checkpoint."""
    from accelerate.utils import set_module_tensor_to_device

    loaded = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if not tensor.is_meta or full in skip:
            continue
        value = reader.read(_checkpoint_key(full, reader, base))
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"Checkpoint tensor {full!r} has shape {tuple(value.shape)}; the model expects {tuple(tensor.shape)}.")
        if value.is_floating_point() and value.dtype != tensor.dtype:
            value = value.to(tensor.dtype)
        set_module_tensor_to_device(module, name, device, value=value)
        loaded.append(name)
    return loaded


def _release(module: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        try:
            set_module_tensor_to_device(module, name, "meta")
        except (AttributeError, ValueError):
            pass  # replaced by a compressed twin meanwhile


def _compress_data_free(model: nn.Module, names: list[str], plan, method_name: str) -> None:
    for name in names:
        dense = model.get_submodule(name)
        twin = compressed_twin(dense, plan[name])
        twin.compress_(dense.weight, method=method_name)
        set_submodule(model, name, twin.to(dense.weight.device))


def _compress_identity(model: nn.Module, names: list[str], plan, method, method_args) -> None:
    from ..calibration.stats import identity_stats

    for name in names:
        dense = model.get_submodule(name)
        w2d = dense.weight.detach().reshape(dense.weight.shape[0], -1).to(torch.float32, copy=True)
        cw = method.compress_layer(w2d, identity_stats(w2d.shape[1], method.needs, w2d.device), plan[name], method_args)
        twin = compressed_twin(dense, plan[name])
        twin.set_compressed_weight(cw)
        set_submodule(model, name, twin.to(dense.weight.device))


def _cpu_tensors(module: nn.Module, prefix: str, drop: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in module.state_dict().items():
        full = prefix + name
        if full in drop:
            continue
        if tensor.is_meta:
            raise RuntimeError(f"{full} was not loaded from the checkpoint.")
        out[full] = tensor.detach().to("cpu")
    return out


def _fingerprint(
    src: Path, reader: CheckpointReader, config: HfCompressConfig, dtype: torch.dtype, settings: dict[str, Any]
) -> dict[str, Any]:
    """Everything the output depends on, exactly: a resumed run must have every one of them unchanged."""
    files = []
    for name in reader.files:
        st = os.stat(src / name)
        files.append([name, st.st_size, st.st_mtime_ns])
    return {
        "src": str(src.resolve()),
        "src_files": files,  # a source rewritten since (other weights, same names) is a different source
        "config": config.to_dict(),
        "dtype": str(dtype),
        "settings": settings,
        "world_size": dist_utils.world_size(),
    }


def _batches_digest(batches: list[dict[str, torch.Tensor]]) -> str:
    """SHA-256 of the exact calibration tensors (names, dtypes, shapes, bytes): same data, or no resume."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].detach().cpu().contiguous()
            digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return digest.hexdigest()


def _hidden_path(work: Path, unit: int) -> Path:
    return work / f"hidden-u{unit:05d}-rank{dist_utils.rank()}.pt"


def _save_hidden(work: Path, unit: int, state: CalibrationState) -> None:
    saved = {"hidden": _on_cpu(state.hidden), "dense_hidden": _on_cpu(state.dense_hidden)}
    write_file_atomic(_hidden_path(work, unit), lambda tmp: torch.save(saved, tmp))


def _on_cpu(hidden: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if hidden is None else [h.to("cpu") for h in hidden]


def _saved_state(saved: dict[str, Any] | list[torch.Tensor], move: Callable[[torch.Tensor], torch.Tensor]) -> CalibrationState:
    """The :class:`CalibrationState` that :func:`_save_hidden` wrote, each tensor passed through ``move``."""
    if isinstance(saved, list):  # written before the dense model's hidden states were saved too
        saved = {"hidden": saved, "dense_hidden": None}
    dense = saved["dense_hidden"]
    return CalibrationState([move(h) for h in saved["hidden"]], None if dense is None else [move(h) for h in dense])


def _load_state(path: Path, device: torch.device) -> CalibrationState:
    """The hidden states saved for resuming, on ``device``."""
    return _saved_state(torch.load(path, weights_only=True), lambda h: h.to(device))


class _ActivationSpill:
    """Hidden states written to the work folder and memory-mapped back (``offload_activations=True``).

    Each tensor goes to its own file, is loaded back with ``torch.load(mmap=True)`` and the file is
    unlinked at once: the mapping keeps the data reachable until the tensor is freed, and the kernel
    pages it in and out like any file cache, so the calibration activations need not fit in memory.
    Files a crash leaves behind are named ``hidden-spill-*`` and removed on the next start and by the
    writer's finalisation.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0
        self._suffix = f"-rank{dist_utils.rank()}.pt"
        self._spilled: dict[int, weakref.ref] = {}  # id -> the memory-mapped tensors handed out (alive ones)
        for name in os.listdir(work):
            if name.startswith("hidden-spill-") and name.endswith(self._suffix):
                (work / name).unlink(missing_ok=True)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is one of the memory-mapped tensors this spill handed out."""
        ref = self._spilled.get(id(tensor))
        return ref is not None and ref() is tensor

    def _track(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._spilled[key] = weakref.ref(tensor, lambda _, key=key: self._spilled.pop(key, None))

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, now backed by a memory-mapped file (returned as is if it already is)."""
        if tensor in self:
            return tensor
        path = self.work / f"hidden-spill-{self.count:06d}{self._suffix}"
        self.count += 1
        tmp = path.with_name(path.name + ".tmp")
        torch.save(tensor.detach().contiguous(), tmp)
        os.replace(tmp, path)
        mapped = torch.load(path, mmap=True, weights_only=True)
        try:
            path.unlink()
        except OSError:  # pragma: no cover - platforms that cannot unlink a mapped file keep it until finalize
            pass
        self._track(mapped)
        return mapped

    def put_all(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.put(t) for t in tensors]

    def load(self, path: Path) -> CalibrationState:
        """The hidden states saved for resuming, memory-mapped from their file."""
        return _saved_state(torch.load(path, mmap=True, weights_only=True), self._tracked)

    def _tracked(self, tensor: torch.Tensor) -> torch.Tensor:
        self._track(tensor)
        return tensor


def _drop_old_hidden(work: Path, keep: int) -> None:
    mine = f"-rank{dist_utils.rank()}.pt"
    for name in os.listdir(work):
        if name.startswith("hidden-u") and name.endswith(mine) and not name.startswith(f"hidden-u{keep:05d}-"):
            (work / name).unlink(missing_ok=True)


def _broadcast(value: Any) -> Any:
    if not dist_utils.is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- the entry point
@torch.no_grad()
def _checked_arguments(
    src: Path, out: Path, config: HfCompressConfig, dataset: Any, dtype, device, offload_activations: bool, overwrite: bool
) -> tuple[Any, torch.dtype, torch.device]:
    """Refuse bad arguments before anything is read or written; returns the model config, dtype and device."""
    from transformers import AutoConfig

    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an HfCompressConfig, got {type(config).__name__}.")
    if config.is_loading_only:
        raise ValueError("HfCompressConfig.loading(...) only carries loading options; compress_checkpoint needs HfCompressConfig(bits=..., ...).")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"src={str(src)!r} is not a Hugging Face model folder (no config.json).")
    sources = [src] + ([dataset] if isinstance(dataset, (str, os.PathLike)) and Path(dataset).exists() else [])
    check_containment(out, sources, "out")
    check_containment(partial_dir(out), sources, "out's work folder")
    check_replaceable(out, overwrite, "out")
    from ..plan.allocation import allocation_pending

    if allocation_pending(config):
        raise ValueError(
            f"method_args['allocation']={config.method_args['allocation']!r} needs every layer at once; streaming "
            "compression sets the sparsity layer by layer. Use allocation='uniform' or pin per-layer values in overrides."
        )
    hf_config = AutoConfig.from_pretrained(src)
    existing = getattr(hf_config, "quantization_config", None)
    if existing:
        raise ValueError(f"src={str(src)!r} is already quantized ({existing!r}); compress the original dense checkpoint.")
    if dtype is None:
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating torch dtype such as torch.float32 or torch.bfloat16.")
    dist_utils.init_from_env()  # under a launcher: join the group (and pick this rank's GPU) first
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if not isinstance(offload_activations, bool):
        raise TypeError(f"offload_activations={offload_activations!r} must be True or False.")
    if offload_activations and device.type != "cpu":
        raise ValueError(
            f"offload_activations=True memory-maps the hidden states from disk for CPU compute; device={str(device)!r} "
            "keeps them in device memory. Use device='cpu' or offload_activations=False."
        )
    return hf_config, dtype, device


def _refuse_unstreamable(method, model: nn.Module, head: list[str]) -> None:
    """Streaming runs no full forward of the model: refuse calibrated targets outside the blocks that need one."""
    if not method.data_free:
        bad = [n for n in head if not isinstance(model.get_submodule(n), nn.Embedding)]
        if bad:
            raise ValueError(
                f"Modules outside the blocks {bad[:3]} need a full forward to calibrate, which streaming does not run; "
                "add them to config.ignore (or compress the model in memory with hfcompress.oneshot)."
            )


def compress_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: HfCompressConfig,
    dataset: Any = None,
    *,
    tokenizer=None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    blocks: str | None = None,
    true_sequential: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    model_class: type | None = None,
    shard_size: int | str = "2GB",
    offload_activations: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Compress the checkpoint folder ``src`` into ``out`` one block at a time; returns ``out``.

    Args:
        src: a Hugging Face model folder (``config.json`` + safetensors shards), possibly far larger than memory.
        out: the folder to create; it appears only when the run has finished (see :mod:`.writer`).
        config: the :class:`~hfcompress.HfCompressConfig`. Data-free methods need no data; calibrated
            ones take ``dataset`` and the calibration arguments of :func:`hfcompress.oneshot`
            (``tokenizer``, ``num_samples``, ``seq_len``, ``seed``, ``batch_size``, ``text_column``,
            ``dataset_config``, ``split``, ``blocks``, ``true_sequential``), with the same meaning.
        dtype: the dtype the model runs in and non-compressed tensors are stored in (default: the
            checkpoint's ``dtype`` in config.json, else float32). float32 gives the most accurate statistics.
        device: where each block is computed (default: the current CUDA device if any, else CPU).
        model_class: the transformers class to build (default: ``config.json``'s first architecture).
        shard_size: bytes of compressed tensors per output shard (``"2GB"``). Each unit is written (and
            the progress saved) as soon as it is done; parts are merged into shards at the end.
        offload_activations: calibrated methods only: keep the calibration hidden states in files of the
            work folder, memory-mapped, instead of in memory (CPU compute only). They then cost page cache,
            which the kernel evicts under memory pressure, not resident memory that must fit: for
            calibration sets whose activations (``num_samples x seq_len x hidden x 4`` bytes, twice at
            block boundaries, twice more for methods that follow the dense model) rival a block's weights.
            The output is the same either way.
        resume: continue an interrupted run with the same arguments from its last written shard.
        overwrite: replace an existing ``out``.
        show_progress: tqdm progress bar over the units.

    Under ``accelerate launch``/``torchrun`` (a ``torch.distributed`` process group is initialised from the
    launcher's environment), every process runs this same call on its share of the calibration batches
    and rank 0 writes ``out``.
    """
    src, out = Path(src), Path(out)
    hf_config, dtype, device = _checked_arguments(src, out, config, dataset, dtype, device, offload_activations, overwrite)
    size = parse_size(shard_size)
    method = get_method(config.method)
    reader = CheckpointReader(src)
    layout = _model_layout(hf_config, model_class, dtype, config, blocks)
    _refuse_unstreamable(method, layout.model, layout.head)

    settings = _run_settings(model_class, device, blocks)
    batches: list[dict[str, torch.Tensor]] = []
    if not method.data_free:
        batches = _calibration_batches(
            layout.model, src, dataset, tokenizer, num_samples, seq_len, seed, batch_size, text_column, dataset_config, split
        )
        # the exact tokens (whatever dataset, tokenizer, seed or split produced them), and how they are batched
        settings.update(calibration=_batches_digest(batches), true_sequential=true_sequential)
        batches = [{k: v.to(device) for k, v in b.items()} for b in dist_utils.shard_batches(batches)]

    writer, units_done = _open_writer(out, src, reader, config, dtype, settings, size, resume)
    if units_done:
        logger.info("Resuming %s after %d of %d units.", out, units_done, layout.units)
    stream = _StreamRun(layout, reader, config, method, device, out, writer, offload_activations, true_sequential)
    with tqdm(total=layout.units, initial=units_done, desc=f"stream {method.name}", unit="unit", disable=not show_progress) as progress:  # closed on errors too: no redraw under the error report
        if units_done == 0 or not method.data_free:  # calibration needs the block inputs even when the head is written
            stream.head_unit(batches, write=units_done == 0)
            progress.update(0 if units_done else 1)
        if units_done >= 2 and not method.data_free:
            stream.resume_state(units_done)
        for i in range(max(units_done - 1, 0), len(layout.block_list)):  # block i is unit i + 2
            stream.block_unit(i)
            progress.update(1)
    return stream.finalize(hf_config, src, overwrite)


# ---------------------------------------------------------------------- the steps of compress_checkpoint
@dataclass
class _ModelLayout:
    """Where the weights of the meta-device model are: the repeated blocks and what lies outside them."""

    model: nn.Module
    base: str  # base_model_prefix: checkpoints name their tensors with or without it
    plan: dict[str, Any]  # targeted module -> its compression spec
    block_list: nn.ModuleList
    prefixes: list[str]  # state-dict prefix of each block
    per_block: list[list[str]]  # targeted modules of each block
    head: list[str]  # targeted modules outside the blocks
    tied: set[str]  # tied weights: neither loaded nor written

    @property
    def units(self) -> int:
        """The head unit, then one unit per block."""
        return len(self.block_list) + 1


def _model_layout(hf_config, model_class, dtype: torch.dtype, config: HfCompressConfig, blocks: str | None) -> _ModelLayout:
    model = _empty_model(hf_config, model_class, dtype)
    base = getattr(model, "base_model_prefix", "") or ""
    plan = resolve_layers(model, config)
    blocks_name, block_list = find_blocks(model, blocks)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(block_list))]
    per_block = [[n for n in plan if n.startswith(p)] for p in prefixes]
    head = [n for n in plan if not _in_blocks(n, prefixes)]
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return _ModelLayout(model, base, plan, block_list, prefixes, per_block, head, tied)


def _run_settings(model_class: type | None, device: torch.device, blocks: str | None) -> dict[str, Any]:
    """The arguments besides config, checkpoint and data that the output depends on (part of the fingerprint)."""
    return {
        "model_class": None if model_class is None else f"{model_class.__module__}.{model_class.__qualname__}",
        "device": device.type, "blocks": blocks,
    }  # fmt: skip


def _shard_metadata(config: HfCompressConfig) -> dict[str, str]:
    metadata = {"format": "pt", **checksum_metadata({}, config)}
    metadata.pop(CHECKSUMS_KEY)  # each part records its own tensors
    if config.lossless:
        from ..storage.loader import METADATA_KEY

        metadata[METADATA_KEY] = "1"
    return metadata


def _open_writer(
    out: Path, src: Path, reader: CheckpointReader, config: HfCompressConfig, dtype: torch.dtype, settings: dict[str, Any],
    shard_size: int, resume: bool,
) -> tuple[ShardWriter | None, int]:
    """The :class:`ShardWriter` (rank 0 only; ``None`` elsewhere) and the number of units already written,
    the same on every rank once the work folder is ready."""
    metadata = _shard_metadata(config)
    writer = None
    if dist_utils.is_main_process():
        writer = ShardWriter(out, _fingerprint(src, reader, config, dtype, settings), shard_size, resume, metadata)
    units_done = _broadcast(writer.units_done if writer is not None else 0)
    dist_utils.barrier()
    return writer, units_done


class _StreamRun:
    """The units of one :func:`compress_checkpoint` call: the head unit, then one unit per block, each
    loaded from the checkpoint, compressed, written through :meth:`emit` and sent back to the meta device.

    For calibrated methods, ``state`` is the :class:`CalibrationState` entering the next block.
    """

    def __init__(
        self, layout: _ModelLayout, reader: CheckpointReader, config: HfCompressConfig, method, device: torch.device,
        out: Path, writer: ShardWriter | None, offload_activations: bool, true_sequential: bool,
    ) -> None:  # fmt: skip
        self.layout = layout
        self.reader = reader
        self.config = config
        self.method = method
        self.device = device
        self.out = out
        self.work = partial_dir(out)
        self.writer = writer
        self.spill = _ActivationSpill(self.work) if offload_activations and not method.data_free else None
        self.run: CalibrationRun | None = None
        if not method.data_free:
            reduce = dist_utils.all_reduce_sums if dist_utils.is_distributed() else None
            self.run = CalibrationRun(layout.model, layout.plan, method, config.method_args, reduce=reduce, true_sequential=true_sequential)
        self.block_inputs = None
        self.state: CalibrationState | None = None

    # ------------------------------------------------------------------ writing a unit
    def emit(self, tensors: dict[str, torch.Tensor], unit: int, last: bool) -> None:
        """Hand the tensors of finished unit ``unit`` to the writer; when it writes them, the hidden states
        entering the next block are saved first, so that an interrupted run resumes after ``unit``."""
        if self.config.lossless:
            from ..formats.lossless import encode_state_dict

            tensors = encode_state_dict(tensors)
        if self.writer is not None:
            self.writer.add(tensors)
        flush = _broadcast(self.writer.should_flush() if self.writer is not None else False) or last
        if not flush:
            return
        if self.state is not None and not last:
            _save_hidden(self.work, unit, self.state)
        dist_utils.barrier()
        if self.writer is not None:
            self.writer.flush(unit)
        dist_utils.barrier()
        _drop_old_hidden(self.work, unit)

    # ------------------------------------------------------------------ the head unit: weights outside the blocks
    def head_unit(self, batches: list[dict[str, torch.Tensor]], write: bool) -> None:
        """Load the weights outside the blocks; for calibration, capture the block inputs from them; compress
        and write them if ``write`` (not written by an interrupted run yet); free them."""
        loaded = self._load_head()
        if not self.method.data_free:
            self._enter_blocks(batches)
        if write:
            self._compress_head()
            tensors = _head_tensors(self.layout.model, self.layout.prefixes, self.layout.tied)
            self.emit(tensors, 1, last=not self.layout.block_list)
            del tensors  # written: do not hold the non-block weights while the blocks run
        self._release_head(loaded)

    def _load_head(self) -> list[str]:
        """Load the non-block weights (tied ones excepted); returns their names for :meth:`_release_head`."""
        block_list = self.layout.block_list
        saved = [copy.deepcopy(b) for b in block_list]  # meta: free
        for i in range(len(block_list)):
            block_list[i] = nn.Identity()  # the head unit never touches block weights
        loaded = _materialize(self.layout.model, "", self.reader, self.layout.base, self.device, skip=self.layout.tied)
        for i, b in enumerate(saved):
            block_list[i] = b
        return loaded

    def _enter_blocks(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Capture what the blocks receive for ``batches``; ``state`` becomes the state entering block 0."""
        block_list, prefixes = self.layout.block_list, self.layout.prefixes
        first = block_list[0]  # the capture runs block 0 once for its output structure
        block_list[0] = copy.deepcopy(first)
        _materialize(block_list[0], prefixes[0], self.reader, self.layout.base, self.device, skip=set())
        try:
            self.block_inputs = capture_block_inputs(self.layout.model, block_list, batches)
        finally:
            block_list[0] = first
        hidden = self.block_inputs.hidden
        self.block_inputs.hidden = []
        if self.spill is not None:
            hidden = self.spill.put_all(hidden)
        self.state = entry_state(self.run, hidden, self.block_inputs.rows)

    def _compress_head(self) -> None:
        layout, method = self.layout, self.method
        if method.data_free:
            _compress_data_free(layout.model, layout.head, layout.plan, method.name)
        elif layout.head:  # embeddings: identity statistics, as the in-memory pipeline gives them
            _compress_identity(layout.model, layout.head, layout.plan, method, self.config.method_args)

    def _release_head(self, loaded: list[str]) -> None:
        """Free the non-block weights: compressed twins and dense tensors alike go back to meta."""
        model, head = self.layout.model, self.layout.head
        for name in head:
            if isinstance(model.get_submodule(name), CompressedModule):
                set_submodule(model, name, nn.Identity())  # written; no later forward reaches it
        _release(model, [n for n in loaded if not any(n.startswith(h + ".") for h in head)])

    def resume_state(self, units_done: int) -> None:
        """``state`` becomes the hidden states an interrupted run saved when it wrote unit ``units_done``."""
        path = _hidden_path(self.work, units_done)
        self.state = self.spill.load(path) if self.spill is not None else _load_state(path, self.device)

    # ------------------------------------------------------------------ one unit per block
    def block_unit(self, i: int) -> None:
        """Load block ``i``, compress its targeted modules, write it (unit ``i + 2``) and send it back to meta."""
        layout = self.layout
        meta_block = layout.block_list[i]
        block = copy.deepcopy(meta_block)
        _materialize(block, layout.prefixes[i], self.reader, layout.base, self.device, skip=set())
        layout.block_list[i] = block
        try:
            names = layout.per_block[i]
            if self.method.data_free:
                _compress_data_free(layout.model, names, layout.plan, self.method.name)
            else:
                self.state = _calibrate_block(self.run, self.block_inputs, block, i, names, self.state, self.spill)
            tensors = _cpu_tensors(block, layout.prefixes[i], set())
        finally:
            layout.block_list[i] = meta_block
            del block
        self.emit(tensors, i + 2, last=i == len(layout.block_list) - 1)

    # ------------------------------------------------------------------ the end
    def finalize(self, hf_config, src: Path, overwrite: bool) -> Path:
        """Rank 0 turns the work folder into ``out`` (shards, index, config.json); every rank waits for it."""
        result = self.out
        if self.writer is not None:
            hf_config.quantization_config = self.config
            config_json = json.loads(hf_config.to_json_string())
            result = self.writer.finalize(config_json, src, overwrite)
        dist_utils.barrier()
        return result


def _in_blocks(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _head_tensors(model: nn.Module, prefixes: list[str], tied: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name in tied or _in_blocks(name, prefixes):
            continue
        if tensor.is_meta:
            raise RuntimeError(f"{name} was not loaded from the checkpoint.")
        out[name] = tensor.detach().to("cpu")
    return out


@torch.no_grad()
def _calibrate_block(
    run: CalibrationRun, block_inputs, block: nn.Module, i: int, names: list[str], state: CalibrationState, spill=None
) -> CalibrationState:
    """Compress the targeted modules of one block in place; returns the state entering the next block (its
    hidden states spilled to memory-mapped files as they are produced when ``spill`` is given)."""
    try:
        return calibrate_block(run, block_inputs, block, i, names, state, store=spill.put if spill is not None else None)
    finally:
        run.commit()  # the block is written next or dropped: its dense modules need not be kept for a rollback


def _calibration_batches(model, src, dataset, tokenizer, num_samples, seq_len, seed, batch_size, text_column, dataset_config, split):
    """All the calibration batches (every rank's), their token ids checked against the model."""
    from ..calibration.data import check_token_ids, model_calibration_batches

    batches = model_calibration_batches(
        dataset, tokenizer, tokenizer_from=src, main_input_name=getattr(model, "main_input_name", "input_ids"),
        num_samples=num_samples, seq_len=seq_len, seed=seed, batch_size=batch_size, text_column=text_column,
        dataset_config=dataset_config, split=split,
    )  # fmt: skip
    check_token_ids(batches, model)
    return batches
