"""Perplexity, the number every compression paper reports, computed the standard way.

Protocol (GPTQ/SparseGPT/llm-compressor): tokenize the whole text once, cut it into consecutive windows
of ``seq_len`` tokens (``stride`` < ``seq_len`` gives overlapping windows whose first
``seq_len - stride`` tokens serve as context only), score each window's next-token loss, and report
``exp(mean token NLL)``. Computation runs in the model's dtype; load the model in float32 for the
reference numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

WIKITEXT2_ENV = "HFCOMPRESS_WIKITEXT2"


def wikitext2_test_path() -> Path | None:
    """The local WikiText-2 raw test file: ``$HFCOMPRESS_WIKITEXT2`` or ``../shared/data`` beside the repo."""
    env = os.environ.get(WIKITEXT2_ENV)
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared/data/wikitext-2-raw/wiki.test.raw", Path.cwd().parent / "shared/data/wikitext-2-raw/wiki.test.raw"]
    return next((p for p in candidates if p.is_file()), None)


def wikitext2_test_text(allow_download: bool = False) -> str:
    """WikiText-2 raw test text, from the local copy or (``allow_download=True``) the ``datasets`` hub loader."""
    path = wikitext2_test_path()
    if path is not None:
        return path.read_text(encoding="utf-8")
    if not allow_download:
        raise FileNotFoundError(
            "WikiText-2 raw test not found locally; set HFCOMPRESS_WIKITEXT2=/path/to/wiki.test.raw or pass "
            "allow_download=True to fetch it with datasets."
        )
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "".join(rows)


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
