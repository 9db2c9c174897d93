"""Per-step logs: ``log.csv`` always, TensorBoard (``OUTPUT_DIR/tensorboard``) when it is installed.

The CSV has one row per optimizer step; its columns are the union of every key logged so far (a hook
may add keys later — the file is then rewritten with the wider header). On resume the loop passes
the checkpoint's history, so the file never holds steps the resumed run will redo.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .._fs import atomic_write_text


class StepLog:
    def __init__(self, output_dir: Path, history: list[dict[str, Any]] | None = None, tensorboard: bool = True):
        self.path = output_dir / "log.csv"
        self.rows: list[dict[str, Any]] = list(history or [])
        self.columns: list[str] = []
        for row in self.rows:
            self._widen(row)
        self._rewrite()
        self.tb = _tensorboard_writer(output_dir / "tensorboard") if tensorboard else None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._widen(row):
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, self.columns).writerow(row)
        if self.tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text entry (e.g. sample generations) in TensorBoard's text tab; nothing without TensorBoard."""
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()

    def _widen(self, row: dict[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns or ["step"])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


def _tensorboard_writer(path: Path):
    try:
        import tensorboard  # noqa: F401  (torch's writer needs the package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
