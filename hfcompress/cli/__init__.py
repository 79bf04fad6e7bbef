"""The ``hfcompress`` command line: compress, eval, export, push, card, inspect.

Every command accepts ``--json`` (one JSON object on stdout), ``--quiet`` (no progress on stderr) and
``--verbose`` (library warnings and tracebacks). Exit codes: 0 success, 1 failure while running,
2 bad input (arguments, files, settings), 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
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
  hfcompress export smollm2-int4 -o smollm2-w4a16 --to compressed-tensors      # for vLLM
  hfcompress push smollm2-int4 my-user/SmolLM2-135M-int4
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with bad arguments raised as :class:`CliError` (exit 2, and a JSON error with ``--json``)."""

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout (errors too: {\"error\": ...})")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="show library warnings and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    from . import compress, convert, evaluate, export, inspect, publish

    parser = _Parser(prog="hfcompress", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    compress.add_parser(sub)
    convert.add_parser(sub)
    evaluate.add_parser(sub)
    export.add_parser(sub)
    publish.add_parsers(sub)
    inspect.add_parser(sub)
    for sp in sub.choices.values():
        _common(sp)
    return parser


def report_error(prog: str, message: str, code: int, kind: str, as_json: bool) -> int:
    """One line on stderr and, with ``--json``, ``{"error": {...}}`` on stdout; returns ``code``."""
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    if as_json:
        payload = {"error": {"type": kind, "message": message.split(": ", 1)[-1], "exit_code": code}}
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it).

    Exit codes: 0 success, 1 failure while running, 2 bad input, 130 interrupted (SIGINT at any moment gives
    one line and 130, never a traceback). With ``--json`` every error is also printed as a JSON object on stdout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    prog = "hfcompress" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    try:
        return _run(argv, as_json)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C during the clean-up prints nothing more
    # Out of the handler the interrupted command's frames are released; collecting them here lets any progress
    # bar they held draw its last line now, so the error stays the last line on stderr.
    gc.collect()
    return report_error(prog, "interrupted", INTERRUPTED, "KeyboardInterrupt", as_json)


def _run(argv: list[str], as_json: bool) -> int:
    prog = "hfcompress"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except CliError as exc:
        return report_error(prog, f"error: {exc}", exc.code, "UsageError", as_json)
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
        return report_error(prog, f"error: {exc}", exc.code, "CliError", as_json)
    except KeyboardInterrupt:
        raise
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        if args.verbose:
            raise
        return report_error(prog, f"error: {exc}", BAD_INPUT, type(exc).__name__, as_json)
    except Exception as exc:  # noqa: BLE001  (one clear line; --verbose shows the traceback)
        if args.verbose:
            raise
        return report_error(prog, f"failed: {type(exc).__name__}: {exc}", FAILED, type(exc).__name__, as_json)


if __name__ == "__main__":  # python -m hfcompress.cli
    sys.exit(main())
