"""``--overwrite``: remove every artifact of the previous run in an output directory, atomically.

Each artifact is first renamed into one ``.trash-<pid>`` directory (renames are atomic), then the
trash is deleted. A kill in between leaves the output directory either with the old artifact or
without it — never a half-deleted adapter that ``lorakit generate`` would still read — and the next
run removes the abandoned trash. Only names lorakit writes are touched; other files stay.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .._fs import output_error
from .lock import pid_alive

#: Everything a run writes into its output directory (methods' artifacts, logs, plots, variants' reports).
RUN_ARTIFACTS = ("checkpoints", "adapter", "model", "metrics.json", "log.csv", "loss.png", "tensorboard",
                 "mlruns", "wandb", "adalora_ranks.json", "adalora_ranks.png", "best", "samples.jsonl",
                 "generations.jsonl")


def clear_previous_run(out: Path) -> list[str]:
    """Move the previous run's artifacts aside, then delete them; returns the names removed."""
    remove_abandoned_trash(out)
    present = [name for name in RUN_ARTIFACTS if os.path.lexists(out / name)]
    if not present:
        return []
    trash = out / f".trash-{os.getpid()}"
    try:
        trash.mkdir(exist_ok=True)
        for name in present:
            os.replace(out / name, trash / name)
    except OSError as exc:
        raise output_error(exc, out) from None
    shutil.rmtree(trash, ignore_errors=True)
    return present


def remove_abandoned_trash(out: Path) -> None:
    for trash in out.glob(".trash-*"):
        pid = trash.name.removeprefix(".trash-")
        if not (pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))):
            shutil.rmtree(trash, ignore_errors=True)
