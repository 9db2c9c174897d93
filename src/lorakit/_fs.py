"""Atomic file writes: write to a temporary file in the same directory, fsync, then rename.

A crash (even ``kill -9``) in the middle of a save leaves either the old file or the new one, never a
truncated mix, because ``os.replace`` is atomic on POSIX within one filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LorakitError, OutputError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move ``tmp_path`` onto ``path``.

    A full disk, a read-only directory or a missing permission is an ``OutputError`` naming ``path``
    (never a half-written file: the temporary file is removed)."""
    atomic_write_many([(path, write)])


def atomic_write_many(items: list[tuple[str | os.PathLike, Callable[[str], None]]]) -> None:
    """``atomic_write`` for files that belong together (an adapter's weights and config): every file is
    written and fsynced to its temporary first, then all are renamed; a failed write changes none of
    them (only the renames, which do not allocate, come after the first file is in place)."""
    tmps: list[tuple[str, Path]] = []
    try:
        for path, write in items:
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise output_error(exc, path) from None
            os.close(fd)
            tmps.append((tmp, path))
            try:
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
                write(tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            except BaseException as exc:
                if is_write_failure(exc):
                    raise output_error(exc, path) from None
                raise
        for tmp, path in tmps:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise output_error(exc, path) from None
    finally:
        for tmp, _ in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


# How the writers we call report a failed write: OSError, safetensors' SafetensorError("No space left on
# device"), torch's RuntimeError("... failed writing file ..."). Anything else is re-raised untouched.
_WRITE_FAILURES = ("no space left", "read-only file system", "permission denied", "disk quota",
                   "failed writing", "file too large", "input/output error")


def is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, LorakitError):
        return False
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, Exception) and any(w in str(exc).lower() for w in _WRITE_FAILURES)


def output_error(exc: BaseException, path: str | os.PathLike) -> OutputError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    errno_ = exc.errno if isinstance(exc, OSError) else None
    if errno_ == errno.EISDIR:  # the path is a directory: no amount of free space helps
        fix = "give the path of a file, not a directory"
    elif errno_ in (errno.EEXIST, errno.ENOTDIR):  # mkdir / open under a path component that is a file
        fix = "a part of the path is a file, not a directory; choose another path"
    else:
        fix = "Free disk space, or choose a writable directory (e.g. --output-dir elsewhere)"
    return OutputError(f"{path}: cannot be written ({reason}). {fix[0].upper()}{fix[1:]}.")


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
    """Refuse an output *file* path before any work is done: not a path, an existing directory, a path
    under a file, or one of the call's own input files (writing there would replace the input the call
    reads — a base model, an adapter). Returns the path."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise OutputError(f"{what} {path!r}: give the path of the file to write (str or pathlib.Path).")
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory; give the path of a file to write (inside it, or "
                          "elsewhere).")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"{what} {path}: {blocker} is a file, not a directory; choose another path.")
    for given in inputs:
        if _same_file(path, Path(given).expanduser()):
            raise OutputError(f"{what} {path}: is the input file {given}; writing it would replace the input. "
                              "Choose another output path.")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Write a whole directory atomically: ``with atomic_dir(out) as tmp: model.save_pretrained(tmp)``.

    The block writes into a temporary sibling; on success it replaces ``path`` (the previous copy is
    renamed aside, then deleted), on any failure it is deleted and ``path`` is untouched. Readers see
    the old directory or the new one, never a half-written mix of the two."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # a file is never replaced by a directory (nor deleted)
        raise OutputError(f"{path}: is a file, not a directory; choose another output directory.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual mode
    except OSError as exc:
        raise output_error(exc, path) from None
    try:
        yield tmp
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise output_error(exc, path) from None
        raise
