"""`LayerSpec`: how one weight is compressed (bits, groups, sparsity, ...), validated in one place.

A :class:`~hfcompress.HfCompressConfig` holds a default spec and optional per-target overrides; the
target resolver turns them into one frozen :class:`LayerSpec` per compressed module.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")
CLIP_MODES = ("minmax", "mse")
_NM = re.compile(r"^(\d+):(\d+)$")
#: largest M of an N:M pattern (the ``nm`` format ranks each group's pattern in at most 64 bits)
MAX_NM_M = 64


@dataclass(frozen=True)
class LayerSpec:
    """Compression settings of one weight.

    Args:
        bits: width of the integer codes (2, 3, 4, 5, 6 or 8), or ``None`` to keep values in floating point.
        group_size: columns sharing one scale; ``None`` (or ``-1``) means one scale per output channel. Any
            positive size works, also one that does not divide the input width (the last group is shorter).
        symmetric: symmetric grid (implicit zero point) or asymmetric (stored integer zero point).
        scale_dtype: dtype scales are stored in: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        clip: ``"minmax"`` uses each group's full range; ``"mse"`` searches the range shrink that minimises
            the group's quantization error.
        sparsity: fraction of weights set to zero, in ``[0, 1)``.
        sparsity_structure: ``"unstructured"`` or ``"N:M"`` (at most N non-zeros in every M consecutive inputs,
            e.g. ``"2:4"``).
    """

    bits: int | None = None
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: str = "float16"
    clip: str = "minmax"
    sparsity: float = 0.0
    sparsity_structure: str = "unstructured"

    def __post_init__(self) -> None:
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, where: str = "") -> None:
        """Raise ``TypeError`` (wrong type) or ``ValueError`` (bad value) naming the setting and the fix."""
        at = f" (in {where})" if where else ""
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int)):
            raise TypeError(f"bits={self.bits!r}{at} must be an int (one of {SUPPORTED_BITS}) or None, not {type(self.bits).__name__}.")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r}{at} is not supported; use one of {SUPPORTED_BITS} or None.")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)):
            raise TypeError(
                f"group_size={self.group_size!r}{at} must be a positive int, or None/-1 for per-channel scales, "
                f"not {type(self.group_size).__name__}."
            )
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(
                f"group_size={self.group_size!r}{at} must be a positive integer, or None/-1 for per-channel scales."
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r}{at} must be True or False, not {type(self.symmetric).__name__}.")
        for name, allowed in (("scale_dtype", SCALE_DTYPES), ("clip", CLIP_MODES), ("sparsity_structure", None)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name}={value!r}{at} must be a string, not {type(value).__name__}.")
            if allowed is not None and value not in allowed:
                raise ValueError(f"{name}={value!r}{at} is not supported; use one of {allowed}.")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity={self.sparsity!r}{at} must be a number in [0, 1), not {type(self.sparsity).__name__}.")
        if not 0 <= self.sparsity < 1:  # also refuses NaN
            raise ValueError(f"sparsity={self.sparsity!r}{at} must be a number in [0, 1), e.g. 0.5.")
        if self.sparsity_structure != "unstructured":
            n, m = parse_nm(self.sparsity_structure, where)
            if self.sparsity and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity}{at} contradicts sparsity_structure={self.sparsity_structure!r}, "
                    f"which fixes sparsity at {1 - n / m:g}; leave sparsity out or set it to {1 - n / m:g}."
                )

    # ------------------------------------------------------------------ derived
    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.sparsity_structure == "unstructured" else parse_nm(self.sparsity_structure)

    @property
    def effective_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)

    @property
    def sparse(self) -> bool:
        return self.effective_sparsity > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_updates(self, **changes: Any) -> "LayerSpec":
        return replace(self, **changes)


def parse_nm(structure: str, where: str = "") -> tuple[int, int]:
    at = f" (in {where})" if where else ""
    match = _NM.match(str(structure))
    if not match:
        raise ValueError(
            f"sparsity_structure={structure!r}{at} is not understood; use 'unstructured' or 'N:M' such as '2:4'."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ValueError(
            f"sparsity_structure={structure!r}{at} needs 0 <= N < M and N >= 1 (keep N of every M consecutive "
            "weights), e.g. '2:4'."
        )
    if m > MAX_NM_M:
        raise ValueError(f"sparsity_structure={structure!r}{at} has M={m}; hfcompress supports M <= {MAX_NM_M} (e.g. '2:4', '4:8').")
    return n, m
