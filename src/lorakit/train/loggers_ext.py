"""Experiment trackers users already have: MLflow and Weights & Biases, through their own libraries.

``report_to`` (``TrainArgs``) names the loggers of a run: ``csv`` (``log.csv``, always written — it is
the run's own record), ``tensorboard`` (``OUTPUT_DIR/tensorboard``), ``mlflow`` and ``wandb``. Left
unset it means CSV plus TensorBoard when installed. A logger named explicitly must be installed: a
missing library is a ``ConfigError`` naming the pip command, raised before the model is loaded.

* **MLflow** logs to ``$MLFLOW_TRACKING_URI`` when set, else to a local file store
  ``OUTPUT_DIR/mlruns`` (read it with ``mlflow ui --backend-store-uri OUTPUT_DIR/mlruns`` or
  ``MlflowClient(tracking_uri=...)``). MLflow 3 keeps the file store in maintenance mode behind the
  opt-in ``MLFLOW_ALLOW_FILE_STORE=true``; lorakit sets it for the run's duration only (restored at
  close) and only when it chose the file store itself. Experiment: ``$MLFLOW_EXPERIMENT_NAME`` or
  ``lorakit``; run name: the output directory's name.
* **W&B** runs in ``$WANDB_MODE`` (default ``offline``: lorakit never goes online unless asked), under
  ``OUTPUT_DIR/wandb``; project ``$WANDB_PROJECT`` or ``lorakit``. ``wandb sync OUTPUT_DIR/wandb/offline-run-*``
  uploads it later.

Both get the same things: the run's settings (every ``TrainArgs`` field) as parameters / config, every
step's numeric log row (``loss lr grad_norm targets seconds`` and what hooks add) at its step, the
evaluations before (step 0) and after training (the last step), and a flat summary of ``metrics.json``.
A run that raises is closed as failed (MLflow status ``FAILED``, W&B exit code 1), an interrupted one as
killed; a finished one as finished.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError

#: logger name → (module to import, pip command that installs it)
LOGGERS: dict[str, tuple[str | None, str]] = {
    "csv": (None, ""),
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny"),
    "wandb": ("wandb", "pip install wandb"),
}
DEFAULT = ("csv", "tensorboard")  # report_to unset: TensorBoard only when installed


def check_report_to(names: list[str] | None) -> None:
    """Unknown names and explicitly requested but missing libraries are ``ConfigError``s."""
    for name in names or []:
        if name not in LOGGERS:
            raise ConfigError(f"report_to={name!r}: unknown logger; choose from {', '.join(LOGGERS)} "
                              "(comma-separated, e.g. report_to=csv,mlflow).")
        module, pip = LOGGERS[name]
        if module is not None and not _installed(module):
            raise ConfigError(f"report_to={name}: the {module!r} package is not installed; install it with "
                              f"`{pip}`, or drop {name} from report_to.")


def tensorboard_wanted(names: list[str] | None) -> bool:
    return names is None or "tensorboard" in names


def open_trackers(names: list[str] | None, output_dir: Path, params: dict[str, Any]) -> list[Any]:
    """The MLflow / W&B runs ``names`` asks for, started with ``params`` logged."""
    trackers: list[Any] = []
    try:
        for name in names or []:
            if name == "mlflow":
                trackers.append(MlflowTracker(output_dir, params))
            elif name == "wandb":
                trackers.append(WandbTracker(output_dir, params))
    except BaseException:
        close_trackers(trackers, "failed")
        raise
    return trackers


def log_all(trackers: list[Any], values: dict[str, float], step: int) -> None:
    for tracker in trackers:
        tracker.log(values, step)


def close_trackers(trackers: list[Any], status: str) -> None:
    """``status``: finished, failed or killed. Every tracker is closed even if one fails to; a failure to
    close is raised after a finished run, and only warned about after a failed one (whose own error is
    the one to see)."""
    errors = []
    for tracker in trackers:
        try:
            tracker.close(status)
        except Exception as exc:  # noqa: BLE001 — re-raised or warned about below, after closing the others
            errors.append(exc)
    trackers.clear()
    if errors and status == "finished":
        raise OutputError(f"the run finished and its output is saved, but an experiment tracker run could not be "
                          f"closed ({type(errors[0]).__name__}: {errors[0]}); check the tracker's store (report_to) "
                          "— MLflow's tracking URI or W&B's directory — is writable.") from errors[0]
    for exc in errors:
        warnings.warn(f"could not close an experiment tracker run: {exc}", stacklevel=2)


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"method_options": {"init_r": 12}}`` → ``{"method_options.init_r": "12"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = str(value)
    return out


def flat_numbers(d: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested dict, under dotted names (bools and strings left out)."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for key, value in d.items():
            out.update(flat_numbers(value, f"{prefix}{key}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d):
        out[prefix.rstrip(".")] = float(d)
    return out


def step_numbers(row: dict[str, Any]) -> dict[str, float]:
    """A log row's numeric values, without ``step`` itself."""
    return {k: v for k, v in flat_numbers(row).items() if k != "step"}


def summary_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """What goes into the trackers' summary: the numeric parts of ``metrics.json`` that describe the run."""
    keep = {k: metrics.get(k) for k in ("parameters", "steps", "time", "memory", "loss", "eval", "tasks")}
    keep["memory"] = {"peak_rss_mb": (metrics.get("memory") or {}).get("peak_rss_mb")}
    keep["tasks"] = {k: (metrics.get("tasks") or {}).get(k) for k in ("before", "after")}
    return flat_numbers(keep)


def eval_numbers(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """``{"eval": {"loss", "perplexity", "accuracy"}, "tasks": {name: acc}}`` → ``eval_loss``, ``task_NAME``…"""
    evaluation = evaluation or {}
    out = {f"eval_{k}": v for k, v in flat_numbers(evaluation.get("eval") or {}).items() if k != "targets"}
    out.update({f"task_{k}": v for k, v in flat_numbers(evaluation.get("tasks") or {}).items()})
    return out


class MlflowTracker:
    def __init__(self, output_dir: Path, params: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._env_before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # restored in close()
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorakit"
            experiment = self.client.get_experiment_by_name(name)
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=output_dir.resolve().name).info.run_id
            items = [Param(k, v[:6000]) for k, v in flat_params(params).items()]
            for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except BaseException:
            self._restore_env()
            raise

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not values:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, values: dict[str, float], step: int, metrics_file: Path | None) -> None:
        self.log({f"summary.{k}": v for k, v in values.items()}, step)
        if metrics_file is not None and metrics_file.exists():
            self.client.log_artifact(self.run_id, str(metrics_file))

    def close(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED",
                                                     "killed": "KILLED"}[status])
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        if self._env_before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = self._env_before


class WandbTracker:
    def __init__(self, output_dir: Path, params: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "lorakit", name=output_dir.resolve().name,
            dir=str(output_dir.resolve()), mode=os.environ.get("WANDB_MODE") or "offline", config=params,
            reinit="create_new", settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def summary(self, values: dict[str, float], step: int, metrics_file: Path | None) -> None:
        self.run.summary.update({f"summary.{k}": v for k, v in values.items()})

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 130}[status])


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or None entry in sys.modules
        return False
