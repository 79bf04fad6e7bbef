"""Output folders that are written atomically, never overlap their inputs, and only ever replace our own.

Every folder hfcompress writes (``hfcompress compress``/``save_compressed``, ``convert_checkpoint``,
``compress_checkpoint``, compressed adapters) goes through :class:`OutputFolder`, which makes these promises:

* **Containment.** An output that is, contains or lies inside one of the operation's inputs (paths resolved,
  symbolic links followed) is refused with :class:`OutputPathError` before anything is written.
* **Atomicity.** The content is written into a temporary sibling ``.<name>.tmp-<random>`` and renamed into
  place at the end, so the output either does not exist or is complete. Nothing else outside the output
  folder is written, and nothing outside it is deleted.
* **Overwrite only what we wrote.** ``overwrite=True`` replaces an existing output only if it is an empty
  folder or a folder hfcompress wrote (it holds the marker file :data:`MARKER`); a file, a symbolic link, or a
  folder of anything else is refused.
* **No leftovers.** A run that is killed leaves its temporary sibling behind; the next run writing the same
  output removes it (a temporary folder still in use by a live process is locked and left alone). A kill
  between the two renames of a replacement leaves the previous output as ``.<name>.old-<random>``: the next
  run puts it back first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: file in every folder hfcompress writes; its presence is what lets ``overwrite=True`` replace the folder
MARKER = ".hfcompress-output.json"

__all__ = [
    "MARKER",
    "OutputFile",
    "OutputFolder",
    "OutputPathError",
    "check_containment",
    "check_replaceable",
    "clean_leftovers",
    "copy_contained",
    "is_our_folder",
    "marker_info",
    "move_into_place",
    "write_file_atomic",
    "write_marker",
]

#: test hook: called with the name of each write phase (see :meth:`OutputFolder._phase`); ``None`` in use
_on_phase: Callable[[str], None] | None = None


class OutputPathError(ValueError):
    """An output path that would overlap an input, or replace something hfcompress did not write."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_containment(out: str | os.PathLike, sources: Iterable[str | os.PathLike | None], what: str = "output") -> None:
    """Refuse ``out`` when it is, contains or lies inside one of ``sources`` (resolved paths)."""
    target = _resolved(out)
    for source in sources:
        if source is None:
            continue
        src = _resolved(source)
        if target == src:
            raise OutputPathError(f"{what} {str(out)!r} is the input {str(source)!r}; write to a new folder instead.")
        if _within(src, target):
            raise OutputPathError(
                f"{what} {str(out)!r} contains the input {str(source)!r}; replacing it would delete the input. "
                "Choose an output folder outside the input."
            )
        if _within(target, src):
            raise OutputPathError(
                f"{what} {str(out)!r} lies inside the input {str(source)!r}; writing it would modify the input. "
                "Choose an output folder outside the input."
            )


def is_our_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a real folder (not a link) holding hfcompress's marker file."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def check_replaceable(out: Path, overwrite: bool, what: str) -> None:
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{what} {str(out)!r} already exists; choose another folder or pass overwrite=True (CLI: --overwrite).")
    if out.is_symlink():
        raise OutputPathError(f"{what} {str(out)!r} is a symbolic link; hfcompress replaces only folders it wrote. Remove the link first.")
    if not out.is_dir():
        raise OutputPathError(f"{what} {str(out)!r} is a file, not a folder hfcompress wrote; refusing to replace it. Remove it first.")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputPathError(
            f"{what} {str(out)!r} holds files that hfcompress did not write (no {MARKER}); --overwrite only replaces "
            "folders written by hfcompress. Choose another folder or remove it yourself."
        )


def _try_lock(path: Path):
    """An exclusive non-blocking lock on ``path`` (a file), or ``None`` when another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed runs writing ``out`` left beside it; restore a previous output caught mid-replacement.

    Only siblings named ``.<name>.tmp-*`` / ``.<name>.old-*`` that hold our marker (and whose lock no live process
    holds) are touched. Returns the removed paths.
    """
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return []
    removed = []
    olds = sorted(p for p in parent.glob(f".{name}.old-*") if is_our_folder(p))
    if olds and not os.path.lexists(out):
        os.replace(olds[-1], out)  # the previous output, moved aside by a run killed before the new one arrived
        olds = olds[:-1]
    for leftover in sorted(parent.glob(f".{name}.tmp-*")) + olds:
        if not is_our_folder(leftover):
            continue
        fd = _try_lock(leftover / MARKER)
        if fd is None:
            continue  # in use by a live process
        try:
            shutil.rmtree(leftover)
            removed.append(leftover)
        finally:
            os.close(fd)
    return removed


class OutputFolder:
    """Context manager writing one output folder atomically (see the module docstring)::

        with OutputFolder(out, sources=[src], overwrite=overwrite, kind="checkpoint") as tmp:
            ...write everything into tmp...
        # out now holds exactly what was written into tmp

    Args:
        out: the folder to produce.
        sources: the operation's inputs (folders or files); ``out`` may not overlap any of them.
        overwrite: replace an existing ``out`` (only an empty folder or one hfcompress wrote).
        kind: what the folder holds, recorded in the marker (``"checkpoint"``, ``"adapter"``, ...).
        what: how errors name the output (e.g. ``"--output"``).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        sources: Iterable[str | os.PathLike | None] = (),
        *,
        overwrite: bool = False,
        kind: str = "checkpoint",
        what: str = "output",
    ) -> None:
        self.out = Path(out)
        self.sources = [s for s in sources if s is not None]
        self.overwrite = bool(overwrite)
        self.kind = kind
        self.what = what
        self.tmp: Path | None = None
        self._lock: int | None = None
        self.check()

    def check(self) -> None:
        """Raise now if the output is refused (containment, existing content); nothing is written."""
        if not self.out.name or self.out.name in (".", ".."):
            raise OutputPathError(f"{self.what} {str(self.out)!r} does not name a folder; pass e.g. ./my-model-int4.")
        check_containment(self.out, self.sources, self.what)
        check_replaceable(self.out, self.overwrite, self.what)

    @staticmethod
    def _phase(name: str) -> None:
        if _on_phase is not None:
            _on_phase(name)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.out)
        self.check()  # again: a restored previous output, or a change since construction
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._lock = _try_lock(write_marker(self.tmp, self.kind))
        self._phase("started")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._phase("written")
                self._swap_into_place()
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _swap_into_place(self) -> None:
        move_into_place(self.tmp, self.out, overwrite=self.overwrite, what=self.what, phase=self._phase)


class OutputFile:
    """Context manager writing one output *file* atomically, with the same promises as :class:`OutputFolder`::

        with OutputFile(out, sources=[src], overwrite=False, is_ours=looks_like_ours) as tmp:
            ...write the whole file at tmp...
        # out is now that file

    The file is written as a temporary sibling ``.<name>.tmp-<random>`` (locked while in use) and renamed onto
    ``out``. ``overwrite=True`` replaces an existing ``out`` only when ``is_ours(out)`` says hfcompress wrote it;
    leftovers of killed runs are removed when ``is_ours`` recognises them (or they are empty).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        sources: Iterable[str | os.PathLike | None] = (),
        *,
        overwrite: bool = False,
        is_ours: Callable[[Path], bool],
        what: str = "output",
    ) -> None:
        self.out = Path(out)
        self.sources = [s for s in sources if s is not None]
        self.overwrite = bool(overwrite)
        self.is_ours = is_ours
        self.what = what
        self.tmp: Path | None = None
        self._fd: int | None = None
        self.check()

    def check(self) -> None:
        if not self.out.name or self.out.name in (".", ".."):
            raise OutputPathError(f"{self.what} {str(self.out)!r} does not name a file.")
        check_containment(self.out, self.sources, self.what)
        if not os.path.lexists(self.out):
            return
        if not self.overwrite:
            raise FileExistsError(f"{self.what} {str(self.out)!r} already exists; choose another name or pass overwrite=True (CLI: --overwrite).")
        if self.out.is_symlink() or not self.out.is_file():
            raise OutputPathError(f"{self.what} {str(self.out)!r} is not a regular file; hfcompress replaces only files it wrote.")
        if not self.is_ours(self.out):
            raise OutputPathError(
                f"{self.what} {str(self.out)!r} was not written by hfcompress; --overwrite only replaces files hfcompress "
                "wrote. Choose another name or remove it yourself."
            )

    def _clean_leftovers(self) -> None:
        for leftover in sorted(self.out.parent.glob(f".{self.out.name}.tmp-*")):
            if leftover.is_symlink() or not leftover.is_file():
                continue
            fd = _try_lock(leftover)
            if fd is None:
                continue  # a live run is writing it
            try:
                if leftover.stat().st_size == 0 or self.is_ours(leftover):
                    leftover.unlink()
            finally:
                os.close(fd)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        self.check()
        fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent)
        self.tmp = Path(name)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o666 & ~_umask())  # the permissions a plain open() would give, not mkstemp's 0600
        self._fd = fd
        OutputFolder._phase("started")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                OutputFolder._phase("written")
                self.check()  # nothing appeared under us since the start
                os.replace(self.tmp, self.out)
                OutputFolder._phase("replaced")
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self.tmp is not None and self.tmp.exists():
                self.tmp.unlink()
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomic(path: str | os.PathLike, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write one small file inside a folder being written (a JSON record, a card, a policy) atomically.

    ``content`` is text (UTF-8, written as is), bytes, or a function writing the file at the path it is given
    (``torch.save``, ``safetensors.torch.save_file``, ``fig.savefig``). It goes to a unique temporary sibling
    ``.<name>.<random>.tmp`` that is renamed over ``path`` once complete, so readers see the old file or the new
    one, never a part; the temporary file is removed if writing fails. For whole outputs, and files that must
    not replace someone else's, use :class:`OutputFolder` / :class:`OutputFile`.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the permissions a plain open() would give, not mkstemp's 0600
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_marker(folder: Path, kind: str) -> Path:
    """Write :data:`MARKER` into ``folder`` (a folder hfcompress is writing)."""
    path = Path(folder) / MARKER
    path.write_text(json.dumps({"writer": "hfcompress", "kind": kind, "format": 1}) + "\n")
    return path


def move_into_place(
    tmp: Path, out: Path, *, overwrite: bool, what: str = "output", phase: Callable[[str], None] | None = None
) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` (only one we may replace, see
    :class:`OutputFolder`) is moved aside first and removed after."""
    phase = phase or OutputFolder._phase
    check_replaceable(out, overwrite, what)  # nothing changed under us since the start
    if not os.path.lexists(out):
        os.replace(tmp, out)
        phase("replaced")
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    if not (out / MARKER).exists():  # an empty folder: mark it so that a killed run's backup is recognised
        write_marker(out, "empty")
    os.replace(out, old)
    phase("moved-aside")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    phase("replaced")
    shutil.rmtree(old, ignore_errors=True)


def copy_contained(src: Path, dst: Path, skip: Iterable[str] = (), skip_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Copy the files of the folder ``src`` into ``dst`` (sub-folders included), as regular files.

    Top-level names in ``skip``, names ending with ``skip_suffixes``, hidden files and folders (the marker,
    ``.cache``, ``.git``), and symbolic links that lead
    outside ``src`` (a link to a system file must not turn into a copy of it) are left out; files ``dst``
    already has are kept. Returns the copied paths relative to ``dst``.
    """
    src, dst = Path(src), Path(dst)
    root = _resolved(src)
    skip = set(skip) | {MARKER}
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or any(part.startswith(".") for part in rel.parts) or path.name.endswith(skip_suffixes):
            continue
        real = _resolved(path)
        if not _within(real, root) or not path.is_file():
            continue  # links leaving the folder, folders themselves (created below), sockets...
        target = dst / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, target)
        copied.append(rel.as_posix())
    return copied


def marker_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a folder hfcompress wrote, or ``None``."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
