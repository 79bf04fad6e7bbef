"""What every benchmark shares: one way to time, one way to measure peak memory, one worker protocol, one
results file per benchmark.

* :func:`peak_rss_bytes`: the high-water mark of *this process image* (``VmHWM`` in ``/proc/self/status``).
  ``ru_maxrss`` is not used: Linux carries the parent's peak into a child's count across ``exec``, so a worker
  spawned by a big parent would report the parent's memory.
* :func:`cpu_seconds`: CPU time of this process, all threads (closer to what the work costs alone on a shared
  machine than wall time).
* :func:`spawn`: run a worker in a fresh process; it prints one ``RESULT <json>`` line on stdout.
* :func:`write_results`: ``eval/results/<name>.json`` holding the command that produced it, the machine, the
  library versions and the figures, so the docs quote files, not memories.

A worker that is given as code (``python -c``) rather than a file imports this module after
``sys.path.insert(0, EVAL_DIR)``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent
RESULTS_DIR = EVAL_DIR / "results"

__all__ = ["EVAL_DIR", "REPO", "RESULTS_DIR", "cpu_seconds", "machine", "memory_status", "peak_rss_bytes", "spawn", "write_results"]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image (``VmHWM``); ``ru_maxrss`` where ``/proc`` is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_status() -> dict[str, float]:
    """This process's resident anonymous and file-backed memory and its peak (MiB: ``RssAnon``, ``RssFile``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile", "VmHWM")}


def cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spawn(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` and return the JSON of its ``RESULT <json>`` line (``RuntimeError`` with its output otherwise)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker failed ({' '.join(map(str, cmd[:3]))} ...):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def machine() -> dict[str, Any]:
    """The CPU, core count and library versions the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "hfcompress"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (a missing library is recorded as such)
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def write_results(name: str, results: Any, path: str | os.PathLike | None = None) -> Path:
    """Write ``results`` with the command line, date, commit and machine to ``eval/results/<name>.json``."""
    path = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    record = {
        "benchmark": name,
        "command": shlex.join(["python", str(script), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "machine": machine(),
        "results": results,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"results written to {path}")
    return path
