"""``hfcompress export``: write a compressed checkpoint in a serving engine's format (compressed-tensors, GGUF)."""

from __future__ import annotations

import argparse

from .common import emit, fmt_bytes

HELP = "export a compressed checkpoint for vLLM (compressed-tensors) or llama.cpp (GGUF), exactly"

DESCRIPTION = """\
Write SRC (a folder saved by hfcompress; checksums are verified on load) in the format a serving engine
loads. Our integer codes and scales are carried over unchanged: the engine decodes exactly the weights
hfcompress decodes. A layer the target cannot hold exactly (ragged groups, a grid or width the engine lacks,
sparse formats) is refused with the layer, the reason and the setting that exports exactly, unless
--requantize, which rounds it onto the target's grid and reports the error added per layer.

  --to compressed-tensors   OUT is a folder: pack-quantized int4/int8 (W4A16, W8A16), or with
                            --activations int8 int-quantized W8A8; loads in vLLM and in plain transformers
  --to gguf                 OUT is a .gguf file: Q4_0/Q5_0/Q8_0 from symmetric group-32 codes with float16
                            scales, Q4_1/Q5_1 from asymmetric ones; norms F32; dense weights in their dtype
                            (or --dense-type)

examples:
  hfcompress export smollm2-q4 -o smollm2-q4_0.gguf --to gguf --dense-type Q8_0
  hfcompress export smollm2-w4g32 -o smollm2-w4a16 --to compressed-tensors
"""


def add_parser(sub) -> None:
    from ..export.gguf import DENSE_TYPES, QUANT_TYPES

    p = sub.add_parser("export", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a checkpoint folder saved by hfcompress")
    p.add_argument("-o", "--output", required=True, help="output folder (compressed-tensors) or .gguf file (gguf)")
    p.add_argument("--to", required=True, choices=["compressed-tensors", "gguf"], help="target format")
    p.add_argument("--requantize", action="store_true", help="round layers the target cannot hold exactly onto its grid (reports the error)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that hfcompress wrote")
    p.add_argument("--tokenizer", help="tokenizer folder to ship (default: the one in SRC)")
    g = p.add_argument_group("compressed-tensors")
    g.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="checkpoint dtype (default: the model's)")
    g.add_argument("--activations", choices=["int8"], help="W8A8: dynamic per-token int8 activations (int-quantized)")
    g = p.add_argument_group("gguf")
    g.add_argument("--gguf-type", type=str.upper, choices=list(QUANT_TYPES), help="type of the quantized layers (default: their exact type)")
    g.add_argument("--dense-type", type=str.upper, choices=list(DENSE_TYPES), help="type of the weights kept dense (default: their dtype)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..export import export
    from .common import CliError

    if not Path(args.src).is_dir():
        raise CliError(f"{args.src} is not a folder; pass a checkpoint folder saved by hfcompress.")
    if args.to == "gguf" and (args.dtype or args.activations):
        raise CliError("--dtype/--activations apply to --to compressed-tensors only.")
    if args.to == "compressed-tensors" and (args.gguf_type or args.dense_type):
        raise CliError("--gguf-type/--dense-type apply to --to gguf only.")
    options = {"dtype": args.dtype, "activations": args.activations} if args.to == "compressed-tensors" else {
        "gguf_type": args.gguf_type, "dense_type": args.dense_type}  # fmt: skip
    report = export(args.src, args.output, to=args.to, tokenizer=args.tokenizer, requantize=args.requantize,
                    overwrite=args.overwrite, progress=not args.quiet, **options)  # fmt: skip
    lines = [report.summary()]
    for layer in report.requantized:
        lines.append(f"  re-quantized {layer.name} -> {layer.target_type}: relative error {layer.rel_error:.3g} "
                     f"(max {layer.max_abs_error:.3g}); {layer.reason}")  # fmt: skip
    lines.append(f"wrote {args.output} ({fmt_bytes(report.nbytes)})")
    emit(args, report.to_dict(), "\n".join(lines))
    return 0
