"""Perplexity, the number every compression paper reports, computed the standard way.

Protocol (GPTQ/SparseGPT/llm-compressor): tokenize the whole text once, cut it into consecutive windows
of ``seq_len`` tokens (``stride`` < ``seq_len`` gives overlapping windows whose first
``seq_len - stride`` tokens serve as context only), score each window's next-token loss, and report
``exp(mean token NLL)``. Computation runs in the model's dtype; load the model in float32 for the
reference numbers.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import math
from importlib import resources

import torch
from tqdm.auto import tqdm

#: SHA-256 of WikiText-2 raw test (``wiki.test.raw`` of ``wikitext-2-raw-v1``), as published upstream
WIKITEXT2_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
_WIKITEXT2_RESOURCE = ("data", "wikitext-2-raw", "wiki.test.raw.xz")


@functools.lru_cache(maxsize=1)
def wikitext2_test_text() -> str:
    """WikiText-2 raw test, the copy shipped inside the package (xz-compressed, SHA-256 checked).

    Line ends are normalised to ``\\n`` (the file has CRLF), as Python's text mode reads the file; see
    ``hfcompress/data/wikitext-2-raw/README.md`` for its source and licence. No network, no file outside
    the installed package.
    """
    resource = resources.files("hfcompress").joinpath(*_WIKITEXT2_RESOURCE)
    try:
        raw = lzma.decompress(resource.read_bytes())
    except (FileNotFoundError, lzma.LZMAError) as exc:
        raise RuntimeError(
            f"The WikiText-2 copy shipped with hfcompress ({'/'.join(_WIKITEXT2_RESOURCE)}) is missing or damaged "
            f"({exc}); reinstall hfcompress."
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WIKITEXT2_SHA256:
        raise RuntimeError(
            f"The WikiText-2 copy shipped with hfcompress has SHA-256 {digest}, expected {WIKITEXT2_SHA256}; "
            "reinstall hfcompress."
        )
    return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_windows: int | None = 16,
    stride: int | None = None,
    show_progress: bool = False,
) -> float:
    """Perplexity of a causal LM on ``text`` over (at most ``max_windows``) windows of ``seq_len`` tokens."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2.")
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must be in (0, seq_len={seq_len}].")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}.")
    device = next(model.parameters()).device
    starts = list(range(0, ids.numel() - seq_len + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    nll, count = 0.0, 0
    for i, start in enumerate(tqdm(starts, desc="perplexity", disable=not show_progress)):
        window = ids[start : start + seq_len].unsqueeze(0).to(device)
        logits = model(window).logits.float()
        # Overlapping windows score only the tokens that the previous window did not.
        first = 0 if i == 0 or stride == seq_len else seq_len - stride - 1
        loss = torch.nn.functional.cross_entropy(logits[0, first:-1], window[0, first + 1 :], reduction="sum")
        nll += loss.item()
        count += window.shape[1] - 1 - first
    return math.exp(nll / count)
