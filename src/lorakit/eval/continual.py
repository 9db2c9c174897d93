"""Continual learning: fine-tune on tasks one after the other and score every task after each one.

Each stage is an ordinary ``lorakit.train.train`` run; what carries from one stage to the next
depends on the method (the baselines of O-LoRA's §4, Wang et al. 2023):

    full        the previous stage's full checkpoint is the next stage's model       (SeqFT)
    lora        one LoRA adapter, trained further on each task (a hook loads the
                previous stage's weights into the fresh adapter before step 1)       (SeqLoRA)
    olora       the previous stage's exported adapter becomes the frozen past
                (``method_options.past``); a new pair trains under the
                orthogonality loss                                                   (O-LoRA)
    expand-N    LLaMA-Pro: expand once before the first task, then train only the
                new blocks on every task                                             (LLaMA-Pro)
    sdft-lora   SeqLoRA on data that the current model (base + the adapter so far)
                rewrote first                                                        (SDFT)

and :func:`run_multitask` trains one run on the union of the tasks (the usual upper bound).
``acc[i][j]`` is the accuracy on task j after stage i; kept tasks (what the base model knew) are
scored after every stage too.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tasks as registry
from .._fs import atomic_write, atomic_write_text
from ..errors import ConfigError
from ..hooks import BaseHook
from ..io import copy_weights, read_adapter_weights
from ..train.loop import train
from ..variants.expand import expansion_plan
from ..variants.sdft import write_rows
from .forgetting import (
    MethodSpec,
    RunSettings,
    _finite,
    average_accuracy,
    backward_transfer,
    distill_builtin,
    parse_method,
    relative_forgetting,
)


@dataclass
class SequenceResult:
    """Scores of one method over a task sequence (accuracies on a 0–1 scale)."""

    method: str
    tasks: list[str]  # the sequence, in training order
    keep: list[str]  # tasks the base model knew (forgetting)
    initial: dict[str, float]  # every task, before any training
    stages: list[dict[str, float]] = field(default_factory=list)  # every task, after each stage
    trainable_params: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def acc(self) -> list[list[float]]:
        """acc[i][j]: sequence task j after stage i (T × T for a sequential run)."""
        return [[s[t] for t in self.tasks] for s in self.stages]

    @property
    def average_accuracy(self) -> float:
        return sum(self.stages[-1][t] for t in self.tasks) / len(self.tasks)

    @property
    def backward_transfer(self) -> float | None:
        return backward_transfer(self.acc) if len(self.stages) == len(self.tasks) > 1 else None

    @property
    def keep_after(self) -> float:
        return sum(self.stages[-1][k] for k in self.keep) / len(self.keep) if self.keep else float("nan")

    @property
    def keep_relative_forgetting(self) -> float:
        return relative_forgetting(self.initial, self.stages[-1], self.keep)

    def as_dict(self) -> dict[str, Any]:
        aa = average_accuracy(self.acc) if len(self.stages) == len(self.tasks) else self.average_accuracy
        return {"method": self.method, "tasks": self.tasks, "keep": self.keep, "initial": self.initial,
                "stages": self.stages, "average_accuracy": aa, "backward_transfer": self.backward_transfer,
                "keep_after": self.keep_after, "keep_relative_forgetting_pct": self.keep_relative_forgetting,
                "trainable_params": self.trainable_params, "seconds": self.seconds, **self.extra}


class LoadAdapterHook(BaseHook):
    """Before step 1, copy a saved LoRA adapter's weights into the run's fresh adapter (SeqLoRA).

    Not again on a resumed run: the checkpoint already holds the trained weights (``applied`` is
    part of the hook's checkpointed state)."""

    def __init__(self, path: str | Path, adapter_name: str = "default"):
        self.path, self.adapter_name, self.applied = Path(path), adapter_name, False

    def on_train_start(self, ctx) -> None:
        if not self.applied:
            copy_weights(ctx.model, self.adapter_name, read_adapter_weights(self.path), source=str(self.path))
            self.applied = True

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = bool(state.get("applied", False))


def run_sequence(method: str | MethodSpec, tasks: Sequence[str], keep: Sequence[str], output_dir: str | Path,
                 settings: RunSettings, say=print) -> SequenceResult:
    """Train ``method`` on ``tasks`` in order; score all tasks (and ``keep``) after every stage."""

    spec = parse_method(method) if isinstance(method, str) else method
    if spec.method not in ("full", "lora", "loraplus", "olora", "expand"):
        raise ConfigError(f"method {spec.label!r} cannot run a sequence; use full, lora[-rN], olora[-rN], "
                          "expand[-N][-lora[-rN]] or sdft-lora[-rN].")
    if spec.distill and spec.method not in ("lora", "loraplus"):
        raise ConfigError(f"{spec.label!r}: sequences distil data for LoRA only (sdft-lora[-rN]).")
    if len(tasks) < 2:
        raise ConfigError(f"a sequence needs at least two tasks, got {list(tasks)}.")
    out = Path(output_dir)
    eval_tasks = [*tasks, *[k for k in keep if k not in tasks]]
    result = SequenceResult(spec.label, list(tasks), list(keep), {})
    model, prev_dir, t0 = settings.model, None, time.perf_counter()
    replaced = []
    for i, task in enumerate(tasks):
        stage_dir = out / f"stage-{i + 1}-{task}"
        data, hooks, options, stage_spec, stage_model = f"builtin:{task}", [], {}, spec, model
        if spec.method == "full" and prev_dir is not None:
            stage_model = str(prev_dir / "model")
        elif spec.method == "expand" and prev_dir is not None:
            # the model is already expanded: train the same new blocks again
            stage_model = str(prev_dir / "model")
            kept = {k: v for k, v in spec.options if k != "n_new"}
            stage_spec = dataclasses.replace(spec, options=tuple(sorted({**kept, "blocks": result.extra["new_blocks"]}.items())))
        elif spec.method == "olora" and prev_dir is not None:
            options = {"past": str(prev_dir / "adapter")}
        elif spec.method in ("lora", "loraplus") and prev_dir is not None:
            hooks = [LoadAdapterHook(prev_dir / "adapter")]
        if spec.distill:
            adapter = str(prev_dir / "adapter") if prev_dir is not None else None
            data, counts = distill_builtin(settings.model, adapter, task, stage_dir / "distilled.jsonl", settings)
            replaced.append(counts.replaced)
        args = settings.train_args(stage_spec, data, stage_dir, eval_tasks, model=stage_model, extra_options=options)
        say(f"[continual] {spec.label}: stage {i + 1}/{len(tasks)} — {task}")
        metrics = train(args, hooks=hooks).metrics
        if i == 0:
            result.initial = dict(metrics["tasks"]["before"])
            result.trainable_params = metrics["parameters"]["trainable"]
            if spec.method == "expand":
                result.extra["new_blocks"] = _new_blocks(stage_dir / "model", spec)
        result.stages.append(dict(metrics["tasks"]["after"]))
        say(f"[continual] {spec.label}: after {task}: "
            + " ".join(f"{t} {100 * result.stages[-1][t]:.0f}" for t in eval_tasks))
        prev_dir = stage_dir
    result.seconds = time.perf_counter() - t0
    if replaced:
        result.extra["sdft_replaced"] = replaced
        result.extra["sdft_rows"] = settings.builtin_rows
    return result


def _new_blocks(model_dir: Path, spec: MethodSpec) -> list[int]:

    n_layers = json.loads((model_dir / "config.json").read_text())
    n = n_layers.get("num_hidden_layers", n_layers.get("n_layer"))
    n_new = int(dict(spec.options).get("n_new", 1))
    plan = expansion_plan(n - n_new, n_new)
    return [i for i, (_, is_copy) in enumerate(plan) if is_copy]


def run_multitask(method: str | MethodSpec, tasks: Sequence[str], keep: Sequence[str], output_dir: str | Path,
                  settings: RunSettings, say=print) -> SequenceResult:
    """One run on all ``tasks`` mixed (``builtin_rows`` rows of each, shuffled), for as many steps as
    the whole sequence gets (len(tasks) × steps)."""

    spec = parse_method(method) if isinstance(method, str) else method
    out = Path(output_dir)
    rows = [r for t in tasks for r in registry.get(t).examples(settings.builtin_rows, seed=settings.seed)]
    random.Random(settings.seed).shuffle(rows)
    data = write_rows(out / "multitask.jsonl", rows)
    eval_tasks = [*tasks, *[k for k in keep if k not in tasks]]
    say(f"[continual] multi-task {spec.label}: {len(rows)} rows of {', '.join(tasks)}")
    t0 = time.perf_counter()
    args = settings.train_args(spec, str(data), out / "run", eval_tasks, steps=settings.steps * len(tasks))
    metrics = train(args).metrics
    result = SequenceResult(f"multi-task {spec.label}", list(tasks), list(keep), dict(metrics["tasks"]["before"]),
                            [dict(metrics["tasks"]["after"])], metrics["parameters"]["trainable"])
    result.seconds = time.perf_counter() - t0
    return result


# -- the report ----------------------------------------------------------------------------------------
def summary_table(results: Sequence[SequenceResult]) -> str:
    """Markdown: average accuracy, BWT, kept-task accuracy and relative forgetting per method."""
    if not results:
        return ""
    keep = results[0].keep
    head = ["method", "trainable params", "avg accuracy (%)", "BWT (pts)",
            "base tasks before → after (%)", "relative FG on base tasks (%)", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        bwt = r.backward_transfer
        before = sum(r.initial[k] for k in keep) / len(keep) if keep else float("nan")
        lines.append("| " + " | ".join([
            r.method, f"{r.trainable_params:,}", f"{100 * r.average_accuracy:.1f}",
            "–" if bwt is None else f"{100 * bwt:+.1f}", f"{100 * before:.1f} → {100 * r.keep_after:.1f}",
            f"{r.keep_relative_forgetting:.1f}", f"{r.seconds / 60:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def matrix_table(result: SequenceResult) -> str:
    """Markdown: every task's accuracy before training and after each stage."""
    cols = [*result.tasks, *result.keep]
    lines = ["| after | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines.append("| (start) | " + " | ".join(f"{100 * result.initial[c]:.0f}" for c in cols) + " |")
    names = result.tasks if len(result.stages) == len(result.tasks) else ["all tasks"]
    for name, stage in zip(names, result.stages):
        lines.append(f"| {name} | " + " | ".join(f"{100 * stage[c]:.0f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[SequenceResult], path: str | Path) -> None:

    atomic_write_text(Path(path), json.dumps([_finite(r.as_dict()) for r in results], indent=2) + "\n")


def plot_study(results: Sequence[SequenceResult], path: Path, title: str) -> None:
    """Two panels over the stages: mean accuracy on the sequence tasks learned so far (left) and on
    the kept base tasks (right); a multi-task run is one marker at the last stage."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure


    fig = Figure(figsize=(10, 4.2), dpi=110)
    seen_ax, keep_ax = fig.subplots(1, 2)
    for n, r in enumerate(results):
        style = dict(color=f"C{n}", label=r.method)
        t = len(r.tasks)
        stages = range(1, t + 1) if len(r.stages) == t else [t]
        seen = [100 * sum(st[x] for x in r.tasks[:i]) / i for i, st in zip(stages, r.stages)]
        keep = [100 * sum(st[k] for k in r.keep) / len(r.keep) for st in r.stages] if r.keep else []
        start = 100 * sum(r.initial[k] for k in r.keep) / len(r.keep) if r.keep else None
        if len(r.stages) == t:
            seen_ax.plot(list(stages), seen, "o-", **style)
            if keep:
                keep_ax.plot([0, *stages], [start, *keep], "o-", **style)
        else:
            seen_ax.plot(list(stages), seen, "*", ms=12, **style)
            if keep:
                keep_ax.plot(list(stages), keep, "*", ms=12, **style)
    names = results[0].tasks if results else []
    for ax, ylabel in ((seen_ax, "mean accuracy on the tasks learned so far (%)"),
                       (keep_ax, "mean accuracy on the base tasks (%)")):
        ax.set_xticks(range(0, len(names) + 1), ["start", *[f"+{x}" for x in names]])
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    seen_ax.set_xlim(0.5, len(names) + 0.5)
    keep_ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
