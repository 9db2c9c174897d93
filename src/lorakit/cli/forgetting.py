"""``lorakit forgetting`` and ``lorakit distill-data``: argument parsing only; the work is done by
:func:`lorakit.eval.forgetting.measure_forgetting` and :func:`lorakit.variants.sdft.distill_file`.

Wired into ``lorakit.cli`` by :func:`add_subcommands`; every sub-parser sets ``run`` to a function
``(namespace) -> exit code``.

    lorakit forgetting --train shift --keep copy,rev --methods full,lora-r4,lora-r16,expand-2
    lorakit distill-data --data builtin:shift --out distilled.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from ..errors import ConfigError


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``forgetting`` and ``distill-data`` to the ``lorakit`` sub-parsers."""
    from ..eval.forgetting import SPEC_HELP, RunSettings

    d = RunSettings()
    p = sub.add_parser("forgetting", help="learning vs forgetting of several fine-tuning methods",
                       description="Fine-tune on one built-in task with each method; report the target-task "
                                   "gain, the drop on the kept tasks and a learning-vs-forgetting plot.")
    p.add_argument("--model", help="base model directory (default: the embedded tiny-base)")
    p.add_argument("--train", required=True, metavar="TASK", help="built-in task to learn, e.g. shift")
    p.add_argument("--keep", type=_csv, metavar="TASK_A,TASK_B",
                   help="built-in tasks not to forget (default: the model's base tasks)")
    p.add_argument("--methods", default="full,lora-r4,lora-r16", help=SPEC_HELP)
    p.add_argument("--output-dir", default="runs/forgetting")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per method")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of every method but full")
    p.add_argument("--full-lr", type=float, default=d.full_lr, help="learning rate of full fine-tuning")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--builtin-rows", type=int, default=d.builtin_rows, help="training rows drawn from TASK")
    p.add_argument("--eval-rows", type=int, default=d.eval_rows, help="eval rows per task")
    p.add_argument("--target-modules", default=d.target_modules, help="LoRA targets (names, regex, all-linear)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--lambda-orth", type=float, help="O-LoRA's λ1 (default 0.5)")
    p.add_argument("--json", action="store_true", dest="as_json", help="print the rows as JSON")
    p.set_defaults(run=forgetting_command)

    p = sub.add_parser("distill-data", help="self-distillation (SDFT): the model rewrites the responses",
                       description="Rewrite each training response with the model, given the original as a "
                                   "reference; keep a rewrite only if it passes the check.")
    p.add_argument("--data", required=True, help="JSONL of instruction or messages rows, or builtin:TASK")
    p.add_argument("--out", required=True, help="distilled JSONL (counts go to OUT.counts.json)")
    p.add_argument("--model", help="model directory (default: the embedded tiny-base)")
    p.add_argument("--adapter", help="adapter directory to load on the model first")
    p.add_argument("--template", default="embedded", help="embedded (character models) or alpaca")
    p.add_argument("--check", default="builtin",
                   help="builtin (the built-in task's score), none (accept every rewrite) or "
                        "module:function taking (rewrite, row) -> bool")
    p.add_argument("--rows", type=int, default=2000, help="rows drawn for builtin:TASK")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(run=distill_command)


def forgetting_command(ns: argparse.Namespace) -> int:
    from ..eval.forgetting import RunSettings, measure_forgetting

    if ns.lambda_orth is not None and not 0 <= ns.lambda_orth < float("inf"):  # also NaN; checked before any run
        raise ConfigError(f"--lambda-orth {ns.lambda_orth}: must be a finite number ≥ 0 (O-LoRA's λ1, e.g. 0.5).")
    target = _csv(ns.target_modules) if "," in ns.target_modules else ns.target_modules
    settings = RunSettings(model=ns.model, steps=ns.steps, lr=ns.lr, full_lr=ns.full_lr, batch_size=ns.batch_size,
                           warmup_steps=ns.warmup_steps, builtin_rows=ns.builtin_rows, eval_rows=ns.eval_rows,
                           seed=ns.seed, threads=ns.threads, target_modules=target,
                           method_options={} if ns.lambda_orth is None else {"lambda_orth": ns.lambda_orth})
    report = measure_forgetting(ns.train, ns.keep, ns.methods, ns.output_dir, settings)
    if ns.as_json:
        print(json.dumps([r.as_dict() for r in report.rows], indent=2, default=str))
    else:
        print(report.table())
        print("wrote " + ", ".join(str(p) for p in report.files.values()))
    return 0


def load_check(spec: str):
    """``builtin`` / ``none`` / ``module:function`` → a check function (None = the default)."""
    if spec == "builtin":
        return None
    if spec == "none":
        return lambda rewrite, row: True
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"--check {spec!r}: use builtin, none, or module:function (e.g. mychecks:final_answer).")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--check {spec!r}: cannot import it ({exc}); is the module on PYTHONPATH?") from None
    if not callable(fn):
        raise ConfigError(f"--check {spec!r} is not callable; give a function (rewrite, row) -> bool.")
    return fn


def distill_command(ns: argparse.Namespace) -> int:
    from ..train.inference import load_for_inference
    from ..variants.sdft import distill_file, get_template

    check = load_check(ns.check)
    get_template(ns.template)
    for flag, value in (("--rows", ns.rows), ("--batch-size", ns.batch_size), ("--max-new-tokens", ns.max_new_tokens)):
        if value < 1:  # before builtin:TASK rows are written next to --out
            raise ConfigError(f"{flag} {value}: must be ≥ 1.")
    data = ns.data
    if data.startswith("builtin:"):
        from ..tasks import write_jsonl

        data = write_jsonl(data[len("builtin:"):], Path(ns.out).with_suffix(".source.jsonl"), ns.rows, seed=ns.seed)
    model, tokenizer, task = load_for_inference(ns.model, ns.adapter)
    if task != "causal-lm":
        raise ConfigError("distill-data needs a causal LM (it generates the rewrites).")
    counts = distill_file(model, tokenizer, data, ns.out, template=ns.template, check=check,
                          batch_size=ns.batch_size, max_new_tokens=ns.max_new_tokens)
    print(f"distilled {data} → {ns.out}: {counts}")
    return 0
