"""The ``hfcompress`` command line: compress, eval, push, card, inspect.

Every command accepts ``--json`` (one JSON object on stdout), ``--quiet`` (no progress on stderr) and
``--verbose`` (library warnings and tracebacks). Exit codes: 0 success, 1 failure while running,
2 bad input (arguments, files, settings), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .common import BAD_INPUT, FAILED, INTERRUPTED, CliError

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Compress Hugging Face models (quantization, sparsity, lossless packing), evaluate them against the
dense original, and publish them with a model card. Run `hfcompress COMMAND --help` for each command.

typical session:
  hfcompress compress ./SmolLM2-135M -o smollm2-int4 --bits 4 --group-size 128
  hfcompress inspect smollm2-int4 --groups
  hfcompress eval smollm2-int4 --baseline ./SmolLM2-135M --out eval/ --write-card
  hfcompress push smollm2-int4 my-user/SmolLM2-135M-int4
"""


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="show library warnings and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    from . import compress, evaluate, inspect, publish

    parser = argparse.ArgumentParser(prog="hfcompress", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    compress.add_parser(sub)
    evaluate.add_parser(sub)
    publish.add_parsers(sub)
    inspect.add_parser(sub)
    for sp in sub.choices.values():
        _common(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .common import quiet_libraries

    quiet_libraries(args.verbose)
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()
    prog = f"hfcompress {args.command}"
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        if args.verbose:
            raise
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return BAD_INPUT
    except Exception as exc:  # noqa: BLE001  (one clear line; --verbose shows the traceback)
        if args.verbose:
            raise
        sys.stderr.write(f"{prog}: failed: {type(exc).__name__}: {exc}\n")
        return FAILED


if __name__ == "__main__":  # python -m hfcompress.cli
    sys.exit(main())
