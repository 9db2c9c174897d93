"""Build a small C source of lorakit's into a shared library on first use, cache it, load it.

    lib, why = load(Path(".../csrc/dropout.c"), setup)   # a ctypes.CDLL, or (None, the reason)

Used by the compiled kernels (``layers/seeded_dropout.py``, ``quant/ckernel.py``), each of which keeps
a pure torch/numpy path for when this returns None: a kernel is a speed-up, never a requirement.

Build: ``$CC`` (default ``cc``) ``-O2 -shared -fPIC -ffp-contract=off -fno-fast-math`` (IEEE arithmetic,
no fused multiply-adds, so results are bit-identical to the torch/numpy paths) into
``$XDG_CACHE_HOME/lorakit`` (default ``~/.cache/lorakit``); the file name is keyed by a hash of the
source, the flags, the compiler's ``--version`` and the machine. The library is written to a temporary
name and renamed (``_fs.atomic_write``), so processes building at once (pytest workers) each see a
whole file, and its SHA-256 is written beside it and checked before a cached file is loaded (dlopen maps
a truncated file without complaint, and the process then dies of SIGBUS on the missing pages). A cache
folder that other users can write to is not loaded from. ``setup(lib)`` declares the argument types and
runs the kernel's self-test; a cached file that does not match its digest, does not load or fails the
self-test is rebuilt once. ``LORAKIT_NO_CKERNEL=1`` turns every kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from ._fs import atomic_write, atomic_write_text
from .errors import LorakitError

FLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
log = logging.getLogger(__name__)


class Kernel:
    """One C source's library, built and loaded at most once per process (thread-safe), or None.

        DROPOUT = Kernel(SOURCE, _setup, "dropout kernel")
        lib = DROPOUT.library()     # a ctypes.CDLL, or None: use the torch/numpy path
    """

    def __init__(self, source: Path, setup: Callable[[ctypes.CDLL], bool], what: str) -> None:
        self.source, self.what = source, what
        self._setup = setup
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}  # "lib": the CDLL or None once tried; "why": the reason it is None

    def library(self) -> ctypes.CDLL | None:
        if disabled():  # read on every call, so the variable also works when set after the first load
            return None
        if "lib" not in self._state:
            with self._lock:
                if "lib" not in self._state:
                    lib, why = load(self.source, self._setup)
                    if lib is None:
                        log.debug("lorakit: compiled %s unavailable (%s); using the fallback path", self.what, why)
                    self._state["lib"], self._state["why"] = lib, why
        return self._state["lib"]  # type: ignore[return-value]

    def unavailable_reason(self) -> str:
        """Why :meth:`library` is None ("" when it loaded)."""
        if disabled():
            return "LORAKIT_NO_CKERNEL is set"
        self.library()
        return str(self._state.get("why", ""))

    def reset(self) -> None:
        """Forget the loaded library (tests: try again with another compiler or cache)."""
        with self._lock:
            self._state.clear()



def compiler() -> list[str]:
    """The C compiler command (``$CC`` or ``cc``), split like a shell would."""
    return shlex.split(os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorakit"


def disabled() -> bool:
    """``LORAKIT_NO_CKERNEL`` set to anything but "" or "0": every compiled kernel is off."""
    return os.environ.get("LORAKIT_NO_CKERNEL", "") not in ("", "0")


def library_path(source: Path) -> Path:
    """Where ``source`` is cached once built. Raises OSError / SubprocessError when the compiler does not run."""
    version = subprocess.run(compiler() + ["--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(FLAGS).encode(), version.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def load(source: Path, setup: Callable[[ctypes.CDLL], bool]) -> tuple[ctypes.CDLL | None, str]:
    """The built and checked library for ``source``, or (None, why). ``setup`` sets argtypes and
    returns whether the self-test passed."""
    if disabled():
        return None, "LORAKIT_NO_CKERNEL is set"
    try:
        path = library_path(source)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return None, f"no C compiler ({' '.join(compiler()) or 'cc'}: {exc})"
    if not _private(path.parent):
        return None, f"{path.parent} is writable by other users; not loading code from it"
    digest = path.with_name(path.name + ".sha256")
    if _intact(path, digest):
        lib, why = _load(path, setup)
        if lib is not None:
            return lib, ""
    try:
        atomic_write(path, lambda tmp: _compile(source, tmp))
        atomic_write_text(digest, hashlib.sha256(path.read_bytes()).hexdigest())
    except (LorakitError, OSError, subprocess.SubprocessError) as exc:
        return None, f"build failed: {exc}"
    return _load(path, setup)  # whole, whoever renamed it last: every writer renames a finished file


def _private(folder: Path) -> bool:
    """Native code is loaded from this folder: it must be ours and not group/world-writable (or not exist yet)."""
    try:
        st = folder.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & 0o022)


def _intact(path: Path, digest: Path) -> bool:
    """The cached library is whole: its SHA-256 is the one written beside it after the build."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest.read_text().strip()
    except OSError:
        return False


def _compile(source: Path, out: str) -> None:
    cc = compiler()
    p = subprocess.run(cc + list(FLAGS) + ["-o", out, str(source)], capture_output=True, text=True, timeout=300)
    if p.returncode:
        raise subprocess.SubprocessError(f"{' '.join(cc)} exited {p.returncode}: {p.stderr.strip()[-300:]}")


def _load(path: Path, setup: Callable[[ctypes.CDLL], bool]) -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(path))
        ok = setup(lib)
    except (OSError, AttributeError) as exc:  # not a shared object (a truncated file), or a missing symbol
        return None, f"cannot load {path}: {exc}"
    return (lib, "") if ok else (None, f"{path} is stale or miscompiled (self-test failed)")
