"""Build a small C source of lorakit's into a shared library on first use, cache it, load it.

    lib, why = load(Path(".../csrc/dropout.c"), setup)   # a ctypes.CDLL, or (None, the reason)

Used by the compiled kernels (``layers/seeded_dropout.py``, ``quant/ckernel.py``), each of which keeps
a pure torch/numpy path for when this returns None: a kernel is a speed-up, never a requirement.

Build: ``$CC`` (default ``cc``) ``-O2 -shared -fPIC -ffp-contract=off -fno-fast-math`` (IEEE arithmetic,
no fused multiply-adds, so results are bit-identical to the torch/numpy paths) into
``$XDG_CACHE_HOME/lorakit`` (default ``~/.cache/lorakit``); the file name is keyed by a hash of the
source, the flags, the compiler's ``--version`` and the machine. The library is written to a temporary
name and renamed (``_fs.atomic_write``), so processes building at once (pytest workers) each see a
whole file. ``setup(lib)`` declares the argument types and runs the kernel's self-test; a cached file
that does not load or fails it is rebuilt once. ``LORAKIT_NO_CKERNEL=1`` turns every kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

from ._fs import atomic_write
from .errors import LorakitError

FLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")


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
    if path.is_file():
        lib, why = _load(path, setup)
        if lib is not None:
            return lib, ""
    try:
        atomic_write(path, lambda tmp: _compile(source, tmp))
    except (LorakitError, OSError, subprocess.SubprocessError) as exc:
        return None, f"build failed: {exc}"
    return _load(path, setup)


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
