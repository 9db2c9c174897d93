"""The study's results page: the table (mean over seeds, ± half the range), the Pareto plot, the verdict."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from ..._fs import atomic_write, atomic_write_text

COLUMNS = (  # key, header, format
    ("target_em", "held-out exact match", "{:.1%}"),
    ("target_nll", "held-out answer NLL", "{:.3f}"),
    ("text_ppl", "docstring perplexity", "{:.2f}"),
    ("chat_agree", "chat token agreement", "{:.1%}"),
    ("chat_kl", "chat KL to base", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (in first-seen order): the mean and the half-range over seeds of every numeric column."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by[r["method"]].append(r)
    out = {}
    for label, rs in by.items():
        row: dict[str, Any] = {"method": label, "seeds": len(rs), "trainable": rs[0]["trainable"],
                               "lr": rs[0].get("lr")}
        for key, _, _ in COLUMNS:
            vals = [r[key] for r in rs]
            row[key], row[key + "_spread"] = mean(vals), (max(vals) - min(vals)) / 2
        out[label] = row
    return out


def table(base: dict[str, Any], agg: dict[str, dict[str, Any]]) -> str:
    head = "| method | trainable params | lr | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    cells = [COLUMNS[i][2].format(base[k]) for i, k in enumerate(("target_em", "target_nll", "text_ppl"))]
    lines.append("| base (no training) | 0 | – | " + " | ".join(cells) + " | 100.0% | 0.000 | – | – |")
    for row in agg.values():
        cs = []
        for key, _, fmt in COLUMNS:
            c = fmt.format(row[key])
            if row["seeds"] > 1 and row[key + "_spread"] > 0 and not key.endswith("seconds"):
                c += " ± " + fmt.format(row[key + "_spread"]).rstrip("%") + ("%" if "%" in fmt else "")
            cs.append(c)
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['lr']:g} | " + " | ".join(cs) + " |")
    return "\n".join(lines)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels of the points (forgetting x, learning y) that no other point beats on both (less x, more y)."""
    return [a for a, (x, y) in points.items()
            if not any((x2 <= x and y2 >= y) and (x2, y2) != (x, y) for b, (x2, y2) in points.items() if b != a)]


def plot(base: dict[str, Any], agg: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Two panels, learning (y: the drop of the held-out answer NLL from the base's, nats/token — exact
    match stays near 0 after a few dozen steps, the NLL moves from the first step) against two
    forgetting measures (x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (("chat_kl", "forgetting: KL(base ‖ model) on general chat prompts (nats/token)", 0.0),
              ("text_ppl", "forgetting: docstring perplexity increase over the base (%)", base["text_ppl"]))
    for ax, (key, xlabel, ref) in zip(axes, panels):
        pts = {lab: ((r[key] / ref - 1) * 100 if ref else r[key], base["target_nll"] - r["target_nll"])
               for lab, r in agg.items()}
        front = pareto_front(pts)
        for lab, (x, y) in pts.items():
            ax.scatter([x], [y], color="tab:red" if lab in front else "tab:blue", zorder=3)
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
        fx = sorted(pts[lab] for lab in front)
        ax.plot([p[0] for p in fx], [p[1] for p in fx], color="tab:red", alpha=0.5, zorder=2)
        ax.set_xscale("symlog", linthresh=1.0 if ref else 0.1)  # rank 256 is orders of magnitude off
        ax.set_xlabel(xlabel + ", symlog")
        ax.set_ylabel("learning: held-out answer NLL drop from the base (nats/token)")
        ax.grid(alpha=0.3)
    fig.suptitle(title + "  (red: Pareto-optimal)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def verdict(agg: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences: does each LoRA rank learn less and forget less than full fine-tuning?"""
    full = agg.get("full")
    loras = [r for lab, r in agg.items() if lab.startswith("lora-r") and "+" not in lab]
    if full is None or not loras:
        return ["(the verdict needs `full` and at least one plain `lora-rN` run)"]
    out = []
    for r in loras:
        learns_less = r["target_nll"] > full["target_nll"]  # exact match is near 0 for most runs
        forgets_less = r["chat_kl"] < full["chat_kl"] and r["text_ppl"] < full["text_ppl"]
        out.append(f"* {r['method']} vs full: learns {'less' if learns_less else 'as much or more'} "
                   f"(held-out answer NLL {r['target_nll']:.3f} vs {full['target_nll']:.3f}, exact match "
                   f"{r['target_em']:.1%} vs {full['target_em']:.1%}) and forgets "
                   f"{'less' if forgets_less else 'not less on both measures'} (chat KL {r['chat_kl']:.3f} vs "
                   f"{full['chat_kl']:.3f}, docstring perplexity {r['text_ppl']:.2f} vs {full['text_ppl']:.2f}).")
    return out


def write_page(path: Path, result: dict[str, Any], command: str, machine: str, notes: str, png: str) -> None:
    agg = aggregate(result["runs"])
    base = result["base"]
    s = result["settings"]
    sched, sizes = s["schedule"], s["sizes"]
    samples = "\n".join(f"| {r['method']} (seed {r['seed']}) | {r['target_sample']} | {r['chat_sample']!r} |"
                        for r in result["runs"] if r["seed"] == result["runs"][0]["seed"])
    text = f"""# Learning vs forgetting on a real model: SmolLM2-135M-Instruct

Generated by `lorakit.eval.study` ({s.get('finished', '')}). Command:

```
{command}
```

Machine: {machine}. Whole study: **{result['wall_seconds'] / 60:.1f} min** wall.

**Target skill** (the base lacks it): the official Unicode name of accented Latin letters, from Python's
`unicodedata` ("What is the Unicode name of the character Ó?" → "Latin Capital Letter O With Acute");
{s['train_rows']} training rows, {sizes['held_out']} rows held out (never trained on) for scoring.
**Forgetting**: perplexity on {sizes['text_blocks']} blocks of {sizes['text_block']} tokens of standard-library
docstrings (never trained on), and, on {len(result['chat_prompts'])} fixed general chat prompts, agreement
with the base model's own greedy answers ({sizes['chat_tokens']} tokens, teacher-forced): the fraction of
answer tokens where the model's argmax is the base's, and the mean KL(p_base ‖ p_model).

**Runs**: {sched['steps']} AdamW steps of batch {sched['batch_size']} (linear decay, clip 1.0), rows of
≤ {sizes['max_length']} tokens, loss on answer tokens; LoRA/DoRA α = 2r on all linear layers at lr
{sched['lr']:g}, full fine-tuning at lr {sched['full_lr']:g}; `+replay`: {sched['replay']:.0%} of the rows are
the base model's own answers to {sizes['replay_prompts']} prompts it wrote itself (Magpie; `replay_data=self`).
Seeds: {', '.join(map(str, s['seeds']))} (± = half the range over seeds).

## Results

{table(base, agg)}

![learning vs forgetting]({png})

## Does "LoRA learns less and forgets less" reproduce at 135M?

{chr(10).join(verdict(agg))}

{notes}

## What the models answer

Held-out target row (reference → answer) and "{result['chat_prompts'][0]}" (base:
{result['base_chat_answers'][0]!r}):

| run | held-out target | chat |
|---|---|---|
{samples}
"""
    atomic_write_text(path, text)
