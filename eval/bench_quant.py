"""Calibrated quantization benchmark: dense, RTN, GPTQ, QuantEase and blocktune on real SmolLM2-135M.

Protocol (issue 3): SmolLM2-135M-Instruct (bf16 checkpoint, computed in float32); calibration 128 windows
of 512 tokens from the offline Wikipedia summaries, seed 0; WikiText-2 raw test perplexity over the
first 16 windows of 2048 tokens. For each configuration a fresh process loads the model, compresses it
(timed: wall clock of the compression alone) and evaluates it; peak RSS is the process high-water mark
at the end of compression (model load included, evaluation excluded).

llm-compressor pins an older transformers, so it runs in its own virtualenv: with
``--lc-python /path/to/venv/bin/python`` the same calibration windows go through llm-compressor's
``oneshot`` (GPTQModifier / QuantizationModifier, same bits, group size, symmetric, ``lm_head`` kept)
in the same run, and the table shows our figures as ratios of theirs. Without it, the figures the issue
reports for llm-compressor 0.14 on this machine type are printed as labelled reference numbers.

    python eval/bench_quant.py                                  # full protocol (takes a while on CPU)
    python eval/bench_quant.py --lc-python /tmp/lcvenv/bin/python
    python eval/bench_quant.py --windows 2 --num-samples 16 --configs gptq:4 quantease:4   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, cpu_seconds, peak_rss_bytes, spawn, write_results  # noqa: E402  (eval/ is on sys.path)

#: llm-compressor 0.14 on this machine type, as reported in the issue (used when it is not run here)
LC_REFERENCE = {
    "dense": {"ppl": 20.82},
    "gptq:4": {"ppl": 27.65, "seconds": 410.0, "rss_gb": 2.2},
    "rtn:4": {"ppl": 28.71},
}

DEFAULT_CONFIGS = ["dense", "rtn:4", "gptq:4", "quantease:4", "blocktune:4", "rtn:3", "gptq:3", "quantease:3", "blocktune:3"]


# ---------------------------------------------------------------------- hfcompress worker
def run_hfcompress(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO))
    import hfcompress
    from hfcompress.evaluation import perplexity, wikitext2_test_text
    from hfcompress.testing.models import real_model_path

    path = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    # calibration runs in the dtype the model is loaded in; evaluation always in float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec.get("calib_dtype", "float32")))
    windows = torch.load(spec["windows"])
    seconds = 0.0
    if spec["method"] != "dense":
        config = hfcompress.HfCompressConfig(
            method=spec["method"], bits=spec["bits"], group_size=spec["group_size"], symmetric=True
        )
        cpu0, start = cpu_seconds(), time.perf_counter()
        hfcompress.oneshot(model, config, windows, batch_size=spec["batch_size"], show_progress=False)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    else:
        cpu = 0.0
    rss = peak_rss_bytes() / 2**30
    model.to(torch.float32)  # compressed tensors keep their stored dtypes; bf16 weights upcast exactly
    ppl = perplexity(model, tok, wikitext2_test_text(), seq_len=2048, max_windows=spec["windows_eval"])
    return {"ppl": ppl, "seconds": seconds, "cpu_s": cpu, "rss_gb": rss}


# ---------------------------------------------------------------------- llm-compressor worker (its own venv)
LC_WORKER = r'''
import json, resource, sys, time, math
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(spec["model"])
seconds = cpu = 0.0
def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
if spec["method"] != "dense":
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    windows = torch.load(spec["windows"])
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": spec["bits"], "type": "int", "symmetric": True,
              "strategy": "group", "group_size": spec["group_size"]}}}
    cls = GPTQModifier if spec["method"] == "gptq" else QuantizationModifier
    recipe = cls(config_groups=groups, ignore=["lm_head"])
    cpu0, start = cpu_seconds(), time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=windows.shape[1],
            num_calibration_samples=windows.shape[0], shuffle_calibration_samples=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024**2  # VmHWM: ru_maxrss would count the parent's peak
text = open(spec["wikitext"], encoding="utf-8").read()
ids = tok(text, return_tensors="pt").input_ids[0]
nll, count = 0.0, 0
with torch.no_grad():
    for start in list(range(0, ids.numel() - 2048 + 1, 2048))[: spec["windows_eval"]]:
        window = ids[start : start + 2048].unsqueeze(0)
        logits = model(window).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        count += 2047
print("RESULT " + json.dumps({"ppl": math.exp(nll / count), "seconds": seconds, "cpu_s": cpu, "rss_gb": rss}), flush=True)
'''


def _parse(config: str, group_size: int) -> dict:
    if config == "dense":
        return {"method": "dense", "bits": None, "group_size": None}
    method, _, bits = config.partition(":")
    return {"method": method, "bits": int(bits), "group_size": group_size}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="dense and/or method:bits, e.g. gptq:4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--calib-dtype", default="float32", choices=["float32", "bfloat16"],
        help="dtype our calibration forward passes run in (the checkpoint is bf16); evaluation is always float32",
    )
    ap.add_argument("--lc-python", default=None, help="python of a venv with llmcompressor installed")
    ap.add_argument("--lc-configs", nargs="*", default=["gptq:4", "gptq:3", "rtn:4"])
    ap.add_argument("--json", default=None, help="results file (default: eval/results/bench_quant.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_hfcompress(json.loads(args.worker))), flush=True)
        return

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from hfcompress.calibration import calibration_batches
    from hfcompress.evaluation import wikitext2_test_text
    from hfcompress.testing.models import real_model_path

    path = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    batches = calibration_batches(None, tok, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed, batch_size=10**9)
    tmp = Path(tempfile.mkdtemp(prefix="bench_quant-"))
    windows_file = tmp / "calibration_windows.pt"
    torch.save(batches[0]["input_ids"], windows_file)
    wikitext_file = tmp / "wiki.test.txt"  # the peer's worker scores the same text (read without hfcompress)
    wikitext_file.write_text(wikitext2_test_text(), encoding="utf-8")
    common = {"windows": str(windows_file), "windows_eval": args.windows, "batch_size": args.batch_size, "calib_dtype": args.calib_dtype}
    print(
        f"SmolLM2-135M (bf16 weights; our calibration in {args.calib_dtype}, evaluation in float32); calibration {args.num_samples} x {args.seq_len} tokens of Wikipedia "
        f"summaries, seed {args.seed}; WikiText-2 test ppl over {args.windows} x 2048 tokens; {os.cpu_count()} CPU cores, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    ours: dict[str, dict] = {}
    for config in args.configs:
        spec = {**_parse(config, args.group_size), **common}
        ours[config] = spawn([sys.executable, __file__, "--worker", json.dumps(spec)])
        r = ours[config]
        print(f"  hfcompress {config:14s} ppl {r['ppl']:8.3f}  {r['seconds']:7.1f} s ({r['cpu_s']:.0f} CPU s)  {r['rss_gb']:.2f} GB", flush=True)

    lc: dict[str, dict] = {}
    lc_label = "llm-compressor 0.14, figures from the issue (same machine type, not this run)"
    if args.lc_python:
        script = tmp / "lc_worker.py"
        script.write_text(LC_WORKER, encoding="utf-8")
        lc_label = "llm-compressor, measured in this run"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for config in args.lc_configs:
            spec = {**_parse(config, args.group_size), **common, "model": str(path), "wikitext": str(wikitext_file)}
            lc[config] = spawn([args.lc_python, str(script), json.dumps(spec)], env=env)
            r = lc[config]
            print(f"  llm-compressor {config:10s} ppl {r['ppl']:8.3f}  {r['seconds']:7.1f} s ({r['cpu_s']:.0f} CPU s)  {r['rss_gb']:.2f} GB", flush=True)
    else:
        lc = LC_REFERENCE

    dense = ours.get("dense", {}).get("ppl")
    lc_dense = lc.get("dense", {}).get("ppl") or dense
    print(
        f"\nInt weights, group size {args.group_size}, symmetric. 'x dense' divides by the dense ppl of the same "
        f"library ({'measured here with our evaluation for llm-compressor too' if args.lc_python else 'issue figure for llm-compressor'}); "
        f"'vs' names the llm-compressor result each row is compared with ({lc_label}). Time is wall clock; "
        f"CPU s is the process CPU time, the fairer figure on a shared machine (load average now "
        f"{os.getloadavg()[0]:.1f})."
    )
    header = (
        f"{'config':13s} {'ppl':>7s} {'x dense':>7s} {'time s':>7s} {'CPU s':>6s} {'RSS GB':>6s} | {'vs':>6s} "
        f"{'LC ppl':>7s} {'LC x dense':>10s} {'ratio/LC':>8s} {'time/LC':>7s} {'CPU/LC':>6s} {'RSS/LC':>6s}"
    )
    print(header)
    print("-" * len(header))

    def fmt(value: float | None, width: int, digits: int) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else " " * width

    for config, r in ours.items():
        ratio = r["ppl"] / dense if dense else None
        line = (
            f"{config:13s} {r['ppl']:7.3f} {fmt(ratio, 7, 3)} {r['seconds']:7.1f} {r.get('cpu_s', 0):6.0f} "
            f"{r['rss_gb']:6.2f} |"
        )
        ref_name = config if config in lc or config.startswith("rtn") else "gptq:" + config.partition(":")[2]
        ref = lc.get(ref_name)
        if ref and lc_dense and config != "dense":
            lc_ratio = ref["ppl"] / lc_dense
            time_ratio = r["seconds"] / ref["seconds"] if ref.get("seconds") else None
            cpu_ratio = r.get("cpu_s", 0) / ref["cpu_s"] if ref.get("cpu_s") else None
            rss_ratio = r["rss_gb"] / ref["rss_gb"] if ref.get("rss_gb") else None
            line += (
                f" {ref_name:>6s} {ref['ppl']:7.2f} {lc_ratio:10.3f} {fmt(ratio / lc_ratio if ratio else None, 8, 3)} "
                f"{fmt(time_ratio, 7, 2)} {fmt(cpu_ratio, 6, 2)} {fmt(rss_ratio, 6, 2)}"
            )
        print(line)
    write_results("bench_quant", {"ours": ours, "lc": lc, "lc_label": lc_label, "args": vars(args)}, args.json)


if __name__ == "__main__":
    main()
