"""Early stopping and the best checkpoint, following one eval metric (``metric_for_best``).

Every ``eval_every`` steps the loop hands the metric to :meth:`EarlyStopping.observe`:

* it improves when it is strictly better than the best so far (lower ``eval_loss``, higher
  ``eval_score``; a NaN never improves). With ``save_best`` the loop then writes the method's artifact
  (a PEFT adapter, or ``model/`` for full fine-tuning) to ``output_dir/best/`` atomically
  (``_fs.atomic_dir``: readers see the previous best or the new one), with ``lorakit_best.json``
  saying which step and value it is.
* ``early_stopping_patience=K``: after K evaluations in a row without improvement the run stops
  after that step — checkpoint, artifact (the *last* step's, in ``adapter/``) and the final scores as
  usual — and ``metrics.json`` / the summary say which step was best and why training stopped.

Only evaluations during training count (the score before training is the base model's). The state
needs no checkpoint file of its own: on resume it is rebuilt from the logged history (:meth:`replay`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import atomic_dir, atomic_write_json
from ..errors import ConfigError

#: metric → greater is better
METRICS = {"eval_loss": False, "eval_score": True}
BEST_DIR = "best"
BEST_FILE = "lorakit_best.json"


def check_best_args(patience: int, metric: str, save_best: bool, eval_every: int) -> None:
    """The settings agree with each other (``TrainArgs`` calls this on construction)."""
    if metric not in METRICS:
        raise ConfigError(f"metric_for_best={metric!r}: use {' or '.join(METRICS)}.")
    for name, on in (("early_stopping_patience", bool(patience)), ("save_best", bool(save_best))):
        if on and not eval_every:
            raise ConfigError(f"{name} needs evaluations during training: set eval_every=N (e.g. 50) and give eval "
                              "data (eval_data or eval_split).")


@dataclass
class EarlyStopping:
    metric: str = "eval_loss"
    patience: int = 0  # 0: never stop, only track the best
    best_value: float | None = None
    best_step: int | None = None
    since_best: int = 0  # evaluations since the last improvement
    evaluations: int = 0
    stop_reason: str | None = None

    @property
    def greater_is_better(self) -> bool:
        return METRICS[self.metric]

    def observe(self, step: int, value: float | None, final: bool = False) -> bool:
        """Record the metric of the evaluation after ``step``; True when it is the best so far. The
        ``final`` evaluation (after the last step, when that step had none) may be the best, and stops nothing."""
        self.evaluations += 1
        better = value is not None and math.isfinite(value) and (
            self.best_value is None
            or (value > self.best_value if self.greater_is_better else value < self.best_value))
        if better:
            self.best_value, self.best_step, self.since_best = float(value), step, 0
            return True
        if final:
            return False
        self.since_best += 1
        if self.patience and self.since_best >= self.patience and self.stop_reason is None:
            best = f"{self.best_value:.4f} at step {self.best_step}" if self.best_step is not None else "none finite"
            self.stop_reason = (f"early stopping at step {step}: {self.metric} did not improve for {self.since_best} "
                                f"evaluation{'s' if self.since_best > 1 else ''} (early_stopping_patience="
                                f"{self.patience}); best {best}.")
        return False

    def replay(self, history: list[dict[str, Any]]) -> None:
        """Rebuild the state from a resumed run's logged rows."""
        for row in history:
            if self.metric in row:
                self.observe(int(row["step"]), row[self.metric])
        self.stop_reason = None  # the resumed run goes on; only new evaluations may stop it

    def summary(self, best_dir: Path | None) -> dict[str, Any]:
        return {"metric": self.metric, "greater_is_better": self.greater_is_better, "step": self.best_step,
                "value": self.best_value, "evaluations": self.evaluations, "patience": self.patience,
                "stopped_early": self.stop_reason is not None, "reason": self.stop_reason,
                "dir": str(best_dir) if best_dir is not None and self.best_step is not None else None}


def write_best(path: Path, fill: Callable[[Path], None], step: int, metric: str, value: float) -> None:
    """``fill(tmp)`` writes the artifact into a temporary directory that replaces ``path`` whole."""
    with atomic_dir(path) as tmp:
        fill(tmp)
        atomic_write_json(tmp / BEST_FILE, {"step": step, "metric": metric, "value": value})
