"""``hfcompress convert``: the lossless (bit-exact, entropy-coded) twin of a checkpoint, streamed shard by shard."""

from __future__ import annotations

import argparse

from .common import emit, fmt_bytes

HELP = "write the lossless (bit-exact, entropy-coded) twin of a checkpoint, shard by shard"

DESCRIPTION = """\
Write OUTPUT, the lossless twin of SRC (any Hugging Face model folder with safetensors weights): every tensor the
codec shrinks is entropy-coded, the rest is stored as it is, and the result reloads with plain from_pretrained
after `import hfcompress`, decoding to exactly the original weights. Shards are converted one at a time, so
memory stays near one shard. --dtype casts floating tensors first (that step is not lossless).

example:
  hfcompress convert smollm2 -o smollm2-lossless
"""


def add_parser(sub) -> None:
    from ..convert import _CAST_DTYPES

    p = sub.add_parser("convert", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Hugging Face model folder with safetensors weights")
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--dtype", choices=sorted(_CAST_DTYPES), help="cast floating tensors first (not lossless)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that hfcompress wrote")
    p.add_argument("--threads", type=int, default=None, help="coding threads (default: all CPUs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert import convert_checkpoint
    from ..formats.lossless import lossless_files_summary

    out = convert_checkpoint(args.src, args.output, dtype=args.dtype, threads=args.threads, overwrite=args.overwrite)
    summary = lossless_files_summary(out)
    before = summary["decoded_bytes"] + summary["plain_bytes"]
    after = summary["coded_bytes"] + summary["plain_bytes"]
    text = (f"{out}: {summary['coded_tensors']} tensors coded, {fmt_bytes(after)} of tensors "
            f"({100 * after / max(before, 1):.2f}% of {fmt_bytes(before)})")  # fmt: skip
    emit(args, {"output": str(out), "tensor_bytes": after, "original_tensor_bytes": before, **summary}, text)
    return 0
