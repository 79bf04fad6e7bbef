"""What integrity verification costs: SmolLM2-135M checkpoints loaded with and without the checksums.

    python eval/bench_integrity.py [--rounds 7]

For each checkpoint (W4 g128 RTN; W4 g64 + lossless stage; the bf16 lossless twin of the dense model), the
time of ``from_pretrained`` is measured with the default verification (every tensor's CRC-32 against the
record written with it, the config stamp, the stored-key check) and with
``HfCompressConfig.loading(verify_checksums=False)``, interleaved, warm page cache, the median of ``--rounds``
each. Target (issue 13): verification adds at most 10 % to the load time. Also reported: the CRC-32 throughput
of this machine and the time of ``verify_files`` alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, convert_checkpoint, quantizer
from hfcompress.checkpoint import shard_paths
from hfcompress.integrity import verify_files
from hfcompress.lossless.coder import DECODER, crc32
from hfcompress.testing.models import real_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402  (eval/common.py: the results file with command, commit, machine)


_SPENT: list[float] = []


def _timed_verify(*args, **kwargs):
    start = time.perf_counter()
    try:
        return verify_files(*args, **kwargs)
    finally:
        _SPENT.append(time.perf_counter() - start)


def _load_seconds(folder: Path, verify: bool) -> tuple[float, float]:
    """(seconds of from_pretrained, seconds of it spent verifying)"""
    kwargs = {} if verify else {"quantization_config": HfCompressConfig.loading(verify_checksums=False)}
    _SPENT.clear()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    seconds = time.perf_counter() - start
    del model
    return seconds, sum(_SPENT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    quantizer.verify_files = _timed_verify  # measure the time the load spends in verification, as it runs
    src = real_model_path("smollm2")
    buf = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8).numpy()
    start = time.perf_counter()
    crc32(memoryview(buf))
    crc_gbps = buf.nbytes / (time.perf_counter() - start) / 1e9
    rows = []
    print(f"CRC-32 ({DECODER}): {crc_gbps:.2f} GB/s on {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {}
        for name, cfg in {"W4 g128 RTN": HfCompressConfig(bits=4, group_size=128),
                          "W4 g64 RTN + lossless": HfCompressConfig(bits=4, group_size=64, lossless=True)}.items():  # fmt: skip
            folders[name] = tmp / name.replace(" ", "_")
            AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(folders[name])
        folders["bf16 lossless twin"] = convert_checkpoint(src, tmp / "lossless_twin")
        print(f"\n{'checkpoint':24s} {'MB':>7s} {'load s':>8s} {'of it verifying':>16s} {'share':>7s} {'load s, unverified':>20s}")
        for name, folder in folders.items():
            files = shard_paths(folder)
            size = sum(f.stat().st_size for f in files)
            _load_seconds(folder, True)  # warm the page cache and the imports
            on, off, spent = [], [], []
            for _ in range(args.rounds):
                seconds, verifying = _load_seconds(folder, True)
                on.append(seconds)
                spent.append(verifying)
                off.append(_load_seconds(folder, False)[0])
            med_on, med_spent, med_off = statistics.median(on), statistics.median(spent), statistics.median(off)
            print(f"{name:24s} {size / 1e6:7.1f} {med_on:8.3f} {med_spent:16.4f} {100 * med_spent / med_on:6.1f}% {med_off:20.3f}")
            rows.append({"checkpoint": name, "bytes": size, "load_s": med_on, "verifying_s": med_spent,
                         "share": med_spent / med_on, "load_s_unverified": med_off})  # fmt: skip
    print("\ntarget: verification <= 10 % of the load time. 'share' is the time the verified load spends in")
    print("verify_files (checksums of every tensor + config stamp); the last column is an unverified load, interleaved")
    print("(medians of the rounds, warm page cache; whole-load times vary by more than the verification costs)")
    write_results("bench_integrity", {"crc32_gb_per_s": crc_gbps, "decoder": DECODER, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
