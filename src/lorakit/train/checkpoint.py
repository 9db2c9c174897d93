"""Training checkpoints: written whole or not at all, read without unpickling arbitrary objects.

Layout of ``OUTPUT_DIR/checkpoints/step-000300/``::

    trainable.safetensors   every trainable parameter, by its name in the (unwrapped) model
    optimizer.pt            optimizer.state_dict()        (param groups keep their "base_lr")
    schedule.json           schedule, warm-up and total steps (the lr is a pure function of the step)
    hooks.pt                [hook.state_dict() for each hook]
    rng.pt                  per-process RNG states (python, numpy, torch, cuda)
    trainer_state.json      step, data position, loss history, counters, the run's fingerprint

A save writes everything into ``checkpoints/.tmp-…`` (each file fsync'ed), then renames that
directory to ``step-NNNNNN`` — one atomic ``rename``. A crash or ``kill -9`` at any point leaves
either no new checkpoint or a complete one, and never touches the previous one. ``.pt`` files are
read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts — no code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._fs import is_write_failure, output_error
from ..errors import CheckpointError
from .lock import pid_alive

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("trainable.safetensors", "optimizer.pt", "schedule.json", "hooks.pt", "rng.pt", "trainer_state.json")


@dataclass
class Checkpoint:
    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    hooks: list[dict[str, Any]]
    rng: list[dict[str, Any]]  # one entry per process rank
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# -- save -------------------------------------------------------------------------------------------
def save_checkpoint(root: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    schedule: dict[str, Any], hooks: list[dict[str, Any]], rng: list[dict[str, Any]],
                    state: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` ones."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, root) from None
    list_checkpoints(root)  # recovers a crashed same-step re-save before anything else
    _remove_dead_temporaries(root)
    final = root / f"step-{step:06d}"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-p{os.getpid()}-", dir=root))
    except OSError as exc:
        raise output_error(exc, root) from None
    try:
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in trainable.items()}
        _write(tmp / "trainable.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        _write(tmp / "optimizer.pt", lambda p: torch.save(optimizer, p))
        _write(tmp / "hooks.pt", lambda p: torch.save(hooks, p))
        _write(tmp / "rng.pt", lambda p: torch.save(rng, p))
        _write(tmp / "schedule.json", lambda p: Path(p).write_text(json.dumps(schedule, indent=2)))
        # trainer_state.json last: a directory with it is complete even before the rename.
        _write(tmp / "trainer_state.json", lambda p: Path(p).write_text(json.dumps({**state, "step": step}, indent=1)))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
            old = root / f".old-step-{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise output_error(exc, final) from None
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            remove_dir(old)
    return final


def remove_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is ever visible under its name: rename it aside
    (one atomic step; ``list_checkpoints`` ignores the new name), then delete. A kill during the delete
    leaves only a ``.del-…`` directory, which the next save removes."""
    aside = path.parent / f".del-{path.name}-p{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


_OWNED = re.compile(r"^\.(?:tmp|del)-step-\d+-p(\d+)-")


def _remove_dead_temporaries(root: Path) -> None:
    """Remove temporaries of saves and deletes whose process is gone — never another live process's
    (the pid is part of the name; names without one come from older versions and are stale)."""
    for path in list(root.glob(".tmp-step-*")) + list(root.glob(".del-step-*")):
        m = _OWNED.match(path.name + "-")
        if m and int(m.group(1)) != os.getpid() and pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _write(path: Path, write) -> None:
    write(str(path))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- find and load ----------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored).

    A crash between the two renames of a same-step re-save leaves the complete old copy as
    ``.old-step-N`` with no ``step-N``: it is renamed back here.
    """
    if not root.is_dir():
        return []
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if not final.exists() and (old / "trainer_state.json").is_file():
            os.replace(old, final)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    # A directory missing any file was half-deleted by an older lorakit (or by hand): not a checkpoint.
    return [p for _, p in sorted(found) if all((p / f).is_file() for f in FILES)]


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """The checkpoint directory ``--resume`` names: ``auto`` = the latest under ``output_dir/checkpoints``."""
    if resume == "auto":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise CheckpointError(f"--resume auto: no checkpoint under {output_dir / 'checkpoints'}; start without "
                                  "--resume, or pass the checkpoint directory.")
        return found[-1]
    path = Path(resume)
    if (path / "checkpoints").is_dir() and not (path / "trainer_state.json").exists():
        found = list_checkpoints(path / "checkpoints")  # an output_dir was given: take its latest
        if found:
            return found[-1]
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such directory; pass a checkpoint directory "
                              "(…/checkpoints/step-NNNNNN) or 'auto'.")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}; resume from an "
                              "older one (…/checkpoints/step-NNNNNN).")
    try:
        return Checkpoint(
            path=path,
            trainable=load_file(str(path / "trainable.safetensors"), device="cpu"),
            optimizer=_load_pt(path / "optimizer.pt"),
            schedule=json.loads((path / "schedule.json").read_text()),
            hooks=_load_pt(path / "hooks.pt"),
            rng=_load_pt(path / "rng.pt"),
            state=json.loads((path / "trainer_state.json").read_text()),
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); the checkpoint is damaged, "
                              "resume from an older one.") from None


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True) ({exc}); lorakit only reads "
                              "tensors and plain data from checkpoints.") from None


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """The settings that decide the data order and the parameters must match the checkpoint's."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path} belongs to a different run; these settings differ:\n  " + "\n  ".join(diffs)
                              + "\nResume with the original settings, or start a new run in another output_dir.")


# -- RNG ----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
