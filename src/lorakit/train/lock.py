"""One run per output directory: ``OUTPUT_DIR/.lorakit.lock``, held for the whole run.

Two ``lorakit train`` into one directory would interleave their ``log.csv`` rows, prune each other's
checkpoints and overwrite each other's adapter. The first run takes an exclusive ``flock`` on the lock
file and writes its pid and host into it; a second run finds the lock held and is refused with a
``RunLockedError`` naming the directory and the holder.

The kernel drops a ``flock`` when its process dies, however it dies (``kill -9`` included), so a lock
file left behind by a dead run is never mistaken for a live one. Where ``flock`` is unavailable (some
network filesystems) the file is created exclusively instead, and a file whose pid is no longer
running on this host is taken over as stale.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from .._fs import output_error
from ..errors import OutputError

LOCK_NAME = ".lorakit.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLockedError(OutputError):
    """Another live run holds the output directory."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie or another user's process counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(output_dir): ...`` — refuse if another run holds ``output_dir``; release on exit."""

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # directories acquire created, deepest first (removed again if left empty)

    # -- take / release ----------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        if self.dir.exists() and not self.dir.is_dir():  # mkdir would say "File exists" about the lock file
            raise OutputError(f"output_dir {str(self.dir)!r} is a file, not a directory; give a directory "
                              "(new or one of an earlier run) for the run's checkpoints, log and adapter.")
        missing = self.dir.absolute()
        self._made = []
        while not missing.exists() and missing != missing.parent:
            self._made.append(missing)
            missing = missing.parent
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if not self._try_flock(fd):
                    os.close(fd)
                    raise self._refusal()
                # The holder before us may have unlinked the file between our open and our flock:
                # then we lock an orphan inode. Only the file the path names now counts.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode())
            self._fd = fd
        except RunLockedError:
            raise
        except OSError as exc:
            raise output_error(exc, self.path) from None
        return self

    def _try_flock(self, fd: int) -> bool:
        if fcntl is None:
            return self._pid_file_fallback()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return self._pid_file_fallback()
            raise

    def _pid_file_fallback(self) -> bool:
        holder = self.holder()
        return holder is None or holder[0] == os.getpid() or (
            holder[1] == socket.gethostname() and not pid_alive(holder[0]))

    def holder(self) -> tuple[int, str] | None:
        """(pid, host) written by the current or last holder, or None."""
        try:
            pid, host, *_ = self.path.read_text(encoding="utf-8", errors="replace").split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def _refusal(self) -> RunLockedError:
        holder = self.holder()
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        return RunLockedError(
            f"{self.dir} is in use by another lorakit run ({who}; lock {self.path}). Wait for it to finish, "
            "stop it, or pick another --output-dir."
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can have taken it meanwhile
        except OSError:
            pass  # a read-only directory now: the flock below is what matters
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        # A run that failed before writing anything (bad data, no matching target) leaves no empty
        # output directory behind; a directory that holds anything (or existed before) stays.
        for d in self._made:
            try:
                d.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
