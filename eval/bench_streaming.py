"""Benchmark of out-of-core compression (:func:`hfcompress.streaming.compress_checkpoint`).

1. Writes a random-weight Llama checkpoint (bf16, ``--layers`` blocks of hidden 2048 / MLP 5632, untied
   head, one shard per block; ~2.4 GB with the default 24 blocks) without ever holding it in memory.
2. Compresses it in a fresh subprocess with RTN (W4 g128), and with GPTQ (W4 g128, ``--samples`` windows
   of ``--seq-len`` random tokens) a checkpoint of the same block shape with ``--gptq-layers`` blocks
   (GPTQ on 2 shared cores takes minutes per block of this size; its memory does not grow with the
   number of blocks); prints peak RSS (the worker's ``VmHWM``; ``ru_maxrss`` would include the peak of
   this parent process, which Linux carries over into a child's count across ``exec``), the RSS of a worker that
   only imports the libraries, wall time and throughput, and checks the memory target
   ``peak RSS <= largest block + calibration activations + 1 GB`` (block measured in the dtype it is
   computed in: bf16 for RTN, float32 for GPTQ).
3. Data-parallel calibration on a smaller checkpoint (``--dp-layers`` blocks of hidden 1024): GPTQ in 1
   process vs 2 CPU processes (``torch.distributed.run``, gloo), wall times and the max difference of
   the decoded weights.

Run: ``python eval/bench_streaming.py`` (a few minutes on 2 shared cores; ``--layers 8`` for a quick look).
No peer library with an out-of-core path is installed here (llm-compressor's sequential pipeline would
be the one to compare), so no ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from common import REPO, write_results  # noqa: E402  (eval/ is on sys.path)
GB = 1e9


def build_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int) -> int:
    """A random bf16 LlamaForCausalLM folder written block by block; returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["LlamaForCausalLM"], max_position_embeddings=2048,
    )  # fmt: skip
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0
    shards = layers + 1
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if i < layers:
            p = f"model.layers.{i}."
            tensors = {
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(inter, hidden),
                p + "mlp.up_proj.weight": rand(inter, hidden),
                p + "mlp.down_proj.weight": rand(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            }
        else:
            tensors = {
                "model.embed_tokens.weight": rand(vocab, hidden),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "lm_head.weight": rand(vocab, hidden),
            }
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


WORKER = textwrap.dedent(
    """
    import json, sys, time, torch
    import hfcompress
    from hfcompress import HfCompressConfig
    from hfcompress.streaming import compress_checkpoint
    mode, src, out, samples, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    hfcompress.distributed.init_from_env("gloo")
    start = time.perf_counter()
    if mode == "import":
        pass
    elif mode == "rtn":
        compress_checkpoint(src, out, HfCompressConfig(bits=4, group_size=128), show_progress=False)
    else:
        ids = torch.randint(1, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
        compress_checkpoint(src, out, HfCompressConfig(method="gptq", bits=4, group_size=128), ids,
                            batch_size=1, dtype=torch.float32, show_progress=False)
    wall = time.perf_counter() - start
    from common import peak_rss_bytes  # VmHWM: this process image's own peak (ru_maxrss counts the parent's)

    peak = peak_rss_bytes()
    if hfcompress.distributed.rank() == 0:
        print("RESULT " + json.dumps({"wall_s": wall, "peak_rss": peak}))
    """
)


def run_worker(script: Path, mode: str, src: Path, out: Path, samples: int, seq_len: int, nproc: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "eval"), os.environ.get("PYTHONPATH", "")]), "TRANSFORMERS_VERBOSITY": "error"}
    args = [str(script), mode, str(src), str(out), str(samples), str(seq_len)]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["process_s"] = time.perf_counter() - start
    return result


def block_bytes(layers_dir: Path, dtype_size: int) -> tuple[int, int]:
    """(largest block, non-block weights) in bytes at ``dtype_size`` bytes per element."""
    from hfcompress.streaming.reader import CheckpointReader

    reader = CheckpointReader(layers_dir)
    blocks: dict[str, int] = {}
    other = 0
    for name in reader.keys():
        elems = reader.nbytes(name) // 2  # stored as bf16
        if name.startswith("model.layers."):
            key = ".".join(name.split(".")[:3])
            blocks[key] = blocks.get(key, 0) + elems * dtype_size
        else:
            other += elems * dtype_size
    return max(blocks.values()), other


def max_weight_diff(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    """(max |Wa - Wb| / max |Wa|, fraction of differing weights) over all compressed modules."""
    from transformers import AutoModelForCausalLM

    import hfcompress  # noqa: F401
    from hfcompress.modules import compressed_modules

    a, b = AutoModelForCausalLM.from_pretrained(a_dir), AutoModelForCausalLM.from_pretrained(b_dir)
    worst, changed, total = 0.0, 0, 0
    mb = compressed_modules(b)
    for name, ma in compressed_modules(a).items():
        wa, wb = ma.dequantize_weight(), mb[name].dequantize_weight()
        worst = max(worst, float((wa - wb).abs().max() / wa.abs().max()))
        changed += int((wa != wb).sum())
        total += wa.numel()
    return worst, changed / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="blocks of the big checkpoint (24: ~2.4 GB bf16)")
    parser.add_argument("--gptq-layers", type=int, default=2, help="blocks of the GPTQ checkpoint (same block shape)")
    parser.add_argument("--samples", type=int, default=4, help="GPTQ calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dp-layers", type=int, default=4, help="blocks of the 1- vs 2-process checkpoint")
    parser.add_argument("--dp-samples", type=int, default=8)
    parser.add_argument("--skip-gptq", action="store_true", help="RTN only on the big checkpoint")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_streaming-"))
    script = work / "worker.py"
    work.mkdir(parents=True, exist_ok=True)
    script.write_text(WORKER)
    try:
        src = work / "big"
        t = time.perf_counter()
        size = build_checkpoint(src, args.layers, 2048, 5632, 32000, 16, 4)
        params = size // 2
        print(f"checkpoint: {args.layers} blocks, {params / 1e9:.2f} B params, {size / GB:.2f} GB bf16 "
              f"(written in {time.perf_counter() - t:.0f} s)")  # fmt: skip
        base = run_worker(script, "import", src, work / "none", 0, 0)
        record = {"checkpoint_bytes": size, "blocks": args.layers, "import_only_peak_rss": base["peak_rss"], "runs": []}
        print(f"import-only worker peak RSS: {base['peak_rss'] / GB:.2f} GB")
        runs = [("rtn", 2, src, args.layers)]
        if not args.skip_gptq:  # same block shapes, fewer blocks: the memory bound does not depend on their number
            gsrc = work / "gptq_src"
            build_checkpoint(gsrc, args.gptq_layers, 2048, 5632, 32000, 16, 4)
            runs.append(("gptq", 4, gsrc, args.gptq_layers))
        for mode, dsize, path, nblocks in runs:
            out = work / f"out_{mode}"
            nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            nparams = nbytes // 2
            r = run_worker(script, mode, path, out, args.samples, args.seq_len)
            block, other = block_bytes(path, dsize)
            acts = args.samples * args.seq_len * 2048 * 4 * 2 if mode == "gptq" else 0  # hidden in + out, fp32
            target = max(block, other) + acts + 1 * GB
            out_size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            print(
                f"{mode:5s} W4g128 on {nblocks} blocks ({nbytes / GB:.2f} GB): wall {r['wall_s']:.1f} s, "
                f"{nparams / r['wall_s'] / 1e6:.2f} M params/s, peak RSS {r['peak_rss'] / GB:.2f} GB "
                f"({r['peak_rss'] / nbytes:.2f}x the checkpoint; {(r['peak_rss'] - base['peak_rss']) / GB:.2f} GB above "
                f"the import-only worker); target: largest unit {max(block, other) / GB:.2f} GB + activations "
                f"{acts / GB:.3f} GB + 1 GB = {target / GB:.2f} GB -> {'OK' if r['peak_rss'] <= target else 'OVER'}; "
                f"output {out_size / GB:.2f} GB"
            )
            record["runs"].append({"mode": mode, "blocks": nblocks, "checkpoint_bytes": nbytes, **r, "target_bytes": target,
                                   "within_target": r["peak_rss"] <= target, "output_bytes": out_size})  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
            if mode == "gptq":
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)

        small = work / "small"
        build_checkpoint(small, args.dp_layers, 1024, 2816, 32000, 16, 4)
        one = run_worker(script, "gptq", small, work / "dp1", args.dp_samples, args.seq_len)
        two = run_worker(script, "gptq", small, work / "dp2", args.dp_samples, args.seq_len, nproc=2)
        worst, frac = max_weight_diff(work / "dp1", work / "dp2")
        print(
            f"GPTQ calibration, {args.dp_layers} blocks of hidden 1024, {args.dp_samples}x{args.seq_len} tokens: "
            f"1 process {one['wall_s']:.1f} s, 2 gloo processes {two['wall_s']:.1f} s "
            f"(speed-up {one['wall_s'] / two['wall_s']:.2f}x on {os.cpu_count()} shared cores); "
            f"max |W1 - W2| / max |W1| = {worst:.2e}, weights that differ: {100 * frac:.4f}%"
        )
        print(f"load average: {os.getloadavg()[0]:.1f}")
        record["data_parallel"] = {"one_process": one, "two_processes": two, "max_rel_diff": worst, "fraction_differing": frac}
        record["load_average"] = os.getloadavg()[0]
        write_results("bench_streaming", record)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
