"""Spine benchmark: data-free RTN on real SmolLM2-135M -- bytes on disk and WikiText-2 perplexity.

    python eval/bench_spine.py [--windows 16] [--seq-len 2048]

Protocol: WikiText-2 raw test, first ``windows`` windows of ``seq-len`` tokens, fp32 compute. Each
config is compressed on load from the bf16 checkpoint, saved (bf16 non-compressed tensors, as
published), reloaded in fp32 for the perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress import HfCompressConfig
from hfcompress.evaluation import perplexity, wikitext2_test_text
from hfcompress.testing.models import real_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402  (eval/common.py: the results file with command, commit, machine)

CONFIGS = {
    "RTN W4 g128 sym": HfCompressConfig(bits=4, group_size=128),
    "RTN W4 g64 sym": HfCompressConfig(bits=4, group_size=64),
    "RTN W4 g64 asym": HfCompressConfig(bits=4, group_size=64, symmetric=False),
    "RTN W8 per-channel": HfCompressConfig(bits=8, group_size=None),
}


def disk_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    src = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    text = wikitext2_test_text()
    rows = []
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ppl_dense = perplexity(dense, tok, text, args.seq_len, args.windows)
    rows.append({"config": "dense bf16", "bytes": disk_bytes(src), "ppl": ppl_dense, "seconds": 0.0})
    del dense
    for name, cfg in CONFIGS.items():
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
        seconds = time.time() - t0
        with tempfile.TemporaryDirectory() as out:
            model.save_pretrained(out)
            size = disk_bytes(out)
            fp32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            ppl = perplexity(fp32, tok, text, args.seq_len, args.windows)
        rows.append({"config": name, "bytes": size, "ppl": ppl, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, WikiText-2 {args.windows} x {args.seq_len} tokens, fp32 compute")
    print(f"{'config':22s} {'MB on disk':>10s} {'ppl':>8s} {'x dense':>8s} {'load+compress s':>16s}")
    for r in rows:
        print(f"{r['config']:22s} {r['bytes'] / 1e6:10.1f} {r['ppl']:8.2f} {r['ppl'] / ppl_dense:8.3f} {r['seconds']:16.1f}")
    protocol = {"model": "SmolLM2-135M", "text": "WikiText-2 raw test", "windows": args.windows, "seq_len": args.seq_len}
    write_results("bench_spine", {"protocol": protocol, "rows": rows})


if __name__ == "__main__":
    main()
