"""A miniature continual-learning study on lorakit's embedded tiny-base model.

    python scripts/continual_study.py                      # ~10 min on 2 CPU cores, 1 torch thread

The embedded model knows four base tasks (copy, rev, sort, add). It then learns new built-in tasks
one after the other with each method, and every task — the sequence's and the base ones — is scored
after every stage (exact match on 200 eval rows). Reported per method: average accuracy over the
sequence after the last task (O-LoRA's Table 1 metric), backward transfer, and how much of the base
tasks survived (relative forgetting, Luo et al. 2023).

Writes ``docs/results/continual_study.md`` (only the part between the ``results`` markers is
replaced, so the hand-written discussion around it survives a re-run) and ``continual_study.png``;
the raw numbers and every run go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing lorakit

from lorakit._fs import atomic_write_text  # noqa: E402
from lorakit.eval.continual import (  # noqa: E402
    matrix_table,
    plot_study,
    run_multitask,
    run_sequence,
    summary_table,
    write_results,
)
from lorakit.eval.forgetting import RunSettings  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
METHODS = {  # table label -> harness method spec
    "sequential full FT": "full",
    "sequential LoRA": "lora-r8",
    "O-LoRA": "olora-r8",
    "LLaMA-Pro (expand)": "expand-2",
    "SDFT + sequential LoRA": "sdft-lora-r8",
}
MULTITASK = "lora-r8"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="swap,max,dedup,count", help="the sequence, in training order")
    p.add_argument("--keep", default="copy,rev,sort,add", help="base tasks whose forgetting is measured")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per task")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of LoRA, O-LoRA, LLaMA-Pro's blocks")
    p.add_argument("--full-lr", type=float, default=1e-3, help="learning rate of full fine-tuning")
    p.add_argument("--lambda-orth", type=float, default=0.5, help="O-LoRA's λ1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", help="model directory (default: the embedded tiny-base)")
    p.add_argument("--only", help="comma-separated subset of the methods (labels or specs), for experiments")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "continual_study")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "continual_study.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tasks, keep = args.tasks.split(","), args.keep.split(",")
    settings = RunSettings(model=args.model, steps=args.steps, lr=args.lr, full_lr=args.full_lr,
                           eval_rows=args.eval_rows,
                           seed=args.seed, threads=args.threads, method_options={"lambda_orth": args.lambda_orth})
    chosen = METHODS if not args.only else {k: v for k, v in METHODS.items()
                                            if k in args.only.split(",") or v in args.only.split(",")}
    t0 = time.perf_counter()
    results = []
    for label, spec in chosen.items():
        res = run_sequence(spec, tasks, keep, args.work_dir / spec, settings)
        res.method = f"{label} ({spec})"
        results.append(res)
    if not args.only or "multitask" in args.only.split(","):
        res = run_multitask(MULTITASK, tasks, keep, args.work_dir / "multitask", settings)
        res.method = f"multi-task LoRA ({MULTITASK})"
        results.append(res)
    minutes = (time.perf_counter() - t0) / 60
    write_results(results, args.work_dir / "results.json")
    png = args.out.with_suffix(".png")
    plot_study(results, png, f"tiny-base: {' → '.join(tasks)} ({args.steps} steps each, seed {args.seed})")

    command = "python scripts/continual_study.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("tasks", args.tasks), ("steps", args.steps),
                                                     ("seed", args.seed)))
    block = [BEGIN, "", f"Regenerate with `{command}` ({minutes:.1f} min on this machine: "
             f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}; model weights "
             f"sha256 {weights_digest(args.model)}).", "",
             f"Sequence: {' → '.join(tasks)}; base tasks measured for forgetting: {', '.join(keep)}. "
             f"{args.steps} optimizer steps per task (batch 32, cosine schedule, 20 warm-up steps), "
             f"lr {args.lr:g} for LoRA/O-LoRA (r = 8, α = 16, all linear layers) and LLaMA-Pro's 2 new "
             f"blocks, {args.full_lr:g} for full FT; O-LoRA λ1 = {args.lambda_orth:g} (|·| overlap), seed {args.seed} "
             f"(initialisation, data order, and the drawn rows); {args.eval_rows} eval rows per task.", "",
             summary_table(results), f"![average accuracy vs forgetting]({png.name})", "",
             "Accuracy (%) of every task before training and after each stage:", ""]
    for r in results:
        block += [f"**{r.method}**", "", matrix_table(r)]
        if "sdft_replaced" in r.extra:
            block += [f"SDFT rows replaced by the model's own (correct) rewrite, per stage: "
                      f"{r.extra['sdft_replaced']} of {r.extra['sdft_rows']}.", ""]
    block.append(END)
    write_block(args.out, "\n".join(block))
    print(summary_table(results))
    print(f"wrote {args.out} and {png} ({minutes:.1f} min)")


def weights_digest(model: str | None) -> str:
    """The first 12 hex digits of the model weights' sha256: the numbers belong to these weights."""
    import hashlib

    from lorakit.train.model import model_dir

    path, _ = model_dir(model)
    files = sorted(path.glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12] if files else "unknown"


def write_block(path: Path, block: str) -> None:
    """Replace the results block of ``path`` (or create the file with a title and the block)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Continual-learning study\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


if __name__ == "__main__":
    main()
