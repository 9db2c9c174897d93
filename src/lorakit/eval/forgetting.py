"""Learning vs forgetting: how much a fine-tune teaches, and what it costs on the tasks it should keep.

Biderman et al. 2024 (arXiv 2405.09673, "LoRA Learns Less and Forgets Less") plot, for each
fine-tuning method, the gain on the target domain against the loss on the source domain; this module
computes those numbers for lorakit's built-in tasks (or any scorer) and draws the same picture.

For one fine-tune with scores before (R_o) and after (R_f), all in [0, 1]:

* learning      = R_f(target) − R_o(target)                        (points of accuracy gained)
* forgetting    = mean_k [R_o(k) − R_f(k)] over the kept tasks k   (points lost; < 0 = improved)
* relative FG   = mean_k [R_o(k) − R_f(k)] / R_o(k) × 100          (Luo et al. 2023, arXiv 2308.08747,
  §3: the drop relative to the initial performance, in percent; kept tasks with R_o(k) = 0 are
  left out since nothing can be lost there)

For a sequence of T tasks with ``acc[i][j]`` = accuracy on task j after training on task i:

* average accuracy  AA  = mean_j acc[T−1][j]                        (the metric of O-LoRA's Table 1)
* backward transfer BWT = mean_{j<T−1} (acc[T−1][j] − acc[j][j])     (Lopez-Paz & Ranzato 2017;
  negative = forgetting of earlier tasks of the sequence)

:func:`measure_forgetting` runs the fine-tunes (``lorakit forgetting``); the pure functions below are
what it reports, and are reused by the continual-learning runner (``continual.py``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tasks as task_registry
from .._fs import atomic_write, atomic_write_json, atomic_write_text
from ..errors import ConfigError, OutputError
from ..tasks import embedded_manifest
from ..train.args import TrainArgs
from ..train.inference import load_for_inference
from ..train.loop import train as run_training
from ..train.methods import check_options as check_method_options
from ..train.model import model_dir
from ..variants.expand import expansion_plan
from ..variants.sdft import counts_path, distill_rows, hf_generator, write_rows

# -- the metrics ------------------------------------------------------------------------------------


def drops(before: Mapping[str, float], after: Mapping[str, float], keep: Sequence[str]) -> dict[str, float]:
    """R_o(k) − R_f(k) for each kept task k (positive = forgotten)."""
    missing = [k for k in keep if k not in before or k not in after]
    if missing:
        raise ConfigError(f"no before/after score for kept task(s) {missing}; score every kept task twice.")
    return {k: before[k] - after[k] for k in keep}


def mean_forgetting(before: Mapping[str, float], after: Mapping[str, float], keep: Sequence[str]) -> float:
    """Mean absolute drop over the kept tasks (accuracy points, 0–1 scale)."""
    d = drops(before, after, keep)
    return sum(d.values()) / len(d) if d else 0.0


def relative_forgetting(before: Mapping[str, float], after: Mapping[str, float], keep: Sequence[str]) -> float:
    """Luo et al.'s FG: mean over kept tasks of (R_o − R_f) / R_o, in percent; NaN if every R_o is 0."""
    d = drops(before, after, keep)
    rel = [d[k] / before[k] for k in keep if before[k] > 0]
    return 100.0 * sum(rel) / len(rel) if rel else math.nan


def average_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """AA: mean accuracy over all T tasks after the last one (``acc[T−1]``)."""
    _check_square(acc)
    return sum(acc[-1]) / len(acc[-1])


def backward_transfer(acc: Sequence[Sequence[float]]) -> float:
    """BWT: mean over the first T−1 tasks of (final accuracy − accuracy right after learning it)."""
    _check_square(acc)
    t = len(acc)
    if t < 2:
        return 0.0
    return sum(acc[-1][j] - acc[j][j] for j in range(t - 1)) / (t - 1)


def _check_square(acc: Sequence[Sequence[float]]) -> None:
    if not acc or any(len(row) != len(acc) for row in acc):
        raise ConfigError("acc must be a T×T matrix: acc[i][j] = accuracy on task j after training task i.")


# -- one fine-tune's report row ---------------------------------------------------------------------
@dataclass
class ForgettingRow:
    """Learning and forgetting of one method (accuracies on a 0–1 scale)."""

    method: str
    target: str
    before: dict[str, float]
    after: dict[str, float]
    keep: list[str]
    trainable_params: int = 0
    seconds: float = 0.0
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def learning(self) -> float:
        return self.after[self.target] - self.before[self.target]

    @property
    def forgetting(self) -> float:
        return mean_forgetting(self.before, self.after, self.keep)

    @property
    def relative_forgetting(self) -> float:
        return relative_forgetting(self.before, self.after, self.keep)

    def as_dict(self) -> dict:
        return {
            "method": self.method, "target": self.target, "trainable_params": self.trainable_params,
            "target_before": self.before[self.target], "target_after": self.after[self.target],
            "learning": self.learning, "forgetting": self.forgetting,
            "relative_forgetting_pct": self.relative_forgetting,
            **{f"keep_{k}_before": self.before[k] for k in self.keep},
            **{f"keep_{k}_after": self.after[k] for k in self.keep},
            "seconds": self.seconds, **self.extra,
        }


# -- which fine-tunes: method specs ----------------------------------------------------------------
SPEC_HELP = (
    "full | lora[-rN] | loraplus[-rN] | olora[-rN] | expand[-N][-lora[-rN]] (LLaMA-Pro, N new blocks) | "
    "sdft-<one of those> (train on self-distilled data), e.g. full,lora-r4,lora-r16,expand-2,sdft-lora-r8"
)
_ADAPTER_METHODS = ("lora", "loraplus", "olora")


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning recipe of the harness, parsed from a short label such as ``lora-r16``."""

    label: str
    method: str  # a lorakit.train method: full, lora, loraplus, olora, expand
    r: int = 8
    options: tuple[tuple[str, Any], ...] = ()  # method_options
    distill: bool = False  # SDFT: rewrite the training responses with the model first

    @property
    def dense(self) -> bool:
        """True for full fine-tuning, which gets its own (smaller) learning rate. LLaMA-Pro's new
        blocks train fully too, but like a LoRA adapter they start from a zero update and are a small
        part of the network, so they share the adapters' learning rate."""
        return self.method == "full"


def parse_method(label: str) -> MethodSpec:
    """``"lora-r16"`` → MethodSpec(method="lora", r=16); see :data:`SPEC_HELP` for the forms."""
    if not isinstance(label, str):
        raise ConfigError(f"method {label!r}: a method label is a string; use {SPEC_HELP}.")
    tokens = label.strip().lower().split("-")
    distill = tokens[0] == "sdft"
    if distill:
        tokens = tokens[1:] or ["lora"]
    name, rest = tokens[0], tokens[1:]
    options: dict[str, Any] = {}

    def rank(tok: list[str]) -> tuple[int, list[str]]:
        if tok and re.fullmatch(r"r\d+", tok[0]) and int(tok[0][1:]) > 0:
            return int(tok[0][1:]), tok[1:]
        return 8, tok

    if name == "full":
        r = 8
    elif name in _ADAPTER_METHODS:
        r, rest = rank(rest)
    elif name == "expand":
        if rest and rest[0].isdigit():
            options["n_new"], rest = int(rest[0]), rest[1:]
        options.setdefault("n_new", 1)
        r = 8
        if rest and rest[0] == "lora":
            options["lora"] = True
            r, rest = rank(rest[1:])
    else:
        rest = ["?"]
    if rest:
        raise ConfigError(f"method {label!r} is not understood; use {SPEC_HELP}.")
    return MethodSpec(label.strip(), name, r, tuple(sorted(options.items())), distill)


def parse_methods(labels: str | Sequence[str]) -> list[MethodSpec]:
    if not isinstance(labels, (str, list, tuple)):
        raise ConfigError(f"methods={labels!r:.60}: give comma-separated labels or a list, e.g. 'full,lora-r4'.")
    items = [s for s in (labels.split(",") if isinstance(labels, str) else labels) if not isinstance(s, str) or s.strip()]
    if not items:
        raise ConfigError(f"no methods given; pass e.g. --methods full,lora-r4,lora-r16 ({SPEC_HELP}).")
    specs = [parse_method(s) for s in items]
    dup = sorted({s.label for s in specs if [t.label for t in specs].count(s.label) > 1})
    if dup:
        raise ConfigError(f"method(s) {dup} given twice; list each once.")
    return specs


@dataclass
class RunSettings:
    """Training settings shared by every method of a comparison (``TrainArgs`` fields)."""

    model: str | None = None  # None = the embedded tiny-base
    steps: int = 300
    lr: float = 3e-3  # adapters and LLaMA-Pro's new blocks
    full_lr: float = 1e-3  # full fine-tuning
    batch_size: int = 32
    warmup_steps: int = 20
    schedule: str = "cosine"
    builtin_rows: int = 2000
    eval_rows: int = 200
    seed: int = 0
    threads: int | None = None
    target_modules: str | list[str] = "all-linear"
    method_options: dict[str, Any] = field(default_factory=dict)  # merged into every adapter method's options
    progress: bool = False

    def train_args(self, spec: MethodSpec, data: str, output_dir: Path, eval_tasks: list[str], model: str | None = None,
                   steps: int | None = None, extra_options: Mapping[str, Any] | None = None):
        options = dict(spec.options)
        if spec.method in ("olora",):
            options.update(self.method_options)
        options.update(extra_options or {})
        return TrainArgs(
            model=model if model is not None else self.model, data=data, output_dir=str(output_dir),
            method=spec.method, method_options=options, r=spec.r, lora_alpha=2.0 * spec.r,
            target_modules=self.target_modules, lr=self.full_lr if spec.dense else self.lr,
            max_steps=steps or self.steps, batch_size=self.batch_size, warmup_steps=self.warmup_steps,
            schedule=self.schedule, builtin_rows=self.builtin_rows, eval_rows=self.eval_rows, seed=self.seed,
            threads=self.threads, eval_tasks=eval_tasks, overwrite=True, progress=self.progress,
        )


# -- the harness ------------------------------------------------------------------------------------
@dataclass
class ForgettingReport:
    rows: list[ForgettingRow]
    files: dict[str, Path]

    def table(self) -> str:
        return markdown_table(self.rows)


def measure_forgetting(train: str, keep: Sequence[str] | None = None,
                       methods: str | Sequence[str] = ("full", "lora-r4", "lora-r16"),
                       output_dir: str | Path = "runs/forgetting", settings: RunSettings | None = None,
                       say=print) -> ForgettingReport:
    """Fine-tune on built-in task ``train`` once per method; report learning and forgetting.

    ``keep`` are the built-in tasks the model should not forget (default: the model's base tasks, from
    its ``lorakit_tasks.json``). Writes ``forgetting.md``, ``forgetting.csv``, ``forgetting.json`` and
    ``pareto.png`` into ``output_dir``; each method's run lives in ``output_dir/runs/<method>``.
    """

    settings = settings or RunSettings()
    if not isinstance(settings, RunSettings):
        raise ConfigError(f"settings must be a lorakit.eval.forgetting.RunSettings, got {type(settings).__name__}.")
    if isinstance(keep, str):  # "copy,rev" (the flag's form), not its characters
        keep = [k.strip() for k in keep.split(",") if k.strip()]
    specs = parse_methods(methods)
    task_registry.get(train)  # ConfigError on a typo, before any training
    keep = list(keep) if keep is not None else default_keep(settings.model, exclude=train)
    for k in keep:
        task_registry.get(k)
    if train in keep:
        raise ConfigError(f"task {train!r} is both the training task and a kept task; drop it from --keep.")
    if not keep:
        raise ConfigError("no kept tasks: pass --keep TASK_A,TASK_B (built-in tasks the model already knows).")
    if isinstance(settings.eval_rows, bool) or not isinstance(settings.eval_rows, int) or settings.eval_rows < 1:
        raise ConfigError(f"eval_rows={settings.eval_rows!r}: learning and forgetting are scored on eval rows; "
                          "give --eval-rows 1 or more (default 200).")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file; pass a directory (it is created if missing).")
    check_expansions(specs, settings.model)
    for spec in specs:  # every run's settings are checked (TrainArgs, method_options) before the first one trains
        check_method_options(settings.train_args(spec, f"builtin:{train}", out / "runs" / spec.label, [train, *keep]))
    rows = []
    for spec in specs:
        run_dir = out / "runs" / spec.label
        data, extra = f"builtin:{train}", {}
        if spec.distill:
            data, counts = distill_builtin(settings.model, None, train, run_dir / "distilled.jsonl", settings)
            extra = {"sdft_replaced": counts.replaced, "sdft_kept": counts.kept}
        say(f"[forgetting] {spec.label}: training on {train} ({settings.steps} steps)")
        t0 = time.perf_counter()
        result = run_training(settings.train_args(spec, data, run_dir, [train, *keep]))
        tasks = result.metrics["tasks"]
        rows.append(ForgettingRow(spec.label, train, dict(tasks["before"]), dict(tasks["after"]), keep,
                                  result.metrics["parameters"]["trainable"], time.perf_counter() - t0, extra))
        say(f"[forgetting] {spec.label}: learning {100 * rows[-1].learning:+.1f} pts, "
            f"forgetting {100 * rows[-1].forgetting:+.1f} pts")
    files = write_report(rows, out, title=f"Learning {train} vs forgetting {', '.join(keep)}")
    return ForgettingReport(rows, files)


def check_expansions(specs: Sequence[MethodSpec], model: str | None) -> None:
    """Refuse an ``expand-N`` whose N does not split the model's blocks into equal groups now, from the
    model's config.json, instead of after the earlier methods have trained and the model is loaded."""
    n_blocks = None
    for spec in specs:
        n_new = dict(spec.options).get("n_new")
        if spec.method != "expand" or n_new is None:
            continue
        if n_blocks is None:
            n_blocks = _block_count(model)
        if n_blocks is None:  # no config.json (e.g. a GGUF file): the expansion itself checks
            return
        try:
            expansion_plan(n_blocks, n_new)
        except ConfigError as exc:
            raise ConfigError(f"--methods {spec.label!r}: {exc}") from None


def _block_count(model: str | None) -> int | None:
    """The decoder block count from the model directory's config.json, or None when it does not say."""
    path, _ = model_dir(model)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = config.get(key) if isinstance(config, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def default_keep(model: str | None, exclude: str | None = None) -> list[str]:
    """The model's base tasks (``lorakit_tasks.json``), or [] for a model without a manifest."""

    path, _ = model_dir(model)
    if not (path / "lorakit_tasks.json").is_file():
        return []
    return [t for t in embedded_manifest(path).get("base_tasks", []) if t != exclude]


def distill_builtin(model: str | None, adapter: str | None, task: str, out: Path, settings: RunSettings):
    """SDFT's data step for a built-in task: the same rows ``builtin:TASK`` would train on, each
    response rewritten by the model (base + ``adapter``) when the rewrite passes the task's check."""

    net, tokenizer, _ = load_for_inference(model, adapter)
    rows = task_registry.get(task).examples(settings.builtin_rows, seed=settings.seed, split="train")
    new, counts = distill_rows(rows, hf_generator(net, tokenizer, max_new_tokens=24), "embedded", batch_size=250)
    write_rows(out, new)
    atomic_write_json(counts_path(out), {"replaced": counts.replaced, "kept": counts.kept,
                                         "failed_check": counts.failed_check,
                                         "rejected_reference": counts.rejected_reference, "empty": counts.empty})
    return str(out), counts


# -- the report -------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def markdown_table(rows: Sequence[ForgettingRow]) -> str:
    keep = rows[0].keep if rows else []
    head = (["method", "trainable params", f"{rows[0].target} before → after" if rows else "target",
             "learning (pts)", "forgetting (pts)", "relative FG (%)"] + [f"{k} after" for k in keep])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fg = r.relative_forgetting
        cells = [r.method, f"{r.trainable_params:,}",
                 f"{100 * r.before[r.target]:.1f} → {100 * r.after[r.target]:.1f}",
                 _pct(r.learning), _pct(r.forgetting), "–" if math.isnan(fg) else f"{fg:.1f}"]
        cells += [f"{100 * r.after[k]:.1f}" for k in keep]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: Sequence[ForgettingRow], out: Path, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    dicts = [r.as_dict() for r in rows]
    files = {"markdown": out / "forgetting.md", "csv": out / "forgetting.csv", "json": out / "forgetting.json",
             "plot": out / "pareto.png"}
    atomic_write_text(files["markdown"], f"# {title}\n\n" + markdown_table(rows)
                      + "\nAccuracies are exact-match %, differences in points; forgetting = mean drop over the "
                        "kept tasks, relative FG = mean of drop / accuracy before (Luo et al. 2023).\n")
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(dicts)
    atomic_write_text(files["csv"], buf.getvalue())
    atomic_write_text(files["json"], json.dumps([_finite(d) for d in dicts], indent=2) + "\n")
    plot_pareto([(r.method, r.forgetting, r.learning) for r in rows], files["plot"], title,
                xlabel="forgetting: mean drop on kept tasks (pts)", ylabel="learning: target-task gain (pts)")
    return files


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Labels of the points no other point beats on both axes (less forgetting x, more learning y)."""
    front = []
    for name, x, y in points:
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, x2, y2 in points):
            front.append(name)
    return front


def plot_pareto(points: Sequence[tuple[str, float, float]], path: Path, title: str, xlabel: str,
                ylabel: str) -> None:
    """Scatter (x = forgetting, y = learning, both in points) with the Pareto front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=110)
    ax = fig.add_subplot()
    front = set(pareto_front(points))
    for name, x, y in points:
        ax.scatter(100 * x, 100 * y, s=40, color="C3" if name in front else "C0", zorder=3)
        ax.annotate(name, (100 * x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fp = sorted((100 * x, 100 * y) for name, x, y in points if name in front)
    if len(fp) > 1:
        ax.step([p[0] for p in fp], [p[1] for p in fp], where="post", color="C3", lw=1, alpha=0.6,
                label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
