"""Data-parallel calibration over ``torch.distributed`` (launched with ``accelerate launch`` or ``torchrun``).

Every process runs the same script; each one forwards its own share of the calibration batches
(:func:`shard_batches`: batch ``b`` goes to rank ``b % world_size``) through the current block, then the
statistics every calibrated method reads (``sum x x^T`` and ``sum x**2`` accumulated in float64, and the
token count) are summed over the processes with :func:`all_reduce_stats` before ``compress_layer`` runs.
Every rank then holds exactly the statistics a single process would have accumulated over all batches,
up to the order of the floating-point additions, and runs the (deterministic) algorithm on them, so all
ranks hold the same compressed block and compute their next hidden states from it. Rank 0 writes files.

The process group is the one ``accelerate launch``/``torchrun`` sets up through the usual environment
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...): :func:`init_from_env` creates it with the
``gloo`` backend on CPU and ``nccl`` when CUDA is available. Nothing here does anything in a single
process, so the same code path serves both.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_stats",
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


def _reduce_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_stats(collector: Any) -> None:
    """Sum the accumulated statistics of a :class:`~hfcompress.calibration.stats.StatsCollector` over all ranks.

    Works on the float64 accumulators (before the ``2/n`` scaling), so the reduced statistics are those of
    one process that saw every batch. A rank whose share never reached a module contributes zeros.
    """
    if not is_distributed():
        return
    names = sorted(collector._acc)  # same order on every rank
    counts = torch.tensor([collector._acc[n].n for n in names], dtype=torch.float64)
    counts = counts.to(_reduce_device(counts))
    dist.all_reduce(counts)
    for name, total in zip(names, counts.tolist()):
        acc = collector._acc[name]
        module = collector.modules[name]
        cols = module.weight.reshape(module.weight.shape[0], -1).shape[1]
        device = module.weight.device
        if "hessian" in collector.needs:
            xtx = acc.xtx if acc.xtx is not None else torch.zeros(cols, cols, dtype=torch.float64, device=device)
            red = xtx.to(_reduce_device(xtx))
            dist.all_reduce(red)
            acc.xtx = red.to(device)
        if "act_sq" in collector.needs:
            sq = acc.sq if acc.sq is not None else torch.zeros(cols, dtype=torch.float64, device=device)
            red = sq.to(_reduce_device(sq))
            dist.all_reduce(red)
            acc.sq = red.to(device)
        acc.n = int(total)
        if acc.n == 0:  # no rank saw it: keep the collector's identity-statistics convention
            acc.xtx = acc.sq = None
    collector._last = None
