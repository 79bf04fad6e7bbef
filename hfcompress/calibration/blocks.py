"""Finding a model's repeated blocks and capturing the inputs each block receives.

The pipeline compresses a model block by block (decoder layers, encoder layers). :func:`find_blocks`
locates the block list generically: the ``nn.ModuleList`` made of the model's ``_no_split_modules``
classes (transformers' own notion of a "layer that must stay on one device"), else the homogeneous
``nn.ModuleList`` holding the most parameters; ``blocks="model.layers"`` overrides the search.

:func:`capture_block_inputs` runs the model on the calibration batches with every block's ``forward``
temporarily replaced by a recorder that passes its hidden states through unchanged, so only the layers
*before* the first block compute (embeddings, rotary tables, masks). It records, per batch, the hidden
states entering block 0 and, per block, the other arguments (attention masks, position embeddings...),
which the model computes once and passes to every block, so holding them costs no extra memory. Models
that give each block its own mask (sliding-window layers) are therefore handled exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BlockInputs", "capture_block_inputs", "find_blocks", "model_call_kwargs"]


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(name, module_list)`` of the repeated blocks the pipeline walks through."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r} is not a submodule of {type(model).__name__}.") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"blocks={blocks!r} is a {type(found).__name__}; it must name a non-empty nn.ModuleList.")
        return blocks, found
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        preferred = next(iter(kinds)).__name__ in no_split
        candidates.append((preferred, _param_count(module), name, module))
    if not candidates:
        raise ValueError(
            f"Could not find the repeated blocks of {type(model).__name__} (no nn.ModuleList of identical layers); "
            "pass blocks='<name of the layer list>', e.g. blocks='model.layers'."
        )
    preferred, _, name, module = max(candidates, key=lambda c: (c[0], c[1]))
    return name, module


class _StopForward(Exception):
    """Raised by the recorder of the last block: nothing after the blocks needs to run."""


@dataclass
class BlockInputs:
    """What the blocks receive for each calibration batch.

    ``hidden[b]``: the hidden states entering block 0 for batch ``b``; ``args[i][b]`` / ``kwargs[i][b]``: the
    other positional/keyword arguments block ``i`` receives; ``hidden_key``: ``None`` when hidden states
    are the first positional argument, else the keyword they are passed as.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[tuple]] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)
    hidden_key: str | None = None
    output_template: Any = None
    #: samples per calibration batch (the leading size of ``hidden[b]``)
    rows: list[int] = field(default_factory=list)

    def call(self, block: nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` (number ``index``) on ``hidden`` with the recorded arguments of ``batch``."""
        return self._run(block, hidden, self.args[index][batch], self.kwargs[index][batch])

    def _run(self, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.hidden_key is None:
            return first_tensor(block(hidden, *args, **kwargs))
        return first_tensor(block(*args, **{**kwargs, self.hidden_key: hidden}))

    def call_rows(self, block: nn.Module, index: int, batch: int, rows: slice, hidden: torch.Tensor) -> torch.Tensor:
        """Like :meth:`call` for the samples ``rows`` of ``batch`` only (``hidden`` holds just those rows).

        Recorded arguments with a leading batch dimension (tensors of two or more dimensions whose first
        size is the batch's, such as attention masks, position ids and rotary tables) are sliced alike;
        the others (broadcast or per-position tensors, flags) are passed as recorded.
        """
        size = self.rows[batch]

        def cut(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v[rows] if v.dim() >= 2 and v.shape[0] == size else v
            if isinstance(v, (tuple, list)):
                return type(v)(cut(x) for x in v)
            return v

        args = tuple(cut(a) for a in self.args[index][batch])
        return self._run(block, hidden, args, {k: cut(v) for k, v in self.kwargs[index][batch].items()})


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden states of a block output (a tensor, a tuple starting with it, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    raise TypeError(f"Cannot find the hidden states in a block output of type {type(out).__name__}.")


def _mimic(template: Any, hidden: torch.Tensor) -> Any:
    if isinstance(template, torch.Tensor):
        return hidden
    if isinstance(template, tuple):
        return (hidden,) + tuple(template[1:])
    if isinstance(template, list):
        return [hidden] + list(template[1:])
    return hidden


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that keep a forward cheap during calibration (no KV cache)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]]) -> BlockInputs:
    """Record what every block receives for each batch (see module docstring); the model is restored."""
    n = len(blocks)
    rec = BlockInputs(args=[[] for _ in range(n)], kwargs=[[] for _ in range(n)])
    originals = [blk.__dict__.get("forward") for blk in blocks]
    true_forwards = [blk.forward for blk in blocks]

    def recorder(i: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
                key = None
            elif "hidden_states" in kwargs:
                hidden, rest, key = kwargs["hidden_states"], (), "hidden_states"
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            else:
                raise ValueError(
                    f"Block {i} was called without positional arguments or hidden_states=; pass blocks=... naming "
                    "a list of layers that take hidden states first."
                )
            if i == 0:
                rec.hidden_key = key
                rec.hidden.append(hidden)
                rec.rows.append(int(hidden.shape[0]))
                if rec.output_template is None:
                    full = {**kwargs, key: hidden} if key else kwargs
                    rec.output_template = true_forwards[0](*((hidden,) + rest if key is None else rest), **full)
            rec.args[i].append(rest)
            rec.kwargs[i].append(kwargs)
            if i == n - 1:
                raise _StopForward
            return _mimic(rec.output_template, hidden)

        return forward

    extra = model_call_kwargs(model)
    try:
        for i, blk in enumerate(blocks):
            blk.forward = recorder(i)
        for batch in batches:
            try:
                model(**batch, **extra)
            except _StopForward:
                pass
            else:
                raise RuntimeError(
                    "The model finished its forward without calling its last block; the block list found by hfcompress "
                    "is not the one the model runs. Pass blocks='<name of the layer list>'."
                )
    finally:
        for blk, original in zip(blocks, originals):
            if original is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = original
    rec.output_template = None
    return rec
