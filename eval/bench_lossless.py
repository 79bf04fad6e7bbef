"""Benchmark of the lossless stage on the real SmolLM2-135M and all-MiniLM-L6-v2 checkpoints.

Prints, per model (bf16 weights; MiniLM ships float32 and is cast to bf16 first, as it is served):

* whole-checkpoint size of the lossless twin (streaming converter) as % of the bf16 checkpoint, next to the
  order-0 entropy bounds: of the whole 16-bit values per tensor (the floor of any memoryless per-tensor
  coder) and of the exponent byte with sign+mantissa raw (the floor of the DFloat11 layout we use);
* decode throughput in GB/s of bf16 output with 1 and 2 threads, next to zstd (level 3) and lz4 on the
  same bytes in the same 512 KiB chunks and threads (best and median of ``--repeats`` runs);
* SmolLM2: resident memory after ``from_pretrained`` of the bf16 checkpoint and of the lossless twin with
  ``lossless_decode="load"``, ``"lazy"`` and ``"first_forward"``, and after three forwards (fresh process each);
* W4 g64 (RTN) packed codes: bytes of ``weight_packed`` (and of the scales, and the whole checkpoint)
  before and after the lossless stage.

Run: ``python eval/bench_lossless.py`` (about 2 minutes on 2 free cores). Wall-clock timings depend on how
busy the CPU is (the load average is printed next to them); "GB per CPU-second" divides by the CPU time the
process really got, which estimates the speed of one idle core even on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lz4.frame
import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file

import hfcompress
from hfcompress import HfCompressConfig
from hfcompress.convert import convert_checkpoint
from hfcompress.formats.lossless import encode_one
from hfcompress.lossless import DECODER, decode_tensor, encode_tensor
from hfcompress.lossless.coder import order0_entropy_bits
from hfcompress.lossless.planes import as_uint_array, split
from hfcompress.testing.models import real_model_path

EVAL_DIR = Path(__file__).resolve().parent

CHUNK_BYTES = 1 << 19  # 512 KiB = the codec's default 256 Ki bf16 elements per chunk


def load_bf16(name: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(real_model_path(name) / "model.safetensors"))
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}


def bounds(sd: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(order-0 bound of whole 16-bit values, of exponent byte + raw sign/mantissa), as % of bf16; per tensor."""
    full = expo = total = 0.0
    for t in sd.values():
        if t.dtype != torch.bfloat16:
            continue
        u = as_uint_array(t)
        counts = np.bincount(u, minlength=65536)
        p = counts[counts > 0] / u.size
        full += float(-(p * np.log2(p)).sum()) * u.size
        expo += (order0_entropy_bits(split(u, torch.bfloat16)[0]) + 8) * u.size
        total += 16 * u.size
    return 100 * full / total, 100 * expo / total


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(best wall seconds, median wall seconds, best CPU seconds of this process, all threads)."""
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), statistics.median(times), min(cpu)


def chunked(raw: bytes) -> list[memoryview]:
    mv = memoryview(raw)
    return [mv[i : i + CHUNK_BYTES] for i in range(0, len(mv), CHUNK_BYTES)]


def bench_decode(sd: dict[str, torch.Tensor], repeats: int) -> None:
    tensors = [t for t in sd.values() if t.dtype == torch.bfloat16 and t.numel() * t.element_size() >= 4096]
    raw_bytes = sum(t.numel() * t.element_size() for t in tensors)
    payloads = [encode_tensor(t) for t in tensors]
    ours = sum(p.numel() for p in payloads)
    raws = [t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors]
    zc = zstandard.ZstdCompressor(level=3)
    zst = [[zc.compress(c) for c in chunked(r)] for r in raws]
    lz = [[lz4.frame.compress(c) for c in chunked(r)] for r in raws]
    rows = [("hfcompress (exp Huffman)", 100 * ours / raw_bytes)]
    rows.append(("zstd level 3", 100 * sum(len(c) for t in zst for c in t) / raw_bytes))
    rows.append(("lz4 frame", 100 * sum(len(c) for t in lz for c in t) / raw_bytes))
    print(f"  decode of {raw_bytes / 1e6:.1f} MB of bf16 tensors >= 4 KiB (decoder backend: {DECODER}); GB/s of output:")
    print(
        f"    {'codec':26s} {'size %':>7s} | {'1 thread best/median':>21s} | {'2 threads best/median':>22s} | "
        "GB per CPU-second (1 thread)"
    )
    results = {}
    for threads in (1, 2):
        pool = ThreadPoolExecutor(threads)

        def run_ours(threads=threads):
            for p in payloads:
                decode_tensor(p, threads=threads)

        local = threading.local()  # a ZstdDecompressor must not be shared between threads

        def unzstd(chunk, local=local):
            if not hasattr(local, "d"):
                local.d = zstandard.ZstdDecompressor()
            return local.d.decompress(chunk)

        def run_zstd(pool=pool, unzstd=unzstd):
            for chunks in zst:
                b"".join(pool.map(unzstd, chunks))

        def run_lz4(pool=pool):
            for chunks in lz:
                b"".join(pool.map(lz4.frame.decompress, chunks))

        for (name, _), fn in zip(rows, (run_ours, run_zstd, run_lz4)):
            best, med, cpu = timed(fn, repeats)
            results[(name, threads)] = (raw_bytes / best / 1e9, raw_bytes / med / 1e9, raw_bytes / max(cpu, 1e-9) / 1e9)
        pool.shutdown()
    for name, size in rows:
        b1, m1, c1 = results[(name, 1)]
        b2, m2, _ = results[(name, 2)]
        print(f"    {name:26s} {size:7.2f} | {b1:9.2f} / {m1:9.2f} | {b2:10.2f} / {m2:9.2f} | {c1:8.2f}")
    ours2 = results[(rows[0][0], 2)][0]
    print(
        f"    ratios (2 threads, best): hfcompress/zstd = {ours2 / results[(rows[1][0], 2)][0]:.2f}x, "
        f"hfcompress/lz4 = {ours2 / results[(rows[2][0], 2)][0]:.2f}x"
    )


def folder_tensor_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def converter_peak_rss(src: Path, dst: Path, dtype: str | None) -> tuple[float, float]:
    """Peak RSS (MB, VmHWM) of the streaming converter in a fresh process, and of a process that only imports it."""
    # the children measure themselves with eval/common.py (VmHWM of their own process image)
    hwm = f"sys.path.insert(0, {str(EVAL_DIR)!r}); from common import peak_rss_bytes; print(peak_rss_bytes() / 1024)"
    run = f"import sys; from hfcompress.cli import main; main(sys.argv[1:]); {hwm}"
    args = ["convert", str(src), "-o", str(dst), "--quiet"] + (["--dtype", dtype] if dtype else [])
    peak = subprocess.run([sys.executable, "-c", run, *args], capture_output=True, text=True, check=True).stdout.split()[-1]
    base = subprocess.run(
        [sys.executable, "-c", f"import sys, hfcompress.cli, hfcompress.convert; {hwm}"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    return float(peak) / 1024, float(base) / 1024


def bench_checkpoint(name: str, sd: dict[str, torch.Tensor], tmp: Path) -> None:
    src = real_model_path(name)
    bf16_file = tmp / f"{name}-bf16" / "model.safetensors"
    bf16_file.parent.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bf16_file), metadata={"format": "pt"})
    t0 = time.perf_counter()
    out = convert_checkpoint(src, tmp / f"{name}-lossless", dtype="bfloat16")
    seconds = time.perf_counter() - t0
    ratio = 100 * folder_tensor_bytes(out) / bf16_file.stat().st_size
    full, expo = bounds(sd)
    print(
        f"  whole checkpoint: {ratio:.2f}% of bf16 ({folder_tensor_bytes(out) / 1e6:.1f} MB vs "
        f"{bf16_file.stat().st_size / 1e6:.1f} MB; target <= 67.0%, DFloat11 reports ~70%)"
    )
    print(f"  order-0 bounds: whole 16-bit values {full:.2f}%, exponent + raw sign/mantissa {expo:.2f}%")
    print(f"  streaming conversion took {seconds:.1f} s")
    peak, base = converter_peak_rss(src, tmp / f"{name}-lossless-cli", "bfloat16" if name == "minilm" else None)
    largest = max(t.numel() * t.element_size() for t in sd.values()) / 1e6
    print(
        f"  converter peak RSS {peak:.0f} MB (importing hfcompress alone: {base:.0f} MB) for a "
        f"{sum(t.numel() * t.element_size() for t in sd.values()) / 1e6:.0f} MB checkpoint whose largest tensor is {largest:.0f} MB"
    )


def bench_load(name: str, tmp: Path, repeats: int) -> None:
    """``from_pretrained`` of the bf16 checkpoint against its lossless twin (decoded on load)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if name == "smollm2" else AutoModel
    plain_dir = tmp / f"{name}-bf16-model"
    if not plain_dir.exists():
        auto.from_pretrained(real_model_path(name), dtype=torch.bfloat16).save_pretrained(plain_dir)
    timings = {}
    for label, folder in (("bf16", plain_dir), ("lossless", tmp / f"{name}-lossless")):
        best, med, cpu = timed(lambda folder=folder: auto.from_pretrained(folder), repeats)
        timings[label] = (best, med, cpu)
    (pb, pm, pc), (lb, lm, lc) = timings["bf16"], timings["lossless"]
    print(
        f"  from_pretrained wall best/median: bf16 {pb:.2f}/{pm:.2f} s, lossless {lb:.2f}/{lm:.2f} s "
        f"(CPU seconds {pc:.2f} vs {lc:.2f}; the difference is decoding)"
    )


_MEMORY_PROBE = """
import hashlib, sys, time, torch
import hfcompress
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[3]))
sys.path.insert(0, sys.argv[4])
from common import memory_status as status  # eval/common.py: RssAnon, RssFile, VmHWM in MiB

base = status()
kwargs = {} if sys.argv[2] == 'plain' else {'quantization_config': hfcompress.HfCompressConfig(lossless=True, lossless_decode=sys.argv[2])}
t0, c0 = time.perf_counter(), time.process_time()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
loaded = status()
ids = torch.arange(1, 33).reshape(1, 32)
times, cpu = [], []
with torch.inference_mode():
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(ids).logits
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
after = status()
print(base['RssAnon'], base['RssFile'], loaded['RssAnon'], loaded['RssFile'], after['RssAnon'], after['RssFile'], after['VmHWM'], load_s, load_cpu, min(times), min(cpu))
print(hashlib.sha256(logits.float().numpy().tobytes()).hexdigest())
"""


def bench_memory(name: str, tmp: Path) -> None:
    """Resident memory after ``from_pretrained`` with each ``lossless_decode`` mode (fresh process each)."""
    plain_dir = tmp / f"{name}-bf16-model"
    rows = [("bf16 checkpoint (plain)", plain_dir, "plain")] + [
        (f"lossless twin, lossless_decode={mode!r}", tmp / f"{name}-lossless", mode)
        for mode in ("load", "lazy", "first_forward")
    ]
    print(
        "  resident memory over the imports (MB; anon = process memory, file-backed = memory-mapped checkpoint pages, "
        "which the kernel can drop; weights 269 MB in bf16):"
    )
    digests = {}
    for label, folder, mode in rows:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(folder), mode, str(torch.get_num_threads()), str(EVAL_DIR)],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        digests[label] = out[-1]
        base, base_file, anon, file_, anon_after, file_after, hwm, load_s, load_cpu, fwd_s, fwd_cpu = (
            float(x) for x in out[-12:-1]
        )
        print(
            f"    {label:48s} after load: anon +{anon - base:5.1f}, file-backed +{file_ - base_file:5.1f}; after 3 "
            f"forwards (32 tokens): anon +{anon_after - base:5.1f}, file-backed +{file_after - base_file:5.1f}; "
            f"peak RSS {hwm:5.1f}; load {load_s:.2f} s ({load_cpu:.2f} CPU s), forward {fwd_s * 1e3:.0f} ms "
            f"({fwd_cpu * 1e3:.0f} CPU ms)"
        )
    print(f"    logits bit-identical across the four rows: {len(set(digests.values())) == 1}")


def bench_w4(name: str, tmp: Path) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if name == "smollm2" else AutoModel
    src = real_model_path(name)
    sizes = {}
    for lossless in (False, True):
        cfg = HfCompressConfig(bits=4, group_size=64, lossless=lossless)
        model = auto.from_pretrained(src, quantization_config=cfg, dtype=torch.bfloat16)
        folder = tmp / f"{name}-w4-{lossless}"
        model.save_pretrained(folder)
        sizes[lossless] = folder_tensor_bytes(folder)
        if not lossless:
            packed = scales = packed_ll = scales_ll = 0
            nibbles = np.zeros(16, dtype=np.int64)
            pairs = np.zeros(256, dtype=np.int64)
            for key, t in model.state_dict().items():
                if key.endswith(".weight_packed"):
                    b = t.numpy().reshape(-1)
                    pairs += np.bincount(b, minlength=256)
                    nibbles += np.bincount(b & 15, minlength=16) + np.bincount(b >> 4, minlength=16)
                if key.endswith((".weight_packed", ".weight_scale")):
                    stored_name, stored = encode_one(key, t)
                    before, after = t.numel() * t.element_size(), stored.numel() * stored.element_size()
                    if key.endswith("packed"):
                        packed, packed_ll = packed + before, packed_ll + after
                    else:
                        scales, scales_ll = scales + before, scales_ll + after
        del model
    def entropy(counts):
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())

    print(
        f"  W4 g64 codes: weight_packed {packed / 1e6:.2f} MB -> {packed_ll / 1e6:.2f} MB ({100 * packed_ll / packed:.1f}%; "
        f"order-0 bounds: per code {100 * entropy(nibbles) / 4:.1f}%, per byte {100 * entropy(pairs) / 8:.1f}%), "
        f"scales {scales / 1e6:.2f} MB -> {scales_ll / 1e6:.2f} MB ({100 * scales_ll / scales:.1f}%)"
    )
    print(
        f"  W4 g64 whole checkpoint: {sizes[False] / 1e6:.1f} MB -> {sizes[True] / 1e6:.1f} MB with lossless=True "
        f"({100 * sizes[True] / sizes[False]:.1f}%)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs (best and median are printed)")
    parser.add_argument("--skip-w4", action="store_true", help="skip the W4 g64 part")
    parser.add_argument("--skip-memory", action="store_true", help="skip resident memory by lossless_decode mode")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(f"hfcompress {hfcompress.__version__}; {os.cpu_count()} CPUs; load average at start {os.getloadavg()}")
    print("NOTE: this CPU is shared with other engineers' jobs; throughput figures are lower bounds of the idle machine.")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models:
            print(f"\n== {name}")
            sd = load_bf16(name)
            bench_checkpoint(name, sd, tmp)
            bench_decode(sd, args.repeats)
            bench_load(name, tmp, args.repeats)
            if name == "smollm2" and not args.skip_memory:
                bench_memory(name, tmp)
            if not args.skip_w4:
                bench_w4(name, tmp)
            print(f"  load average now {os.getloadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
