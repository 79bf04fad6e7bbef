"""``hfcompress inspect``: per-layer format, bits, sparsity and bytes of a saved checkpoint."""

from __future__ import annotations

import argparse

from .common import emit, fmt_bytes

HELP = "show per-layer bits/weight, sparsity, bytes and format of a saved checkpoint (no weights loaded)"

DESCRIPTION = """\
Read FOLDER's config.json and safetensors headers (weights are not loaded) and list every compressed
layer: storage format, shape, bits, group size, configured sparsity, stored bytes and bits per weight
(scales, zero points and masks included), with totals against the same model in bfloat16. --measure
decodes each layer, one at a time, to report the share of exact zeros actually stored. Also works on a
dense folder (it then lists no compressed layers). The stored tensors are checked against the config,
so a damaged checkpoint is reported here: by default every tensor is also checked against the checksums
recorded when it was written, and config.json against the config the tensors were written for, as loading
does (--no-verify reads the headers only).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--groups", action="store_true", help="aggregate layers by role (block index replaced by *)")
    p.add_argument("--measure", action="store_true", help="decode each layer to measure its zero fraction (slower)")
    p.add_argument("--no-verify", action="store_true", help="read only the headers: skip the checksums and consistency checks that loading runs")
    p.set_defaults(func=run)


def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    from pathlib import Path

    from ..inspection import inspect_checkpoint, layer_groups
    from .common import CliError

    if not Path(args.folder).is_dir():
        raise CliError(f"{args.folder} is not a folder; pass a checkpoint folder (config.json + *.safetensors).")
    report = inspect_checkpoint(
        args.folder, measure=args.measure, show_progress=args.measure and not args.quiet, verify=not args.no_verify
    )
    if args.groups:
        report["groups"] = layer_groups(report["layers"])
    lines = [f"{report['folder']}: {report['architecture']}"]
    qc = report["quantization_config"]
    if qc is None:
        lines.append("not compressed by hfcompress (no hfcompress quantization_config)")
    else:
        lines.append(f"method={qc['method']} bits={qc['bits']} group_size={qc['group_size']} sparsity={qc['sparsity']} ({qc['sparsity_structure']})")
        measured = args.measure and not args.groups
        head = ["group" if args.groups else "layer"] + (["n"] if args.groups else ["shape"])
        head += ["format", "bits", "group", "sparsity"] + (["zeros"] if measured else []) + ["bytes", "bits/w"]
        rows = [head]
        for item in report["groups"] if args.groups else report["layers"]:
            row = [item["group"] if args.groups else item["name"]]
            row.append(str(item["count"]) if args.groups else "x".join(map(str, item["shape"])))
            gs = item["group_size"]
            row += [str(item["format"]), str(item["bits"] or "-"), "channel" if gs is None else str(gs), f"{item['sparsity']:.3g}" if isinstance(item["sparsity"], float) else str(item["sparsity"])]
            if measured:
                row.append(f"{item['zero_fraction']:.3f}")
            row += [fmt_bytes(item["nbytes"]), f"{item['bits_per_weight']:.2f}"]
            rows.append(row)
        if len(rows) > 1:
            lines.append(_table(rows, right={1, 3, 4, 5} | set(range(len(head) - 3, len(head)))))
    params = report["compressed_params"]
    bpw = f", {8 * report['compressed_bytes'] / params:.2f} bits per compressed weight" if params else ""
    lines.append(
        f"total {fmt_bytes(report['total_bytes'])} (compressed layers {fmt_bytes(report['compressed_bytes'])}, "
        f"other {fmt_bytes(report['other_bytes'])}); bfloat16 equivalent {fmt_bytes(report['bf16_bytes'])} "
        f"({report['bf16_bytes'] / max(report['total_bytes'], 1):.2f}x){bpw}"
    )
    emit(args, report, "\n".join(lines))
    return 0
