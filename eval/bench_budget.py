"""Size-budgeted search on SmolLM2-135M: searched per-module levels vs uniform levels at the same checkpoint size.

    python eval/bench_budget.py [--method rtn] [--seeds 0 1] [--generations 40] [--time-limit 600] [--windows 8]

Protocol: the SmolLM2-135M-Instruct bf16 checkpoint computed in float32; levels w2g64 ... w8g64 built with
``--method`` (one database per seed: the calibration windows depend on the seed); budgets: the exact checkpoint
size of uniform W4 g64 (bf16 tied embedding included) and 3.0 bits per weight over all weights; for each, the
uniform level(s), the one-shot allocation and the searched allocation, scored by WikiText-2 raw test perplexity
over the first ``--windows`` windows of 2048 tokens and by the search's KL on its held-out windows. Writes
``eval/results/bench_budget.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress import HfCompressConfig, compress, oneshot, search_allocation
from hfcompress.evaluation import perplexity, wikitext2_test_text
from hfcompress.plan.allocation import config_with_layer_specs
from hfcompress.plan.targets import resolve_layers
from hfcompress.search import model_bytes, parse_budget, parse_level, stored_bytes
from hfcompress.testing.models import real_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402  (eval/common.py: the results file with command, commit, machine)

LEVELS = ["w2g64", "w3g64", "w4g64", "w5g64", "w6g64", "w8g64"]


def _ppl(dense, config, tok, text, windows, seed, num_samples):
    model = copy.deepcopy(dense)
    if config.is_data_free:
        compress(model, config)
    else:
        oneshot(model, config, tokenizer=tok, num_samples=num_samples, seed=seed, show_progress=False)
    return perplexity(model, tok, text, 2048, windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--generations", type=int, default=40)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per search")
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 2048 tokens for perplexity")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--fitness-samples", type=int, default=8)
    ap.add_argument("--fitness-seq-len", type=int, default=128)
    ap.add_argument("--budgets", nargs="+", default=["w4g64", "w3g64", "3.0bits"],
                    help="a level name (the exact size of that uniform level) or a budget such as 3.0bits")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    src = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    text = wikitext2_test_text()
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dense.config.dtype = torch.bfloat16  # dense tensors are counted (and saved) in the checkpoint's bf16
    config = HfCompressConfig(method=args.method, bits=4, group_size=64)
    sizes = model_bytes(dense, list(resolve_layers(dense, config)))
    dense_ppl = perplexity(dense, tok, text, 2048, args.windows)
    print(f"dense: ppl {dense_ppl:.3f}", flush=True)
    runs = []
    for seed in args.seeds:
        db = None  # built by the first search (on this seed's calibration windows), reused by the others
        for label in args.budgets:
            budget = label
            if label in LEVELS:  # the exact checkpoint size of that uniform level
                spec = parse_level(label, config.default_spec())
                budget = sizes.fixed + sum(stored_bytes(spec, shape) for shape in sizes.shapes.values())
            try:
                parse_budget(budget, sizes)
            except ValueError as exc:
                print(f"{label}: not searchable: {exc}", flush=True)
                runs.append({"seed": seed, "budget": label, "infeasible": str(exc)})
                continue
            result = search_allocation(
                dense, config, budget, None, tokenizer=tok, levels=LEVELS, database=db, num_samples=args.num_samples,
                fitness_samples=args.fitness_samples, fitness_seq_len=args.fitness_seq_len, seed=seed,
                generations=args.generations, time_limit=args.time_limit,
            )  # fmt: skip
            db = result.database
            print(result.summary(), flush=True)
            row = {"seed": seed, "budget": label, "budget_bytes": result.budget.nbytes, "searched_bytes": result.nbytes,
                   "bits_per_weight": result.bits_per_weight, "kl": result.kl, "baseline_kl": result.baseline_kl,
                   "uniform": result.uniform, "generations": result.generations, "database_seconds": result.seconds["database"],
                   "search_seconds": result.seconds["search"], "levels": result.levels}  # fmt: skip
            ppl = lambda cfg: _ppl(dense, cfg, tok, text, args.windows, seed, args.num_samples)  # noqa: E731
            row["searched_ppl"] = ppl(result.config)
            baseline_specs = {n: db.modules[level][n].spec for n, level in result.baseline_levels.items()}
            row["baseline_ppl"] = ppl(config_with_layer_specs(dense, result.config, baseline_specs)[0])
            if result.uniform is not None:
                row["uniform_ppl"] = ppl(HfCompressConfig(method=args.method, bits=int(result.uniform[0][1]), group_size=64))
            print({k: v for k, v in row.items() if k != "levels"}, flush=True)
            runs.append(row)
    print(f"\nSmolLM2-135M, {args.method} levels {LEVELS}, WikiText-2 {args.windows} x 2048, dense ppl {dense_ppl:.3f}")
    print(f"{'budget':24s} {'seed':>4s} {'bits/w':>7s} {'uniform':>16s} {'one-shot':>9s} {'searched':>9s} {'KL one-shot':>12s} {'KL searched':>12s}")
    for r in runs:
        if "infeasible" in r:
            print(f"{r['budget']:24s} {r['seed']:4d} infeasible: {r['infeasible']}")
            continue
        uni = f"{r['uniform'][0]} {r.get('uniform_ppl', float('nan')):.3f}" if r["uniform"] else "-"
        print(f"{r['budget']:24s} {r['seed']:4d} {r['bits_per_weight']:7.3f} {uni:>16s} {r['baseline_ppl']:9.3f} "
              f"{r['searched_ppl']:9.3f} {r['baseline_kl']:12.5f} {r['kl']:12.5f}")  # fmt: skip
    for label in {r["budget"] for r in runs}:
        rows = [r for r in runs if r["budget"] == label and "infeasible" not in r]
        if len(rows) > 1:
            print(f"{label}: searched ppl mean {statistics.mean(r['searched_ppl'] for r in rows):.3f} "
                  f"[{min(r['searched_ppl'] for r in rows):.3f}, {max(r['searched_ppl'] for r in rows):.3f}]")  # fmt: skip
    write_results("bench_budget", {"method": args.method, "levels": LEVELS, "windows": args.windows, "dense_ppl": dense_ppl, "runs": runs})


if __name__ == "__main__":
    main()
