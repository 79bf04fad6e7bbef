"""Data-parallel calibration over ``torch.distributed`` (launched with ``accelerate launch`` or ``torchrun``).

Every process runs the same script; each one forwards its own share of the calibration batches
(:func:`shard_batches`: batch ``b`` goes to rank ``b % world_size``) through the current block. The
statistics reducer :func:`all_reduce_sums` (passed as ``reduce=`` to the calibration pipeline, or set for
a block of code by :func:`reduced_statistics`) sums the float64 statistics of each module (``sum x x^T``,
``sum x**2``, the token count) over the processes the moment they are read, before ``compress_layer`` runs. Every rank then holds the statistics a single process would have
accumulated over all batches, up to the order of the float64 additions (which, after the cast to the
float32 statistics methods receive, almost never shows), and runs the deterministic algorithm on them: all
ranks hold the same compressed block, compute their next hidden states from it, and rank 0 writes files.
(:func:`all_reduce_layer_stats`/:func:`data_parallel_method` do the same from a method's float32
:class:`~hfcompress.calibration.stats.LayerStats`, for custom loops; they are only float32-accurate.)

The process group is the one ``accelerate launch``/``torchrun`` sets up through the usual environment
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...): :func:`init_from_env` creates it with the
``gloo`` backend on CPU and ``nccl`` when CUDA is available. Nothing here does anything in a single
process, so the same code path serves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_layer_stats",
    "all_reduce_sums",
    "data_parallel_method",
    "reduced_statistics",
    "barrier",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "shard_batches",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by the launcher's environment; returns whether one is active.

    A no-op (returning False) when the script was not started by a launcher (``WORLD_SIZE`` unset or 1),
    or when a group already exists (e.g. created by ``accelerate.Accelerator()``).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend={backend!r} is not a torch.distributed backend; use 'gloo' (CPU) or 'nccl' (GPU).")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shard_batches(batches: list[T]) -> list[T]:
    """This process's share of the calibration batches (round robin; all of them in a single process)."""
    n = world_size()
    if n == 1:
        return list(batches)
    if len(batches) < n:
        raise ValueError(
            f"{len(batches)} calibration batches cannot feed {n} processes; lower batch_size or raise num_samples so "
            f"there are at least {n} batches."
        )
    return list(batches[rank() :: n])


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_layer_stats(stats: Any) -> Any:
    """The :class:`~hfcompress.calibration.stats.LayerStats` of all ranks' inputs together.

    Each rank's statistics are turned back into sums (``hessian``-like fields times ``n/2``, ``act_sq`` as
    is) in float64, summed over the ranks and normalised by the total token count, exactly as one process
    would have normalised its own sums. A rank whose share never reached the layer (``nsamples == 0``,
    identity statistics) contributes zeros; if no rank saw it, the identity statistics are kept.
    """
    if not is_distributed():
        return stats
    n_local = int(stats.nsamples)
    fields = [f.name for f in dataclasses.fields(stats) if isinstance(getattr(stats, f.name), torch.Tensor)]
    count = torch.tensor([float(n_local)], dtype=torch.float64)
    count = count.to(_reduce_device())
    dist.all_reduce(count)
    total = int(count.item())
    if total == 0:
        return stats
    values = {}
    for name in fields:
        value = getattr(stats, name)
        local = value.double() if name == "act_sq" else value.double() * (n_local / 2.0)
        if n_local == 0:
            local = torch.zeros_like(local)
        red = local.to(_reduce_device())
        dist.all_reduce(red)
        red = red.to(value.device)
        values[name] = (red if name == "act_sq" else red * (2.0 / total)).to(value.dtype)
    return dataclasses.replace(stats, **values, nsamples=total)


def data_parallel_method(method: Any) -> Any:
    """``method`` whose ``compress_layer`` first all-reduces its statistics over the process group.

    Every rank calls ``compress_layer`` for the same modules in the same order (the pipeline walks the
    same plan), which is what the collective operations need; each then compresses from the same
    statistics. In a single process the method is returned unchanged.
    """
    if not is_distributed() or method.compress_layer is None:
        return method
    inner = method.compress_layer

    def compress_layer(weight2d, stats, spec, method_args):
        return inner(weight2d, all_reduce_layer_stats(stats), spec, method_args)

    return dataclasses.replace(method, compress_layer=compress_layer)


def all_reduce_sums(name: str, sums: Any) -> Any:
    """A statistics reducer (see :mod:`hfcompress.calibration.stats`): ``sums`` of module ``name`` summed
    over the process group.

    The float64 sums and the token count are all-reduced before the collector normalises them, so every
    rank gets what one process would have accumulated over all batches, up to the order of float64
    additions. Every rank must read the same modules in the same order (the pipeline walks the same plan
    on all of them), which keeps the collective calls matched. In a single process ``sums`` is returned.
    """
    if not is_distributed():
        return sums
    device = _reduce_device()
    count = torch.tensor([float(sums.nsamples)], dtype=torch.float64, device=device)
    dist.all_reduce(count)
    values = {}
    for field in ("xtx", "act_sq", "cross"):
        value = getattr(sums, field)
        if value is None:
            continue
        red = value.to(device)
        dist.all_reduce(red)
        values[field] = red.to(value.device)
    return dataclasses.replace(sums, **values, nsamples=int(count.item()))


@contextlib.contextmanager
def reduced_statistics() -> Iterator[None]:
    """Inside this context, every :class:`~hfcompress.calibration.stats.StatsCollector` created (e.g. by
    :func:`hfcompress.oneshot`) sums its float64 statistics over the process group with
    :func:`all_reduce_sums` before a method reads them.

    This is exact up to the order of float64 additions (a sum of per-rank partial sums instead of one
    running sum), so the float32 statistics the method receives are nearly always bit-identical to one
    process's; :func:`all_reduce_layer_stats` works from the float32 statistics instead and is only
    float32-accurate, which GPTQ's sequential error feedback can amplify into different roundings.
    A no-op in a single process.
    """
    if not is_distributed():
        yield
        return
    from .calibration.stats import reducing

    with reducing(all_reduce_sums):
        yield
