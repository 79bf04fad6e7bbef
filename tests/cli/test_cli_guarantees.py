"""The command-line contract under attack: wrong arguments, --json errors, Ctrl-C at any moment, empty tokens."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hfcompress.cli import main

# the console script's own code path (the wrapper pip generates imports _hfcompress_entry and calls main); "ready"
# marks the interpreter's start-up as done (a signal before that is Python's, before any code of ours runs)
LAUNCH = (
    "import sys, _hfcompress_entry; sys.stderr.write('ready\\n'); sys.stderr.flush(); "
    "sys.argv = ['hfcompress'] + sys.argv[1:]; _hfcompress_entry.main()"
)


def _json_error(capsys, *argv) -> tuple[int, dict, str]:
    code = main([*argv, "--json"]) if "--json" not in argv else main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out), err


@pytest.mark.parametrize(
    "argv, code, kind",
    [
        (["inspect", "/does/not/exist"], 2, "CliError"),
        (["compress", "x", "--bits", "four"], 2, "UsageError"),
        (["compress", "x"], 2, "UsageError"),  # -o missing
        (["nosuchcommand"], 2, "UsageError"),
        (["push", ".", "me/x", "--token", ""], 2, "CliError"),
    ],
)
def test_errors_are_one_json_object_on_stdout_with_json(capsys, argv, code, kind):
    got, payload, err = _json_error(capsys, *argv)
    assert got == code
    assert payload["error"]["exit_code"] == code and payload["error"]["type"] == kind and payload["error"]["message"]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_without_json_errors_are_one_line_on_stderr(capsys):
    assert main(["inspect", "/does/not/exist"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("hfcompress inspect: error:") and len(err.splitlines()) == 1


def test_empty_token_is_refused_before_any_network(capsys, tiny_dense_dir):
    assert main(["push", str(tiny_dense_dir), "me/x", "--token", "  "]) == 2
    assert "--token is empty" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("hfcompress") is None, reason="the console script is installed with pip install -e .")
def test_the_console_script_is_the_stdlib_launcher():
    proc = subprocess.run(["hfcompress", "inspect", "/does/not/exist", "--json"], capture_output=True, text=True)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["exit_code"] == 2


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.6, 1.2, 2.5])
def test_ctrl_c_at_any_moment_prints_one_line_and_exits_130(tiny_dense_dir, tmp_path, delay):
    """From the launcher's first instruction (torch still importing) to the middle of a compression."""
    out = tmp_path / "out"
    data = tmp_path / "calibration.txt"  # enough text that the command cannot end by itself with a data error
    data.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 4 for i in range(64)))
    argv = ["compress", str(tiny_dense_dir), "-o", str(out), "--method", "gptq", "--bits", "4", "--dataset",
            str(data), "--num-samples", "64", "--seq-len", "64", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr.readline() == "ready\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal: nothing to check
        return
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].endswith("interrupted"), stderr
    assert json.loads(stdout.strip().splitlines()[-1])["error"]["exit_code"] == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], list(tmp_path.iterdir())


def test_an_error_after_the_progress_bar_started_is_the_last_line(tiny_dense_dir, tmp_path):
    """The bar is closed before the error is printed, so it cannot redraw under the one line."""
    argv = ["compress", str(tiny_dense_dir), "-o", str(tmp_path / "out"), "--method", "gptq", "--bits", "4", "--dataset",
            str(tiny_dense_dir / "config.json"), "--num-samples", "64", "--seq-len", "64"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", LAUNCH, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "compress:" in proc.stderr  # the bar was drawn
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hfcompress compress: error:") and "fewer than num_samples" in last, proc.stderr
