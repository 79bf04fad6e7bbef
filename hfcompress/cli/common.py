"""Shared pieces of the ``hfcompress`` commands: errors with exit codes, output, model loading."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

#: exit codes
OK, FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """An error the CLI reports as one line (no traceback) with an exit code (default: bad input)."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def emit(args, payload: dict[str, Any], text: str) -> None:
    """Print the command's result: ``payload`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def info(args, message: str) -> None:
    """A progress note on stderr (silent with ``--quiet``)."""
    if not getattr(args, "quiet", False):
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def local_model_dir(source: str, allow_download: bool = False) -> Path:
    """A model given as a local folder or a Hub id, as a local folder (Hub ids: the cache snapshot)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{source} is a folder without config.json; pass a transformers model folder or a Hub model id.")
        return path
    if path.exists():
        raise CliError(f"{source} is a file; pass a model folder or a Hub model id.")
    if not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", source):
        raise CliError(f"{source} does not exist: it is neither a local folder nor a Hub model id (namespace/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=not allow_download))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise CliError(
            f"{source} is neither a local folder nor a model in the Hugging Face cache; check the path, or pass "
            "--allow-download to fetch the Hub model."
        ) from None
    except (RepositoryNotFoundError, HfHubHTTPError, ValueError) as exc:
        raise CliError(f"cannot get model {source!r} from the Hub: {exc}".splitlines()[0]) from None


def model_class(folder: Path):
    """The transformers class named by ``config.json``'s ``architectures`` (``AutoModel`` if unknown)."""
    import transformers

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls or transformers.AutoModel


def load_model(folder: Path, dtype: str | None = "auto", **kwargs):
    """``from_pretrained`` with the checkpoint's own class; hfcompress checkpoints reload compressed."""
    from .. import quantizer  # noqa: F401  (registers quant_method="hfcompress")

    return model_class(folder).from_pretrained(folder, dtype=torch_dtype(dtype), **kwargs).eval()


def load_preprocessor(folder: Path, kind: str):
    """The folder's tokenizer (``kind="tokenizer"``) or image processor, or ``None`` when it has none."""
    try:
        if kind == "tokenizer":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder)
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quiet_libraries(verbose: bool) -> None:
    """Keep transformers/huggingface_hub warnings off the terminal unless ``--verbose``."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
