"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), read from a transformers tokenizer folder.

Two tokenizer kinds, as llama.cpp names them:

* ``gpt2``: byte-level BPE (``tokenizer.json`` model ``BPE`` without byte fallback): the token strings, their
  types (normal, control for special added tokens, user-defined for other added tokens, unused for padding
  up to the model's vocabulary), the merges, and the pre-tokenizer name (``tokenizer.ggml.pre``).
* ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, Gemma), via the ``gguf`` package's
  ``LlamaHfVocab``: tokens, scores and types.

Special token ids, ``add_bos``/``add_eos`` and the chat template come from the ``gguf`` package's
``SpecialVocab``, which reads ``tokenizer_config.json``/``chat_template.jinja`` as llama.cpp's converter does.

llama.cpp splits text before BPE with a regular expression chosen by ``tokenizer.ggml.pre``. The name is
found from what the tokenizer's own pre-tokenizer does to probe strings (digits kept whole, split in threes
or one by one; punctuation joined to the following word or not), which separates the pre-tokenizers of the
supported families: ``gpt-2``, ``llama-bpe`` (Llama 3), ``qwen2`` and ``smollm``. Anything else is refused
with what was seen, rather than written with a wrong split.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

__all__ = ["PRE_TOKENIZERS", "pre_tokenizer_name", "write_vocab"]

#: (how "12345" splits, whether "$hello" stays one piece) -> llama.cpp pre-tokenizer name
PRE_TOKENIZERS = {
    ("whole", False): "gpt-2",
    ("threes", True): "llama-bpe",
    ("single", True): "qwen2",
    ("single", False): "smollm",
}


def _signature(tokenizer_json: str) -> tuple[str, bool]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    pre = tok.pre_tokenizer
    if pre is None:
        raise ValueError("the tokenizer has no pre-tokenizer; GGUF export supports byte-level BPE tokenizers with one.")
    digits = [p for p, _ in pre.pre_tokenize_str("12345")]
    digits_kind = {1: "whole", 2: "threes", 5: "single"}.get(len(digits), f"{len(digits)} pieces")
    joined = len(pre.pre_tokenize_str("$hello")) == 1
    return digits_kind, joined


def pre_tokenizer_name(tokenizer_json: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json`` (see the module docstring)."""
    sig = _signature(tokenizer_json)
    if sig not in PRE_TOKENIZERS:
        raise ValueError(
            f"the tokenizer's pre-tokenizer (digits: {sig[0]}, punctuation joined to words: {sig[1]}) matches none that "
            f"the GGUF export knows ({sorted(PRE_TOKENIZERS.values())}); llama.cpp would split text differently."
        )
    return PRE_TOKENIZERS[sig]


def write_vocab(writer, folder: Path, vocab_size: int) -> str:
    """Add the tokenizer of ``folder`` to ``writer``; returns the tokenizer model name (``gpt2``/``llama``)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no tokenizer.json; GGUF files carry their tokenizer: pass tokenizer=<a fast tokenizer "
            "or its folder>."
        )
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r} is not exported to GGUF yet (supported: BPE).")
    if model.get("byte_fallback"):
        vocab = gguf.vocab.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text_, score, toktype in vocab.all_tokens():
            tokens.append(text_)
            scores.append(score)
            types.append(toktype)
        _pad(tokens, types, vocab_size, scores)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        kind = "llama"
    else:
        ids = {tok: i for tok, i in model["vocab"].items()}
        added = {t["id"]: t for t in data.get("added_tokens", [])}
        size = max([vocab_size - 1, *ids.values(), *added.keys()]) + 1
        tokens: list[str] = [""] * size
        types = [int(gguf.TokenType.UNUSED)] * size
        for tok, i in ids.items():
            tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
        for i, t in added.items():
            tokens[i] = t["content"]
            types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
        for i in range(size):
            if not tokens[i]:
                tokens[i] = f"[PAD{i}]"
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(text))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        kind = "gpt2"
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=max(vocab_size, len(tokens)))
    if "bos" not in special.add_special_token:  # transformers 5 configs often leave it out: ask the tokenizer itself
        special.add_special_token["bos"] = _adds_bos(folder)
    special.add_to_gguf(writer, quiet=True)
    return kind


def _adds_bos(folder: Path) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def _pad(tokens: list, types: list, vocab_size: int, scores: list) -> None:
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
