"""The end of a run: the ``metrics.json`` record, the printed summary and the loss-curve PNG."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import atomic_write, atomic_write_json


@dataclass(frozen=True)
class RunTiming:
    train_seconds: float  # the steps alone (evaluation and sampling inside the loop excluded)
    eval_seconds: float
    total_seconds: float


def run_metrics(*, args, loaded, model_name: str, out: Path, world: int, counts, data,
                steps: tuple[int, int, int, str | None], history: list[dict[str, Any]], timing: RunTiming,
                estimate, peak_mb: float | None, before: dict[str, Any], after: dict[str, Any], tasks,
                score_how: str | None, best: dict[str, Any] | None, artifact: Path,
                checkpoint: Path | None) -> dict[str, Any]:
    """What ``metrics.json`` records of a finished run (``train()`` returns it too).

    ``steps`` is (start, done, total, stop reason); ``before`` / ``after`` are the evaluations around
    training; s/step and tokens/s count only the steps this call ran (not those before a resume).
    """
    start, done, total, stopped = steps
    new_steps = [r for r in history if r["step"] > start]
    metrics = {
        "run": {"model": str(loaded.path), "model_name": model_name, "embedded": loaded.embedded,
                "task": loaded.task, "method": args.method, "output_dir": str(out), "world_size": world},
        "args": args.to_dict(),
        "parameters": {"trainable": counts.trainable, "total": counts.total, "percent": counts.percent},
        "data": {"train": data.train.counts(), "eval": data.eval.counts() if data.eval else None},
        "steps": {"done": done, "total": total, "start": start, "interrupted": False,
                  **({"stopped": stopped} if stopped else {})},
        "time": {
            "train_seconds": timing.train_seconds,
            "step_seconds": timing.train_seconds / max(1, len(new_steps)),
            "tokens_per_second": sum(r["targets"] for r in new_steps) / max(timing.train_seconds, 1e-9),
            "eval_seconds": timing.eval_seconds,
            "total_seconds": timing.total_seconds,
        },
        "memory": {"estimate": estimate.to_dict(), "peak_rss_mb": peak_mb,
                   "estimate_error": (estimate.total_mb - peak_mb) / peak_mb if peak_mb else None},
        "loss": loss_summary(history),
        "eval": {"before": before.get("eval"), "after": after.get("eval")},
        "tasks": {"before": before.get("tasks", {}), "after": after.get("tasks", {}), "new": tasks.new,
                  "base": tasks.base, "n": args.eval_rows},
        "score": {"before": before.get("score"), "after": after.get("score"), "how": score_how},
        "best": best,
        "artifact": str(artifact),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    probed = [r for r in history if "probe_kl" in r]
    if probed:  # the forgetting probe's last measurement (lorakit.train.probe)
        metrics["probe"] = {"step": probed[-1]["step"], "probe_kl": probed[-1]["probe_kl"],
                            "probe_agree": probed[-1]["probe_agree"], "rows": len(data.probe.examples)}
    return metrics


def loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [r["loss"] for r in history]
    if not losses:
        return {"first": None, "last": None, "min": None}
    tail = losses[-10:]
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "last10_mean": sum(tail) / len(tail)}


def summary_lines(m: dict[str, Any]) -> list[str]:
    run, params, steps, time_, mem = m["run"], m["parameters"], m["steps"], m["time"], m["memory"]
    lines = [f"model        {run['model_name']} · {run['task']} · method {run['method']}"]
    lines.append(f"parameters   {params['trainable']:,} trainable / {params['total']:,} total "
                 f"({params['percent']:.2f}%)")
    for split in ("train", "eval"):
        d = m["data"].get(split)
        if d:
            dropped = sum(d["dropped"].values())
            why = f" ({', '.join(f'{k}: {v}' for k, v in d['dropped'].items())})" if dropped else ""
            lines.append(f"{split + ' data':<12} {d['source']}: {d['rows']:,} rows → {d['examples']:,} "
                         f"{'packed sequences' if d['packed'] else 'examples'}; {d['truncated']} truncated, "
                         f"{dropped} dropped{why}")
    interrupted = " (interrupted)" if steps["interrupted"] else ""
    resumed = f", resumed at {steps['start']}" if steps["start"] else ""
    lines.append(f"steps        {steps['done']}/{steps['total']}{interrupted}{resumed} in "
                 f"{time_['train_seconds']:.1f} s · {time_['step_seconds']:.3f} s/step · "
                 f"{time_['tokens_per_second']:,.0f} target tokens/s")
    est = mem.get("estimate") or {}
    if est:
        err = mem.get("estimate_error")
        lines.append(f"memory       peak RSS {mem['peak_rss_mb']:,.0f} MB · estimated {est['total_mb']:,.0f} MB "
                     f"({'+' if err >= 0 else '−'}{abs(100 * err):.1f}%) · estimated time "
                     f"{est['total_seconds']:.0f} s")
    loss = m["loss"]
    if loss.get("first") is not None:
        lines.append(f"train loss   {loss['first']:.4f} → {loss['last']:.4f} (min {loss['min']:.4f})")
    ev = m["eval"]
    if ev.get("before") and ev.get("after"):
        b, a = ev["before"], ev["after"]
        ppl = (f" · perplexity {b['perplexity']:.3f} → {a['perplexity']:.3f}"
               if b.get("perplexity") is not None and a.get("perplexity") is not None else "")
        lines.append(f"eval         loss {b['loss']:.4f} → {a['loss']:.4f}{ppl} · accuracy "
                     f"{100 * b['accuracy']:.1f}% → {100 * a['accuracy']:.1f}%")
    tasks = m.get("tasks") or {}
    if tasks.get("after"):
        before, after = tasks["before"], tasks["after"]

        def fmt(names: list[str]) -> str:
            return " · ".join(f"{t} {100 * before.get(t, float('nan')):.1f}% → {100 * after[t]:.1f}%" for t in names)

        if tasks["new"]:
            lines.append(f"learning     {fmt(tasks['new'])}   (exact match, {tasks['n']} eval rows each)")
        if tasks["base"]:
            mb = sum(before.get(t, 0.0) for t in tasks["base"]) / len(tasks["base"])
            ma = sum(after[t] for t in tasks["base"]) / len(tasks["base"])
            lines.append(f"forgetting   {fmt(tasks['base'])} · mean {100 * mb:.1f}% → {100 * ma:.1f}%")
    probe = m.get("probe")
    if probe:  # the forgetting probe (chat models): drift from the base on self-written prompts it never trained on
        lines.append(f"forgetting   probe at step {probe['step']}: KL to the base {probe['probe_kl']:.4f} nats/token · "
                     f"token agreement {100 * probe['probe_agree']:.1f}%   ({probe['rows']} held-out self-written "
                     "prompts; base: 0 and 100%)")
    lines += _score_lines(m)
    lines.append(f"wrote        {m['artifact'] or '(no artifact)'} · metrics.json · loss.png · log.csv"
                 + (f" · checkpoint {m['checkpoint']}" if m.get("checkpoint") else ""))
    return lines


def _score_lines(m: dict[str, Any]) -> list[str]:
    """The generation score on the user's eval rows, the best evaluation, and why the run stopped early."""
    lines = []
    score = m.get("score") or {}
    if score.get("after"):
        b, a = score.get("before"), score["after"]
        first = f"{100 * b['score']:.1f}% → " if b else ""
        lines.append(f"score        {a['scorer']} {first}{100 * a['score']:.1f}%   ({score['how']})")
    best = m.get("best")
    if best:
        if best["step"] is None:
            lines.append(f"best         no evaluation gave a finite {best['metric']}")
        else:
            where = f" · saved in {best['dir']}" if best.get("dir") else ""
            lines.append(f"best         step {best['step']}: {best['metric']} {best['value']:.4f} "
                         f"({'higher' if best['greater_is_better'] else 'lower'} is better){where}")
    stopped = m["steps"].get("stopped")
    if stopped:
        lines.append(f"stopped      {stopped}")
    return lines


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(path, _finite(metrics))


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's smoothing slider does:
    ``m_t = w·m_{t-1} + (1-w)·x_t`` from ``m_0 = 0``, shown as ``m_t / (1 - w^t)``."""
    out, m = [], 0.0
    for t, x in enumerate(values, 1):
        m = weight * m + (1 - weight) * x
        out.append(m / (1 - weight ** t) if weight > 0 else x)
    return out


def smoothing_weight(n: int) -> float:
    """About a 20th of the run in the average's window (1/(1-w) steps); no smoothing under 20 steps."""
    return min(0.98, max(0.0, 1 - 20 / n)) if n else 0.0


def loss_figure(history: list[dict[str, Any]], title: str, eval_points: list[tuple[int, float]] = ()):
    """Raw training loss (thin, faint), its smoothed line over it, and eval losses as markers: eval is
    measured at a few steps only, so no line is drawn between them."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    rows = [r for r in history if r.get("loss") is not None]
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    weight = smoothing_weight(len(losses))
    raw = ax.plot(steps, losses, lw=0.8, alpha=0.35 if weight else 1.0, label="train loss")[0]
    if weight:
        ax.plot(steps, smooth(losses, weight), lw=1.8, color=raw.get_color(),
                label=f"train loss, smoothed (EMA {weight:.2f})")
    ev = sorted([(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None] + list(eval_points))
    if ev:
        ax.plot(*zip(*ev), "o", ms=6, color="C1", linestyle="none", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (task loss)")
    values = losses + [v for _, v in ev]
    if values and min(values) > 0 and max(values) / min(values) > 3:  # log only when it spans a range
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 0.5, 1, 2 — not 10^-0.3
    ax.set_title(title)
    ax.grid(alpha=0.3, which="major")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(history: list[dict[str, Any]], path: Path, title: str,
              eval_points: list[tuple[int, float]] = ()) -> None:
    """:func:`loss_figure` as a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    fig = loss_figure(history, title, eval_points)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
