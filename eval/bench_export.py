"""Export benchmark: our calibrated Q4_0 GGUFs against llama.cpp's own Q4_0 and imatrix Q4_0, scored by llama.cpp.

Protocol (issue 14): SmolLM2-135M-Instruct (bf16). llama.cpp's own tools score every file the same way:
``llama-perplexity`` on WikiText-2 raw test (the copy shipped in hfcompress), ``-c 2048 --chunks 16``.

* ``bf16``: llama.cpp's ``convert_hf_to_gguf.py --outtype bf16`` of the dense checkpoint (``--convert``), else
  hfcompress's own dense export (same tensors).
* ``llama.cpp q4_0``: ``llama-quantize`` Q4_0 of that BF16 file.
* ``llama.cpp imatrix q4_0``: ``llama-imatrix`` on the calibration text of seed ``s`` (the same windows our
  methods calibrate on, decoded), then ``llama-quantize --imatrix``.
* ``hfcompress <method> q4_0``: ``oneshot`` with ``HfCompressConfig.for_export("gguf-q4_0", method=...)`` on those
  windows, saved, exported with ``hfcompress.export(..., to="gguf")`` (Q4_0 bit for bit).

The token embedding (tied output head) is Q8_0 in every quantized file (``--token-embedding-type q8_0`` for
llama.cpp, which is also what its Q4_0 picks by default here; ``dense_type="Q8_0"`` for ours), so the files have
the same size. Target: ``ppl/ppl_bf16 - 1`` of our calibrated Q4_0 <= 0.8 x that of imatrix
Q4_0. ``llama-bench`` measures prompt (pp512) and generation (tg128) speed of both Q4_0 files.

    python eval/bench_export.py --llama-bin /path/to/llama.cpp/build/bin --convert /path/to/convert_hf_to_gguf.py
    python eval/bench_export.py --llama-bin ... --methods gptq blocktune --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], stdout_only: bool = False, **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout if stdout_only else r.stdout + r.stderr


def llama_ppl(bin_dir: Path, gguf: Path, text: Path, chunks: int, threads: int) -> float:
    out = _run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "2048", "--chunks", str(chunks),
                "-t", str(threads), "-b", "2048"])  # fmt: skip
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"no perplexity in llama-perplexity output:\n{out[-2000:]}")
    return float(m.group(1))


def llama_bench(bin_dir: Path, gguf: Path, threads: int) -> dict:
    out = _run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", "2", "-o", "json"])
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in rows}


WORKER = r'''
import json, sys, time, torch
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["repo"])
import hfcompress
from transformers import AutoModelForCausalLM, AutoTokenizer
from hfcompress.export import export
tok = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
windows = torch.load(spec["windows"])
config = hfcompress.HfCompressConfig.for_export("gguf-q4_0", method=spec["method"], clip=spec["clip"])
t0 = time.perf_counter()
hfcompress.oneshot(model, config, windows, batch_size=8, show_progress=False)
seconds = time.perf_counter() - t0
model.to(torch.bfloat16)
hfcompress.save_compressed(model, spec["saved"], tokenizer=tok, card=False)
report = export(spec["saved"], spec["gguf"], to="gguf", dense_type="Q8_0")
exact = all(l.exact for l in report.layers if l.source == "compressed")
print(json.dumps({"seconds": seconds, "exact": exact, "nbytes": report.nbytes}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-perplexity, llama-quantize, llama-imatrix, llama-bench")
    ap.add_argument("--convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py (for its own BF16 file)")
    ap.add_argument("--methods", nargs="+", default=["gptq", "blocktune"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--clip", default="minmax", choices=["minmax", "mse"], help="scale search of our grids (HfCompressConfig clip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="results file (default: eval/results/bench_export.json)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import torch
    from common import write_results
    from transformers import AutoTokenizer

    from hfcompress.calibration import calibration_batches
    from hfcompress.evaluation import wikitext2_test_text
    from hfcompress.export import export
    from hfcompress.testing.models import real_model_path

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    model = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(model)
    text = work / "wiki.test.raw"
    text.write_text(wikitext2_test_text(), encoding="utf-8")
    bin_dir = args.llama_bin
    results: dict[str, dict] = {}

    def score(name: str, path: Path, **extra) -> None:
        t0 = time.perf_counter()
        ppl = llama_ppl(bin_dir, path, text, args.chunks, args.threads)
        results[name] = {"ppl": ppl, "mb": path.stat().st_size / 1e6, **extra}
        print(f"{name:<34} ppl {ppl:8.3f}  {path.stat().st_size / 1e6:7.1f} MB  ({time.perf_counter() - t0:.0f} s)", flush=True)

    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        if args.convert:
            _run([sys.executable, str(args.convert), str(model), "--outtype", "bf16", "--outfile", str(bf16)],
                 env={**os.environ, "PYTHONPATH": str(args.convert.parent / "gguf-py")})  # fmt: skip
        else:
            export(model, bf16, to="gguf")
    score("bf16 (llama.cpp convert)" if args.convert else "bf16 (hfcompress export)", bf16)
    plain = work / "llama-q4_0.gguf"
    _run([str(bin_dir / "llama-quantize"), "--token-embedding-type", "q8_0", str(bf16), str(plain), "Q4_0"])
    score("llama.cpp q4_0", plain)
    for seed in args.seeds:
        batches = calibration_batches(None, tok, num_samples=args.num_samples, seq_len=args.seq_len, seed=seed, batch_size=10**9)
        windows = batches[0]["input_ids"]
        wfile = work / f"windows-{seed}.pt"
        torch.save(windows, wfile)
        calib = work / f"calib-{seed}.txt"
        calib.write_text("\n\n".join(tok.decode(w) for w in windows), encoding="utf-8")
        imat = work / f"imatrix-{seed}.gguf"
        _run([str(bin_dir / "llama-imatrix"), "-m", str(bf16), "-f", str(calib), "-c", str(args.seq_len), "-o", str(imat),
              "-t", str(args.threads)])  # fmt: skip
        iq = work / f"llama-imatrix-q4_0-{seed}.gguf"
        _run([str(bin_dir / "llama-quantize"), "--imatrix", str(imat), "--token-embedding-type", "q8_0", str(bf16), str(iq), "Q4_0"])
        score(f"llama.cpp imatrix q4_0 seed {seed}", iq)
        for method in args.methods:
            out = work / f"hfcompress-{method}-q4_0-{seed}.gguf"
            spec = {"repo": str(REPO), "model": str(model), "windows": str(wfile), "method": method, "clip": args.clip,
                    "saved": str(work / f"saved-{method}-{seed}"), "gguf": str(out)}  # fmt: skip
            if not out.exists():
                info = json.loads(_run([sys.executable, "-c", WORKER, json.dumps(spec)], stdout_only=True).strip().splitlines()[-1])
            else:
                info = {}
            score(f"hfcompress {method} q4_0 seed {seed}", out, **info, clip=args.clip)
    speed = {name: llama_bench(bin_dir, path, args.threads) for name, path in
             (("llama.cpp q4_0", plain), ("hfcompress q4_0", out))}  # fmt: skip

    base = next(v["ppl"] for k, v in results.items() if k.startswith("bf16"))

    def added(prefix: str) -> list[float]:
        return [v["ppl"] / base - 1 for k, v in results.items() if k.startswith(prefix)]

    print("\nadded perplexity (ppl/ppl_bf16 - 1), mean [min, max] over seeds:")
    ref = statistics.mean(added("llama.cpp imatrix q4_0"))
    for prefix in ["llama.cpp q4_0", "llama.cpp imatrix q4_0"] + [f"hfcompress {m} q4_0" for m in args.methods]:
        vals = added(prefix)
        ratio = statistics.mean(vals) / ref if ref else float("nan")
        print(f"  {prefix:<28} {statistics.mean(vals):.4f} [{min(vals):.4f}, {max(vals):.4f}]   x imatrix: {ratio:.2f}")
    print("\nllama-bench tokens/s:", json.dumps(speed))
    write_results("bench_export", {"results": results, "speed": speed, "added_vs_imatrix": {
        prefix: statistics.mean(added(prefix)) / ref for prefix in [f"hfcompress {m} q4_0" for m in args.methods]}}, args.json)


if __name__ == "__main__":
    main()
