"""Show where AdaLoRA put its budget: a layer × module table of final ranks (the paper's Figure 1 style).

``rank_grid`` arranges module path → rank into rows (layer index, parsed from the path) and columns
(the module's name inside its layer, e.g. ``q_proj`` or ``mlp.down_proj``); ``format_rank_table``
prints it, ``plot_rank_heatmap`` draws it as a PNG with matplotlib's Agg canvas (no display needed,
the global backend is left alone).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from ..._fs import atomic_write, atomic_write_json

_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """(row labels, column labels, grid) with grid[row][col] = rank, or None where nothing is adapted."""
    cells: dict[tuple[str, str], int] = {}
    for path, rank in ranks.items():
        m = _LAYER.search(path)
        row, col = (m.group(1), m.group(2)) if m else ("-", path)
        cells[(row, col)] = int(rank)
    cols = sorted({c for _, c in cells})
    short = {c: c.rpartition(".")[2] for c in cols}
    if len(set(short.values())) == len(cols):  # last names are unambiguous: use them
        cells = {(r, short[c]): v for (r, c), v in cells.items()}
        cols = sorted(short.values())
    rows = sorted({r for r, _ in cells}, key=lambda r: (r == "-", int(r) if r.isdigit() else 0))
    grid = [[cells.get((r, c)) for c in cols] for r in rows]
    return rows, cols, grid


def format_rank_table(ranks: Mapping[str, int], title: str = "AdaLoRA final ranks") -> str:
    rows, cols, grid = rank_grid(ranks)
    width = max([len(c) for c in cols] + [3])
    lines = [f"{title} (total {sum(ranks.values())} over {len(ranks)} matrices)",
             "layer " + " ".join(c.rjust(width) for c in cols)]
    for r, line in zip(rows, grid):
        lines.append(r.rjust(5) + " " + " ".join(("·" if v is None else str(v)).rjust(width) for v in line))
    return "\n".join(lines)


def plot_rank_heatmap(ranks: Mapping[str, int], path: str | Path, title: str | None = None,
                      vmax: int | None = None) -> Path:
    """Write a heatmap of the final rank per layer (rows) × module (columns) to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols, grid = rank_grid(ranks)
    data = [[float("nan") if v is None else v for v in line] for line in grid]
    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.45 * len(rows)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = vmax or max([1, *ranks.values()])
    im = ax.imshow(data, cmap="YlGn", aspect="auto", vmin=0, vmax=top)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                        color="white" if v > 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="final rank")
    ax.set_title(title or f"AdaLoRA final ranks (total {sum(ranks.values())})")
    fig.tight_layout()

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def write_rank_report(ranks: Mapping[str, int], output_dir: str | Path, extra: Mapping | None = None) -> tuple[Path, Path]:
    """``adalora_ranks.png`` and ``adalora_ranks.json`` in ``output_dir``."""

    out = Path(output_dir)
    png = plot_rank_heatmap(ranks, out / "adalora_ranks.png", vmax=(extra or {}).get("init_r"))
    rows, cols, grid = rank_grid(ranks)
    report = {"ranks": dict(ranks), "total_rank": sum(ranks.values()), "layers": rows, "modules": cols,
              "grid": grid, **(extra or {})}
    atomic_write_json(out / "adalora_ranks.json", json.loads(json.dumps(report)))
    return png, out / "adalora_ranks.json"
