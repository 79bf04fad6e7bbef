"""Size-budgeted search over per-module levels: an EvoPress-style evolutionary search, and a one-shot baseline.

The search looks for the assignment of levels (one per module) that fits the budget and whose assembled model's
next-token distributions are closest to the dense model's, measured as the KL divergence on held-out
calibration windows. It keeps one parent and, each generation, makes ``offspring`` children by *level
switches* (one module one level up, another one level down, as long as the whole checkpoint still fits), then
picks the best of the children and the parent by multi-step selection: every candidate is scored on the first
few tokens, the best ``survivors`` on all of them. The parent starts from the one-shot allocation
(:func:`greedy_allocation`), so the search only improves on it. Everything is seeded.

Candidates are assembled from the :class:`~.levels.LevelDatabase` by swapping compressed modules in and out of one
copy of the model; the result is an ordinary config whose ``overrides`` pin each module's level.
"""

from __future__ import annotations

import copy
import heapq
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import HfCompressConfig
from ..modules import set_submodule
from ..plan.allocation import config_with_layer_specs
from ..spec import LayerSpec
from .budget import Budget
from .levels import LevelDatabase

__all__ = ["SearchResult", "evolutionary_search", "greedy_allocation", "KLFitness"]


def greedy_allocation(db: LevelDatabase, budget: Budget) -> dict[str, int]:
    """The one-shot baseline: every module at the cheapest level, then the upgrades that remove the most measured
    error per added byte, while the checkpoint fits.

    The error of a module at a level is its relative output error on the calibration inputs, weighted by the
    module's parameter count (a larger layer's error moves more of the output). Raises when even the cheapest
    level does not fit.
    """
    assignment = db.uniform(0)
    total = db.total_bytes(assignment)
    if total > budget.nbytes:
        raise ValueError(
            f"budget={budget.text!r} ({budget.nbytes} bytes) is below the smallest checkpoint these levels give "
            f"({total} bytes, every module at {db.levels[0]!r}); raise the budget or add a cheaper level."
        )

    def gain(name: str, level: int) -> float:
        lo, hi = db.levels[level], db.levels[level + 1]
        weight = math.prod(db.sizes.shapes[name])
        added = max(db.nbytes[hi][name] - db.nbytes[lo][name], 1)
        return weight * (db.errors[lo][name] - db.errors[hi][name]) / added

    heap = [(-gain(n, 0), n) for n in db.names if len(db.levels) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        level = assignment[name]
        added = db.nbytes[db.levels[level + 1]][name] - db.nbytes[db.levels[level]][name]
        if total + added > budget.nbytes:
            continue  # this upgrade does not fit; a cheaper one of another module may
        assignment[name] = level + 1
        total += added
        if level + 2 < len(db.levels):
            heapq.heappush(heap, (-gain(name, level + 1), name))
    return assignment


class KLFitness:
    """KL divergence of a model's next-token distributions from the dense model's, on fixed token windows.

    The dense log-probabilities are computed once (``model`` as given, before any module is swapped). A call
    scores the model as it is now on the first ``tokens`` positions of every window (all by default).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> None:
        if windows.dim() != 2 or windows.numel() == 0:
            raise ValueError(f"fitness windows must be a non-empty [windows, tokens] tensor of ids, got shape {tuple(windows.shape)}.")
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.reference = [torch.log_softmax(logits, dim=-1) for logits in self._logits(windows.shape[1])]

    @torch.no_grad()
    def _logits(self, tokens: int) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, self.windows.shape[0], self.batch_size):
            ids = self.windows[start : start + self.batch_size, :tokens].to(device)
            out.append(self.model(input_ids=ids).logits.float())
        return out

    def __call__(self, tokens: int | None = None) -> float:
        tokens = self.windows.shape[1] if tokens is None else min(tokens, self.windows.shape[1])
        total, count = 0.0, 0
        for reference, logits in zip(self.reference, self._logits(tokens)):
            p_log = reference[:, :tokens]
            q_log = torch.log_softmax(logits, dim=-1)
            total += float(F.kl_div(q_log, p_log, log_target=True, reduction="sum"))
            count += p_log.shape[0] * p_log.shape[1]
        return total / count


@dataclass
class SearchResult:
    """What a budget search found.

    ``config``: an ordinary :class:`~hfcompress.HfCompressConfig` whose ``overrides`` pin every module's level
    (compress with it: ``from_pretrained``, :func:`hfcompress.compress` or :func:`hfcompress.oneshot`);
    ``levels``: ``{module: level}``; ``nbytes``: the checkpoint's bytes (every stored tensor); ``kl``: the found
    assignment's fitness, ``baseline_kl`` the one-shot allocation's, ``uniform``: ``(level, kl, nbytes)`` of the
    best single level that fits, if any; ``history``: the parent's fitness after each generation.
    """

    config: HfCompressConfig
    layer_specs: dict[str, LayerSpec]
    levels: dict[str, str]
    budget: Budget
    nbytes: int
    kl: float
    baseline_kl: float
    baseline_levels: dict[str, str]
    uniform: tuple[str, float, int] | None
    history: list[float] = field(default_factory=list)
    generations: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.budget_params

    budget_params: int = 0
    #: the level database the search used: pass it as ``database=`` to search other budgets without rebuilding it
    database: LevelDatabase | None = field(default=None, repr=False)

    def summary(self) -> str:
        uniform = f"; best uniform {self.uniform[0]}: KL {self.uniform[1]:.5f}" if self.uniform else ""
        return (
            f"{len(self.levels)} modules, {self.nbytes / 1e6:.2f} MB of {self.budget.nbytes / 1e6:.2f} MB "
            f"({self.bits_per_weight:.3f} bits/weight); KL {self.kl:.5f} (one-shot allocation {self.baseline_kl:.5f}"
            f"{uniform}) after {self.generations} generations"
        )


class _Assembly:
    """One copy of the model whose searched modules are the database's twins at the current assignment."""

    def __init__(self, model: nn.Module, db: LevelDatabase) -> None:
        self.model, self.db = model, db
        self.current: dict[str, int] = {}

    def set(self, assignment: dict[str, int]) -> None:
        for name, level in assignment.items():
            if self.current.get(name) != level:
                set_submodule(self.model, name, self.db.modules[self.db.levels[level]][name])
                self.current[name] = level


def _mutate(parent: dict[str, int], db: LevelDatabase, budget: int, rng: random.Random, switches: int) -> dict[str, int]:
    """Level switches (one module up, one down) that keep the checkpoint within ``budget``, then upgrades while
    bytes are left."""
    child = dict(parent)
    total = db.total_bytes(child)
    names, top = db.names, len(db.levels) - 1

    def cost(name: str, level: int) -> int:
        return db.nbytes[db.levels[level]][name]

    for _ in range(switches):
        for _attempt in range(20):
            up, down = rng.choice(names), rng.choice(names)
            if up == down or child[up] == top or child[down] == 0:
                continue
            delta = cost(up, child[up] + 1) - cost(up, child[up]) + cost(down, child[down] - 1) - cost(down, child[down])
            if total + delta <= budget:
                child[up] += 1
                child[down] -= 1
                total += delta
                break
    for _attempt in range(len(names)):  # spend what is left on random upgrades
        name = rng.choice(names)
        if child[name] < top and total + cost(name, child[name] + 1) - cost(name, child[name]) <= budget:
            total += cost(name, child[name] + 1) - cost(name, child[name])
            child[name] += 1
    return child


def evolutionary_search(
    model: nn.Module,
    config: HfCompressConfig,
    db: LevelDatabase,
    budget: Budget,
    fitness_windows: torch.Tensor,
    *,
    generations: int = 200,
    offspring: int = 16,
    survivors: int = 4,
    first_tokens: int | None = None,
    switches: int = 2,
    time_limit: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> SearchResult:
    """Search the level assignment of ``db``'s modules under ``budget`` (see the module docstring).

    ``model`` is the dense model (not modified: a copy is assembled). ``fitness_windows``: ``[windows, tokens]``
    token ids held out from the calibration data. ``first_tokens``: tokens per window of the first selection
    step (default: a quarter). ``time_limit``: seconds; the search stops after the generation that crosses it.
    """
    for arg, value, low in (("generations", generations, 0), ("offspring", offspring, 1), ("survivors", survivors, 1), ("switches", switches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg}={value!r} must be an integer >= {low}.")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit={time_limit!r} must be a positive number of seconds (or None).")
    start = time.perf_counter()
    rng = random.Random(seed)
    work = copy.deepcopy(model).eval()
    fitness = KLFitness(work, fitness_windows)
    tokens = fitness_windows.shape[1]
    first = max(1, first_tokens if first_tokens is not None else tokens // 4)
    assembly = _Assembly(work, db)

    def score(assignment: dict[str, int], n: int | None = None) -> float:
        assembly.set(assignment)
        return fitness(n)

    baseline = greedy_allocation(db, budget)
    baseline_kl = score(baseline)
    uniform = None
    for index in reversed(range(len(db.levels))):
        nbytes = db.total_bytes(db.uniform(index))
        if nbytes <= budget.nbytes:
            uniform = (db.levels[index], score(db.uniform(index)), nbytes)
            break
    parent, parent_kl = baseline, baseline_kl
    history = []
    deadline = None if time_limit is None else start + time_limit
    generation = 0
    with tqdm(total=generations, desc="budget search", unit="gen", disable=not show_progress) as progress:
        for generation in range(1, generations + 1):
            children = [_mutate(parent, db, budget.nbytes, rng, rng.randint(1, switches)) for _ in range(offspring)]
            quick = sorted(range(len(children)), key=lambda i: score(children[i], first))[:survivors]
            for i in quick:
                kl = score(children[i])
                if kl < parent_kl:
                    parent, parent_kl = children[i], kl
            history.append(parent_kl)
            progress.set_postfix(kl=f"{parent_kl:.5f}")
            progress.update(1)
            if deadline is not None and time.perf_counter() > deadline:
                break
    specs = db.specs(parent)
    searched, _ = config_with_layer_specs(model, config, specs)
    return SearchResult(
        config=searched, layer_specs=specs, levels={n: db.levels[i] for n, i in parent.items()}, budget=budget,
        nbytes=db.total_bytes(parent), kl=parent_kl, baseline_kl=baseline_kl,
        baseline_levels={n: db.levels[i] for n, i in baseline.items()}, uniform=uniform, history=history,
        generations=generation, seconds={"search": time.perf_counter() - start}, budget_params=db.sizes.params,
        database=db,
    )  # fmt: skip
