"""Sparsity benchmark on real SmolLM2-135M: perplexity, compression time, peak RSS, bytes on disk.

    python eval/bench_sparsity.py                      # every config (about an hour on 2 CPU cores)
    python eval/bench_sparsity.py --only "2:4" dense   # configs whose name contains any of the strings

Protocol (the calibrated-quantization benchmark's): the bf16 checkpoint is loaded in float32, compressed
with :func:`hfcompress.oneshot` on 128 windows of 512 tokens of the offline Wikipedia summaries (seed 0),
cast back to bf16 (kept values are stored in bf16, as published) and saved; the saved checkpoint is
reloaded in float32 and scored on the first 16 windows of 2048 tokens of WikiText-2 raw test. Each
config runs in its own process so its peak RSS (load + calibration + compression) is its own.
llm-compressor pins an older transformers, so it runs in its own virtualenv: with
``--lc-python /path/to/venv/bin/python`` the same calibration windows go through its SparseGPT (50 %,
2:4) and Wanda (50 %) in the same run (``eval/lc_sparsity_reference.py``, same thread count, same
perplexity protocol), and the script prints our perplexity ratio over theirs and our time over theirs.

    python eval/bench_sparsity.py --only "sparsegpt 50%" "sparsegpt 2:4" "wanda 50%" --skip OWL --lc-python /tmp/lcvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import peak_rss_bytes, write_results  # noqa: E402  (eval/ is on sys.path)
from hfcompress import HfCompressConfig

W4 = dict(bits=4, group_size=64)
CONFIGS: dict[str, HfCompressConfig | None] = {
    "dense": None,
    "magnitude 50%": HfCompressConfig(method="magnitude", sparsity=0.5),
    "wanda 50%": HfCompressConfig(method="wanda", sparsity=0.5),
    "sparsegpt 50%": HfCompressConfig(method="sparsegpt", sparsity=0.5),
    "admm 50%": HfCompressConfig(method="admm", sparsity=0.5),
    "wanda 50% OWL": HfCompressConfig(method="wanda", sparsity=0.5, method_args={"allocation": "owl"}),
    "sparsegpt 50% OWL": HfCompressConfig(method="sparsegpt", sparsity=0.5, method_args={"allocation": "owl"}),
    "wanda 2:4": HfCompressConfig(method="wanda", sparsity_structure="2:4"),
    "sparsegpt 2:4": HfCompressConfig(method="sparsegpt", sparsity_structure="2:4"),
    "admm 2:4": HfCompressConfig(method="admm", sparsity_structure="2:4"),
    "sparsegpt 50% + W4 g64": HfCompressConfig(method="sparsegpt", sparsity=0.5, **W4),
    "admm 50% + W4 g64": HfCompressConfig(method="admm", sparsity=0.5, **W4),
}


#: llm-compressor reference configs -> (argument of eval/lc_sparsity_reference.py, our config they compare with)
LC_CONFIGS = {"sparsegpt 50%": "sparsegpt", "sparsegpt 2:4": "sparsegpt24", "wanda 50%": "wanda"}


def run_llmcompressor(args) -> list[dict]:
    """Run eval/lc_sparsity_reference.py in llm-compressor's venv on this run's calibration windows."""
    from transformers import AutoTokenizer

    from hfcompress.calibration.data import calibration_batches
    from hfcompress.evaluation import wikitext2_test_text
    from hfcompress.testing.models import real_model_path

    src = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    batches = calibration_batches(None, tok, num_samples=args.samples, seq_len=args.calib_len, seed=0)
    ids = torch.cat([b["input_ids"] for b in batches])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, f"{tmp}/ids.pt")
        Path(tmp, "wiki.test.txt").write_text(wikitext2_test_text(), encoding="utf-8")  # the peer reads the same text
        script = str(Path(__file__).with_name("lc_sparsity_reference.py"))
        for name in args.lc_configs:
            cmd = [args.lc_python, script, LC_CONFIGS[name], str(src), f"{tmp}/ids.pt", f"{tmp}/wiki.test.txt",
                   str(args.windows), str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"llm-compressor {name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["ours"] = name
            out.append(row)
            print(json.dumps(row), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return out


def disk_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def run_one(name: str, args) -> dict:
    """Compress, save, reload and score one config (in this process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress import compression_report, oneshot
    from hfcompress.evaluation import perplexity, wikitext2_test_text
    from hfcompress.testing.models import real_model_path

    torch.set_num_threads(args.threads)
    src = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    cfg = CONFIGS[name]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    row = {"config": name}
    if cfg is None:
        row.update(seconds=0.0, rss_mb=peak_rss_mb(), bytes=disk_bytes(src), bits_per_weight=16.0)
        fp32 = model
    else:
        oneshot(model, cfg, None, tokenizer=tok, num_samples=args.samples, seq_len=args.calib_len, seed=0, show_progress=False)
        row["seconds"] = time.time() - t0
        row["rss_mb"] = peak_rss_mb()
        model.to(torch.bfloat16)  # kept values stored in bf16, like the published dense checkpoint
        report = compression_report(model)
        weights = sum(layer["nbytes"] * 8 / layer["bits_per_weight"] for layer in report["layers"])
        row["bits_per_weight"] = 8 * report["compressed_bytes"] / weights
        out = tempfile.mkdtemp(prefix="bench-sparsity-")
        model.save_pretrained(out)
        row["bytes"] = disk_bytes(out)
        del model
        fp32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    row["ppl"] = perplexity(fp32, tok, wikitext2_test_text(), args.seq_len, args.windows)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run the configs whose name contains any of these strings")
    ap.add_argument("--skip", nargs="*", default=[], help="skip the configs whose name contains any of these strings")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="JSON-lines file to append each result to")
    ap.add_argument("--dense-ppl", type=float, default=None, help="dense perplexity measured by another run (skips dense)")
    ap.add_argument("--lc-python", default=None, help="python of a venv with llmcompressor installed")
    ap.add_argument("--lc-configs", nargs="*", default=list(LC_CONFIGS), choices=list(LC_CONFIGS), help="llm-compressor configs to run")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args)), flush=True)
        return
    names = [n for n in CONFIGS if (not args.only or any(s in n for s in args.only)) and not any(s in n for s in args.skip)]
    if "dense" not in names and args.dense_ppl is None:
        names.insert(0, "dense")  # every ratio needs the dense perplexity of the same run
    rows = []
    passthrough = ["--windows", str(args.windows), "--seq-len", str(args.seq_len), "--samples", str(args.samples),
                   "--calib-len", str(args.calib_len), "--threads", str(args.threads)]  # fmt: skip
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--run", name, *passthrough], capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
    dense = args.dense_ppl if args.dense_ppl is not None else next(r["ppl"] for r in rows if r["config"] == "dense")
    print(f"\nSmolLM2-135M, calibration {args.samples} x {args.calib_len} tokens (Wikipedia summaries, seed 0), "
          f"WikiText-2 {args.windows} x {args.seq_len} tokens, fp32 compute, {args.threads} threads")  # fmt: skip
    print(f"{'config':24s} {'ppl':>8s} {'x dense':>8s} {'time s':>8s} {'peak RSS MB':>12s} {'MB on disk':>11s} {'bits/w':>7s}")
    for r in rows:
        print(
            f"{r['config']:24s} {r['ppl']:8.2f} {r['ppl'] / dense:8.3f} {r['seconds']:8.1f} {r['rss_mb']:12.0f} "
            f"{r['bytes'] / 1e6:11.1f} {r['bits_per_weight']:7.3f}"
        )
    if not args.lc_python:
        print("\nllm-compressor: not run (pass --lc-python /path/to/its/venv/bin/python; it pins an older transformers).")
        write_results("bench_sparsity", {"dense_ppl": dense, "ours": rows, "llm-compressor": None})
        return
    lc_rows = run_llmcompressor(args)
    write_results("bench_sparsity", {"dense_ppl": dense, "ours": rows, "llm-compressor": lc_rows})
    ours = {r["config"]: r for r in rows}
    print(f"\nllm-compressor 0.14 on the same windows ({args.threads} threads); ratios are ours / theirs")
    print(f"{'config':24s} {'LC ppl':>8s} {'LC x dense':>10s} {'LC time s':>10s} {'LC RSS MB':>10s} {'ppl ratio':>10s} {'time ratio':>10s}")
    for r in lc_rows:
        mine = ours.get(r["ours"])
        ratio = f"{mine['ppl'] / r['ppl']:10.3f}" if mine else f"{'-':>10s}"
        tratio = f"{mine['seconds'] / r['seconds']:10.3f}" if mine else f"{'-':>10s}"
        print(f"{r['ours']:24s} {r['ppl']:8.2f} {r['ppl'] / dense:10.3f} {r['seconds']:10.1f} {r['rss_mb']:10.0f} {ratio} {tratio}")


if __name__ == "__main__":
    main()
