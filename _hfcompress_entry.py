"""The ``hfcompress`` console command's entry point, kept outside the ``hfcompress`` package on purpose.

Importing ``hfcompress`` loads torch and transformers (seconds). A Ctrl-C during that import would escape every
handler inside the package and end in a traceback; this module imports only the standard library first, so the
command's contract holds from its first instruction: SIGINT at any moment prints one line and exits 130 (with
``--json``, also a JSON error object on stdout). A Ctrl-C while the libraries import takes effect once they
are imported (a few seconds at most).
"""

from __future__ import annotations

import json
import signal
import sys

INTERRUPTED = 130


def _interrupted(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = "hfcompress" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    sys.stderr.write(f"{name}: interrupted\n")
    if "--json" in argv:
        error = {"type": "KeyboardInterrupt", "message": "interrupted", "exit_code": INTERRUPTED}
        sys.stdout.write(json.dumps({"error": error}) + "\n")
    return INTERRUPTED


def main() -> None:
    argv = sys.argv[1:]
    # While torch, transformers and hfcompress import, a Ctrl-C is only recorded: an interrupt inside a library's
    # import can be swallowed there and leave a half-imported module that fails later with an unrelated error.
    pending = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        from hfcompress.cli import main as run
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = _interrupted(argv) if pending else None
    if code is None:
        try:
            code = run(argv)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing may interrupt the exit itself
        except KeyboardInterrupt:
            if code is None:  # hfcompress.cli reports its own; this covers the instants before it takes over
                code = _interrupted(argv)
            else:  # the command had finished (and reported) when the signal came: its own code stands
                signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
