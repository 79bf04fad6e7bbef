"""Compressed adapters and task vectors: ComPEFT (sparse ternary) and DARE (drop and rescale).

A *delta* is a dict ``{name: tensor}``: the tensors of a LoRA adapter (``lora_A``/``lora_B`` weights, as
PEFT stores them) or a task vector ``θ_finetuned − θ_base`` (:func:`task_vector`). Two compressors:

* **ComPEFT** (Yadav et al., 2023): keep the ``density`` fraction of entries with the largest magnitude
  (exact count, ties broken by position) and replace each by ``sign · s``: one scale per tensor, so a
  tensor costs 1 mask bit per entry + 1 sign bit per kept entry. ``s`` is ``alpha · std(τ)`` as in the
  paper (``alpha`` tuned on validation data), or, with ``alpha=None`` (default), the least-squares
  optimal scale for the kept signs, ``mean |τ_kept|``;
* **DARE** (Yu et al., 2024): drop each entry with probability ``1 − density`` and rescale the kept ones by
  ``1 / density``, so the delta is unchanged in expectation; kept values are stored as they are.

On-disk format (``.safetensors``, all tensors of one delta in one file)
=======================================================================

The safetensors header metadata holds ``format = "hfcompress-delta"``, ``format_version = "1"``,
``method`` (``"compeft"``/``"dare"``), ``params`` (JSON: ``density``, ``alpha`` or ``seed``) and
``mask_codec`` (``"zstd"``). For every original tensor ``<name>`` (row-major, ``n`` entries, ``k`` kept):

==================  ====================================  ==========================================
tensor              dtype / shape                         content
==================  ====================================  ==========================================
``<name>.shape``    int64 ``[ndim]``                      the original shape
``<name>.dtype``    the original dtype ``[0]``            empty tensor carrying the original dtype
``<name>.mask``     uint8 ``[bytes]``                     zstd frame of the keep bitmask: ``ceil(n/8)``
                                                          bytes, entry ``j`` = bit ``j % 8`` of byte ``j // 8``
``<name>.signs``    uint8 ``[ceil(k/8)]``                 ComPEFT: 1 = positive, same bit order
``<name>.scale``    float32 ``[]``                        ComPEFT: the tensor's scale ``s``
``<name>.values``   original dtype ``[k]``                DARE: the kept, rescaled values
==================  ====================================  ==========================================

A compressed LoRA adapter is a folder with PEFT's ``adapter_config.json`` (and hfcompress's policy file)
and ``adapter_model.hfcdelta.safetensors`` in this format instead of ``adapter_model.safetensors``;
:func:`load_compressed_adapter` decodes it into a normal :class:`peft.PeftModel`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..bitpack import pack_codes, unpack_codes
from ..modules import CompressedModule
from ..outputs import OutputFolder, write_file_atomic
from .masks import sparsity_mask

__all__ = [
    "COMPRESSED_ADAPTER_FILE",
    "DELTA_FORMAT",
    "METHODS",
    "CompressedDelta",
    "CompressedTensor",
    "apply_task_vector",
    "compeft",
    "compress_delta",
    "dare",
    "load_compressed_adapter",
    "save_compressed_adapter",
    "task_vector",
]

DELTA_FORMAT = "hfcompress-delta"
FORMAT_VERSION = "1"
METHODS = ("compeft", "dare")
#: file name of a compressed LoRA adapter's weights, next to PEFT's adapter_config.json
COMPRESSED_ADAPTER_FILE = "adapter_model.hfcdelta.safetensors"
_SUFFIXES = (".shape", ".dtype", ".mask", ".signs", ".scale", ".values")


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density={density!r} must be a number in (0, 1], the fraction of entries kept (e.g. 0.1).")
    return float(density)


@dataclass
class CompressedTensor:
    """One compressed tensor: keep-mask plus signs and scale (ComPEFT) or kept values (DARE)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    mask: torch.Tensor  # bool [numel], row-major
    signs: torch.Tensor | None = None  # bool [k] (ComPEFT)
    scale: float | None = None  # ComPEFT
    values: torch.Tensor | None = None  # [k] in dtype (DARE)

    @property
    def numel(self) -> int:
        return self.mask.numel()

    @property
    def kept(self) -> int:
        return int(self.mask.sum())

    def decode(self) -> torch.Tensor:
        """The dense tensor in its original shape and dtype."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        if self.signs is not None:
            out[self.mask] = torch.where(self.signs, self.scale, -self.scale).float()
        else:
            out[self.mask] = self.values.float()
        return out.to(self.dtype).reshape(self.shape)

    def nbytes(self) -> int:
        """Bytes of the stored form (mask before zstd, signs, scale or values)."""
        n = (self.numel + 7) // 8
        if self.signs is not None:
            return n + (self.kept + 7) // 8 + 4
        return n + self.values.numel() * self.values.element_size()


def compeft(tensor: torch.Tensor, density: float = 0.1, alpha: float | None = None) -> CompressedTensor:
    """ComPEFT: the ``density`` largest-magnitude entries as ``sign · scale``, the rest zero.

    ``alpha=None``: ``scale = mean |kept|`` (least-squares optimal for the kept signs); a number:
    ``scale = alpha · std(tensor)`` (the paper's parametrisation, tune ``alpha`` on validation data).
    """
    density = _check_density(density)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf):
        raise ValueError(f"alpha={alpha!r} must be a positive finite number (scale = alpha * std), or None for the least-squares scale.")
    flat = tensor.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the tensor holds NaN or infinite values; a delta must be finite (check the training run).")
    k = int(round(density * flat.numel()))
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    kept = flat[mask]
    if alpha is None:
        scale = float(kept.abs().mean()) if k else 0.0
    else:
        scale = float(alpha * flat.std()) if flat.numel() > 1 else 0.0
    return CompressedTensor(tuple(tensor.shape), tensor.dtype, mask, signs=kept > 0, scale=scale)


def dare(tensor: torch.Tensor, density: float = 0.1, generator: torch.Generator | None = None) -> CompressedTensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by ``density``."""
    density = _check_density(density)
    flat = tensor.detach().reshape(-1).cpu()
    mask = torch.rand(flat.numel(), generator=generator) < density
    values = (flat[mask].float() / density).to(tensor.dtype)
    return CompressedTensor(tuple(tensor.shape), tensor.dtype, mask, values=values)


@dataclass
class CompressedDelta:
    """A compressed delta (``{name: CompressedTensor}``) with the method and parameters that made it."""

    method: str
    params: dict[str, Any]
    tensors: dict[str, CompressedTensor]

    def decode(self) -> dict[str, torch.Tensor]:
        return {name: t.decode() for name, t in self.tensors.items()}

    def stats(self) -> dict[str, float]:
        """Entries, kept entries, density and stored bits per original entry (before zstd on the masks)."""
        n = sum(t.numel for t in self.tensors.values())
        k = sum(t.kept for t in self.tensors.values())
        b = sum(t.nbytes() for t in self.tensors.values())
        return {"entries": n, "kept": k, "density": k / n if n else 0.0, "bits_per_entry": 8 * b / n if n else 0.0}

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike) -> Path:
        """Write the delta to one ``.safetensors`` file (atomically; format in the module docstring)."""
        path = Path(path)
        cctx = zstandard.ZstdCompressor(level=19)
        out: dict[str, torch.Tensor] = {}
        for name, t in self.tensors.items():
            if any(name.endswith(s) for s in _SUFFIXES):
                raise ValueError(f"tensor name {name!r} ends with a reserved suffix {_SUFFIXES}; rename it.")
            packed = pack_codes(t.mask.reshape(1, -1).to(torch.uint8), 1).reshape(-1).numpy().tobytes()
            out[f"{name}.shape"] = torch.tensor(t.shape, dtype=torch.int64)
            out[f"{name}.dtype"] = torch.empty(0, dtype=t.dtype)
            out[f"{name}.mask"] = torch.frombuffer(bytearray(cctx.compress(packed)), dtype=torch.uint8)
            if t.signs is not None:
                out[f"{name}.signs"] = pack_codes(t.signs.reshape(1, -1).to(torch.uint8), 1).reshape(-1)
                out[f"{name}.scale"] = torch.tensor(t.scale, dtype=torch.float32)
            else:
                out[f"{name}.values"] = t.values.contiguous()
        metadata = {
            "format": DELTA_FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "params": json.dumps(self.params, sort_keys=True),
            "mask_codec": "zstd",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_file_atomic(path, lambda tmp: save_file(out, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressedDelta":
        """Read a file written by :meth:`save`; raises ``ValueError`` for other or damaged files."""
        path = Path(path)
        dctx = zstandard.ZstdDecompressor()
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != DELTA_FORMAT:
                raise ValueError(f"{path} is not an hfcompress delta file (metadata format={meta.get('format')!r}).")
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path} has delta format version {meta.get('format_version')!r}; this hfcompress reads {FORMAT_VERSION!r}.")
            method = meta.get("method")
            if method not in METHODS:
                raise ValueError(f"{path} was compressed with unknown method {method!r}; known: {METHODS}.")
            keys = set(f.keys())
            names = sorted(k[: -len(".shape")] for k in keys if k.endswith(".shape"))
            tensors = {}
            for name in names:
                shape = tuple(int(s) for s in f.get_tensor(f"{name}.shape").tolist())
                dtype = f.get_tensor(f"{name}.dtype").dtype
                n = 1
                for s in shape:
                    n *= s
                try:
                    raw = dctx.decompress(f.get_tensor(f"{name}.mask").numpy().tobytes())
                except (zstandard.ZstdError, KeyError) as exc:
                    raise ValueError(f"{path}: the mask of {name!r} is missing or damaged ({exc}).") from None
                if len(raw) != (n + 7) // 8:
                    raise ValueError(f"{path}: the mask of {name!r} holds {len(raw)} bytes, expected {(n + 7) // 8}.")
                mask = unpack_codes(torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(1, -1), 1, n).reshape(-1).bool()
                k = int(mask.sum())
                if method == "compeft":
                    signs = unpack_codes(f.get_tensor(f"{name}.signs").reshape(1, -1), 1, k).reshape(-1).bool()
                    scale = float(f.get_tensor(f"{name}.scale"))
                    if not math.isfinite(scale):
                        raise ValueError(f"{path}: the scale of {name!r} is {scale}; the file is damaged.")
                    tensors[name] = CompressedTensor(shape, dtype, mask, signs=signs, scale=scale)
                else:
                    values = f.get_tensor(f"{name}.values")
                    if values.numel() != k:
                        raise ValueError(f"{path}: {name!r} stores {values.numel()} values but its mask keeps {k}.")
                    tensors[name] = CompressedTensor(shape, dtype, mask, values=values)
        return cls(method=method, params=json.loads(meta.get("params", "{}")), tensors=tensors)


def compress_delta(
    tensors: dict[str, torch.Tensor],
    method: str = "compeft",
    density: float = 0.1,
    *,
    alpha: float | None = None,
    seed: int = 0,
) -> CompressedDelta:
    """Compress every floating tensor of ``tensors`` with ComPEFT or DARE (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}.")
    _check_density(density)
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("tensors must be a non-empty dict {name: tensor}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int.")
    out = {}
    params: dict[str, Any] = {"density": density}
    if method == "compeft":
        params["alpha"] = alpha
    else:
        params["seed"] = seed
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"tensors[{name!r}] must be a floating tensor, got {getattr(t, 'dtype', type(t))}.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensors[{name!r}] holds NaN or infinite values; a delta must be finite (check the training run).")
        out[name] = compeft(t, density, alpha) if method == "compeft" else dare(t, density, gen)
    return CompressedDelta(method=method, params=params, tensors=out)


# ---------------------------------------------------------------------------------------------- task vectors
def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating parameters by name, with compressed modules' weights decoded (``<module>.weight``)."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.is_floating_point()}
    for name, m in model.named_modules():
        if isinstance(m, CompressedModule):
            out[f"{name}.weight"] = m.dequantize_weight(torch.float32)
    return out


@torch.no_grad()
def task_vector(finetuned: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: θ_finetuned − θ_base}`` (float32) over the floating weights the two models share and that changed."""
    ft, b = _dense_state(finetuned), _dense_state(base)
    out = {}
    for name, t in ft.items():
        if name in b and b[name].shape == t.shape:
            d = t.float() - b[name].float().to(t.device)
            if bool((d != 0).any()):
                out[name] = d.cpu()
    return out


@torch.no_grad()
def apply_task_vector(model: nn.Module, delta: dict[str, torch.Tensor] | CompressedDelta, scale: float = 1.0):
    """Add ``scale · delta`` to ``model``'s weights in place; returns the merge reports of compressed modules.

    Dense parameters are updated directly. A compressed module's ``<module>.weight`` entry is merged with
    :func:`~hfcompress.peft.merge.merge_into`: the update is masked with the module's sparsity mask and
    re-quantized on its grid, so its structure never changes. Unknown names raise before anything changes.
    """
    from .merge import MergeReport, merge_into

    tensors = delta.decode() if isinstance(delta, CompressedDelta) else dict(delta)
    params = dict(model.named_parameters())
    compressed = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, CompressedModule)}
    unknown = [n for n in tensors if n not in params and n not in compressed]
    if unknown:
        raise ValueError(f"delta names {unknown[:3]} (and {max(0, len(unknown) - 3)} more) are not weights of the model.")
    for name, t in tensors.items():
        target = params[name].shape if name in params else compressed[name].dense_shape
        if tuple(t.shape) != tuple(target):
            raise ValueError(f"delta {name!r} has shape {tuple(t.shape)}, the model's weight {tuple(target)}.")
    report = MergeReport()
    for name, t in tensors.items():
        if name in params:
            p = params[name]
            p.add_((scale * t.float()).to(device=p.device, dtype=p.dtype))
            continue
        m = compressed[name]
        mask = sparsity_mask(m)
        update = scale * t.float().reshape(m.shape2d).to(next(iter(m.compressed_tensors().values())).device)
        if mask is not None:
            update = update * mask
        target = m.dequantize_weight(torch.float32).reshape(m.shape2d) + update
        report.layers.append(merge_into(m, target, name=name.removesuffix(".weight"), adapters=["task_vector"]))
    return report


# ---------------------------------------------------------------------------------------------- adapters
def save_compressed_adapter(
    peft_model, path: str | os.PathLike, method: str = "compeft", density: float = 0.1, *, alpha: float | None = None,
    seed: int = 0, overwrite: bool = False,
) -> CompressedDelta:
    """Save a LoRA adapter with its ``lora_A``/``lora_B`` tensors compressed by ComPEFT or DARE.

    ``peft_model`` is a :class:`peft.PeftModel` (its active adapter is saved). The folder gets PEFT's
    ``adapter_config.json``, hfcompress's policy file and :data:`COMPRESSED_ADAPTER_FILE`; it is written in
    a temporary folder and moved into place (:class:`hfcompress.outputs.OutputFolder`: an existing ``path`` is
    replaced only with ``overwrite=True`` and only if hfcompress wrote it). Returns the compressed delta
    (``.stats()`` gives its size).
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from .api import save_adapter

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}.")
    path = Path(path)
    state = get_peft_model_state_dict(peft_model, adapter_name=peft_model.active_adapter)
    delta = compress_delta({k: v.detach().cpu() for k, v in state.items()}, method, density, alpha=alpha, seed=seed)
    with OutputFolder(path, overwrite=overwrite, kind="adapter", what="path") as tmp:
        save_adapter(peft_model, tmp)
        for f in ("adapter_model.safetensors", "adapter_model.bin"):
            (tmp / f).unlink(missing_ok=True)
        delta.save(tmp / COMPRESSED_ADAPTER_FILE)
    return delta


def load_compressed_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default", is_trainable: bool = False, **policy):
    """Load a folder written by :func:`save_compressed_adapter` onto ``model``; returns a :class:`peft.PeftModel`.

    The adapter is built from ``adapter_config.json`` (hfcompress layers registered with the saved policy,
    overridable through ``policy`` keywords) and receives the decoded tensors.
    """
    from peft import PeftConfig
    from peft import get_peft_model as peft_get_peft_model
    from peft.utils import set_peft_model_state_dict

    from .api import _read_policy, decode_once, expand_all_linear
    from .layer import register_compressed_lora

    path = Path(path)
    file = path / COMPRESSED_ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {COMPRESSED_ADAPTER_FILE}; save it with save_compressed_adapter.")
    config = PeftConfig.from_pretrained(str(path))
    settings = {**_read_policy(path), **policy}
    register_compressed_lora(config, **settings)
    config.inference_mode = not is_trainable
    expand_all_linear(config, model)
    delta = CompressedDelta.load(file)
    with decode_once(model):
        peft_model = peft_get_peft_model(model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, delta.decode(), adapter_name=adapter_name)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{len(missing)} compressed adapter tensors match no module of the model, e.g. {missing[0]!r}.")
    if not is_trainable:
        peft_model.eval()
    return peft_model
