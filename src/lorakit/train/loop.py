"""``train(args)``: the whole fine-tuning run, written out top to bottom.

    set up  →  resume?  →  estimate  →  score before  →  for each step: micro-batches → backward
    → clip → hooks.after_backward → optimizer.step → hooks.after_step → log → checkpoint?  →  final
    checkpoint → artifact → score after → summary, metrics.json, loss.png

Variants plug in through hooks (``hooks.py``) and methods (``methods.py``), never by editing this
file. Distributed runs go through ``accelerate`` (DDP, FSDP): launch the same command with
``accelerate launch`` or ``torchrun``.

The loss of a step is the mean over *all* its target tokens — across micro-batches and processes —
not a mean of per-batch means: each micro-batch contributes ``Σ token losses × W / N_step`` (``N_step``
summed over processes, ``W`` = process count, undone by DDP's gradient averaging). So gradient
accumulation and data parallelism compute exactly the gradient of one big batch.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._fs import atomic_write_json
from ..errors import TrainingError
from ..losses import unsupported_reason
from ..offload import offload_checkpoints
from ..summary import trainable_parameters
from . import checkpoint as ckpt
from . import resume_checks
from .args import TrainArgs
from ..data.batches import BatchPlan, collate, model_loss_sum, target_count
from .inference import LABELS_FILE
from .distributed import adapter_param_names, check_fsdp_args, is_fsdp, save_artifact
from .estimate import estimate_run, peak_rss_mb
from .hooks import HookContext, TrainHook
from .lock import RunLock
from .logs import StepLog
from .metrics import evaluate_loss
from .neftune import NEFTuneHook
from .probe import ForgettingProbe
from .progress import Progress, quiet_loading, warmup_warning
from .report import plot_loss, summary_lines, write_metrics
from .schedule import apply_lr, init_base_lr, lr_factor
from .setup import (
    EvalTasks,
    build_method,
    build_optimizer,
    check_output_dir,
    eval_tasks,
    fingerprint,
    prepare_model_and_data,
    resolve_defaults,
)
from .task_eval import evaluate_tasks


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    interrupted: bool  # stopped by SIGINT/SIGTERM after saving a checkpoint
    steps_done: int
    signal: int | None = None  # the signal that stopped the run


def train(args: TrainArgs, hooks: list[TrainHook] | tuple = ()) -> TrainResult:
    """Run ``lorakit train`` with ``args``; ``hooks`` are added after the method's own."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args = resolve_defaults(args)
        # One run per output directory, held until this call returns or raises (rank 0 of a launch).
        with RunLock(args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
            return _train(args, list(hooks))
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(args: TrainArgs, hooks: list[TrainHook]) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Mixed precision is our own autocast, not accelerate's: its setting is process-global and
    # could not change between two train() calls in one process.
    accelerator = Accelerator(cpu=multi and not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    def autocast():
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    say = print if main else (lambda *a, **k: None)
    out = check_output_dir(args) if main else Path(args.output_dir)
    accelerator.wait_for_everyone()
    resume_path = ckpt.resolve_resume(args.resume, out) if args.resume is not None else None
    if resume_path is not None:  # the checkpoint's settings, before the optimizer and plan are built
        args, notes = resume_checks.reconcile_args(args, resume_path)
        for note in notes:
            say(f"resume: {note}")

    # -- model, data, method, optimizer -----------------------------------------------------------
    set_seed(args.seed)  # the same initialization in every process
    with quiet_loading(main and args.progress):
        args, loaded, data = prepare_model_and_data(args)
    setup = build_method(loaded.model, args)
    model, tokenizer = setup.model, loaded.tokenizer
    all_hooks: list[TrainHook] = [*setup.hooks, *hooks]
    if data.probe is not None:
        all_hooks.append(ForgettingProbe(data.probe.examples, tokenizer.pad_token_id, args.probe_every,
                                         args.probe_max_kl, args.probe_action, say))
    if args.neftune_alpha:  # last, so checkpointed hook states keep their order with or without it
        all_hooks.append(NEFTuneHook(args.neftune_alpha))
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    key_names = adapter_param_names(model)  # for saving a sharded (FSDP) adapter by name
    counts = trainable_parameters(model)
    optimizer = build_optimizer(setup, args)
    init_base_lr(optimizer)
    plan = BatchPlan(len(data.train.examples), args.batch_size, args.grad_accum, world, args.seed)
    total_steps = plan.total_steps(args.epochs, args.max_steps)
    tasks = eval_tasks(args, loaded)
    pad_id = tokenizer.pad_token_id
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # The chunked loss needs the head's input; models that post-process logits keep the plain loss.
    fsdp = is_fsdp(accelerator)
    chunked = (args.chunked_ce and loaded.task == "causal-lm" and not fsdp
               and unsupported_reason(unwrapped) is None)
    if fsdp:
        check_fsdp_args(args)
    set_seed(args.seed + rank)  # dropout differs between processes, reproducibly

    # -- resume ---------------------------------------------------------------------------------------
    start_step, history, before = 0, [], {}
    fp = {**fingerprint(args, world), **resume_checks.data_digests(args)}
    if resume_path is not None:
        path = resume_path
        state = resume_checks.resume_from(path, model=unwrapped, optimizer=optimizer, hooks=all_hooks,
                                          total_steps=total_steps, fingerprint=fp, args=args, rank=rank)
        start_step, history, before = state.step, state.state["history"], state.state.get("before", {})
        say(f"resuming from {path} at step {start_step}/{total_steps}")

    # -- what this run is, and what it will cost ------------------------------------------------------
    say(f"lorakit train: {_model_name(loaded)} · {args.method} · {data.train.source} → {out}"
        + (f" · {world} processes" if world > 1 else ""))
    say(f"parameters: {counts.trainable:,} trainable / {counts.total:,} total ({counts.percent:.2f}%)")
    device = accelerator.device
    example = collate([data.train.examples[i] for i in plan.micro_batches(0, rank)[0]], pad_id)

    def probe() -> None:
        with accelerator.no_sync(model), autocast():
            b = {k: v.to(device) for k, v in example.items()}
            labels = b.pop("labels")
            model_loss_sum(model, unwrapped, b, labels, chunked).backward()
        optimizer.zero_grad(set_to_none=True)

    estimate = estimate_run(unwrapped, probe, args, data.train.max_tokens, total_steps - start_step)
    say(str(estimate))
    warning = warmup_warning(args.warmup_steps, total_steps)
    if warning:
        say(warning)

    # -- score before training ------------------------------------------------------------------------
    t_eval = time.perf_counter()
    if not before:
        before = _evaluate(model, unwrapped, tokenizer, data.eval, tasks, args, accelerator, pad_id, autocast)
    eval_seconds = time.perf_counter() - t_eval

    # -- the loop -------------------------------------------------------------------------------------
    log = StepLog(out, history) if main else None
    ctx = HookContext(model=unwrapped, optimizer=optimizer, step=start_step, total_steps=total_steps,
                      output_dir=out, extra={"accelerator": accelerator, "args": args, "tokenizer": tokenizer})
    for hook in all_hooks:
        hook.on_train_start(ctx)
    optimizer = ctx.optimizer
    last_ckpt: Path | None = None
    interrupted = False
    bar = Progress(total_steps, start_step, main and args.progress, args.log_every)
    t_train, loop_eval_seconds = time.perf_counter(), 0.0
    steps_done = start_step
    model.train()
    with _stop_signals() as stop:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            ctx.step, ctx.log = step, {}
            lr = apply_lr(optimizer, lr_factor(step, total_steps, args.warmup_steps, args.schedule))
            micro = [collate([data.train.examples[i] for i in idx], pad_id) for idx in plan.micro_batches(step, rank)]
            n_step = _sum_over_processes(sum(target_count(b) for b in micro), accelerator)
            loss_sum, extra_sum = 0.0, 0.0
            for m, batch in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                last = m == len(micro) - 1
                with nullcontext() if last else accelerator.no_sync(model):  # all-reduce once per step
                    with autocast(), offload_checkpoints(args.offload_checkpoints):
                        task_sum = model_loss_sum(model, unwrapped, batch, labels, chunked)
                        extras = [e for e in (h.extra_loss(ctx) for h in all_hooks) if e is not None]
                        extra = sum(extras) / args.grad_accum if extras else None
                    loss = task_sum * (world / max(n_step, 1)) + (extra if extra is not None else 0.0)
                    accelerator.backward(loss)
                loss_sum += float(task_sum.detach())
                extra_sum += float(extra.detach()) if extra is not None else 0.0
            # The logged loss is the task's; a hook's extra term (AdaLoRA's orthogonality) is its own column.
            step_loss = _sum_over_processes(loss_sum, accelerator) / max(n_step, 1)
            grad_norm = float(accelerator.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], args.max_grad_norm or float("inf")))
            if not (math.isfinite(step_loss + extra_sum) and math.isfinite(grad_norm)):
                bar.close()
                good = ckpt.list_checkpoints(out / "checkpoints")
                raise TrainingError(
                    f"step {step + 1}: the loss is {step_loss + extra_sum} and the gradient norm {grad_norm} — training "
                    f"diverged, so it stopped before updating the weights. Last good checkpoint: "
                    f"{good[-1] if good else 'none (set save_every to keep one)'}. Lower lr, add warm-up "
                    "(warmup_steps) or keep max_grad_norm > 0, and check the data."
                )
            for hook in all_hooks:
                hook.after_backward(ctx)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for hook in all_hooks:
                hook.after_step(ctx)
            if ctx.optimizer is not optimizer:  # a hook rebuilt it (e.g. AdaLoRA shrank its factors)
                optimizer = ctx.optimizer
                _adopt_optimizer(optimizer, lr_factor(step, total_steps, args.warmup_steps, args.schedule))

            row = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "targets": n_step,
                   "seconds": time.perf_counter() - t0, **ctx.log}
            if extra_sum:
                row["extra_loss"] = extra_sum
            if args.eval_every and (step + 1) % args.eval_every == 0 and data.eval is not None:
                t_ev = time.perf_counter()
                ev = evaluate_loss(model, data.eval.examples, pad_id, args.batch_size, accelerator, autocast)
                row.update(eval_loss=ev.loss, eval_accuracy=ev.accuracy)
                loop_eval_seconds += time.perf_counter() - t_ev
            history.append(row)
            steps_done = step + 1
            if log is not None:
                log.log(row)
            bar.update(step + 1, step_loss, lr, row["seconds"])
            if ctx.stop_reason:
                say(f"\n{ctx.stop_reason}")
                break
            if _any_process(stop.requested, accelerator):
                interrupted = True
                break
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                last_ckpt = _save_checkpoint(out, step + 1, model, optimizer, all_hooks, history, before, fp,
                                             trainable_names, args, total_steps, plan, accelerator)
    bar.close()
    train_seconds = time.perf_counter() - t_train - loop_eval_seconds  # s/step excludes evaluation
    eval_seconds += loop_eval_seconds

    # -- the end: checkpoint, artifact, score after, report ---------------------------------------------
    if not fsdp:
        last_ckpt = _save_checkpoint(out, steps_done, model, optimizer, all_hooks, history, before, fp,
                                     trainable_names, args, total_steps, plan, accelerator)
    if interrupted:
        if fsdp:
            say(f"\ninterrupted at step {steps_done}/{total_steps}; no checkpoint (not supported under FSDP).")
        else:
            say(f"\ninterrupted at step {steps_done}/{total_steps}: checkpoint saved to {last_ckpt}. "
                f"Continue with: lorakit train ... --output-dir {out} --resume auto")
        return TrainResult(out, {}, True, steps_done, stop.signum)
    for hook in all_hooks:  # before the artifact: a hook may finalize the adapter (AdaLoRA's last cut)
        hook.on_train_end(ctx)
    artifact = out / setup.artifact
    save_artifact(accelerator, model, unwrapped, setup, artifact, tokenizer, key_names)
    if main and data.label2id:  # a classifier's labels, for `lorakit eval/merge` to rebuild its head

        atomic_write_json(artifact / LABELS_FILE, data.label2id)
    # The quantized base this adapter was trained on, for `lorakit merge` (a GGUF base is the file itself).
    if main and args.quant not in ("none", "gguf"):
        from .qlora_record import write_qlora_record

        write_qlora_record(artifact, args)
    t_eval = time.perf_counter()
    after = _evaluate(model, unwrapped, tokenizer, data.eval, tasks, args, accelerator, pad_id, autocast)
    eval_seconds += time.perf_counter() - t_eval

    new_steps = [r for r in history if r["step"] > start_step]
    peak = peak_rss_mb()
    metrics = {
        "run": {"model": str(loaded.path), "model_name": _model_name(loaded), "embedded": loaded.embedded,
                "task": loaded.task, "method": args.method, "output_dir": str(out), "world_size": world},
        "args": args.to_dict(),
        "parameters": {"trainable": counts.trainable, "total": counts.total, "percent": counts.percent},
        "data": {"train": data.train.counts(), "eval": data.eval.counts() if data.eval else None},
        "steps": {"done": steps_done, "total": total_steps, "start": start_step, "interrupted": False,
                  **({"stopped": ctx.stop_reason} if ctx.stop_reason else {})},
        "time": {
            "train_seconds": train_seconds,
            "step_seconds": train_seconds / max(1, len(new_steps)),
            "tokens_per_second": sum(r["targets"] for r in new_steps) / max(train_seconds, 1e-9),
            "eval_seconds": eval_seconds,
            "total_seconds": time.perf_counter() - t_start,
        },
        "memory": {"estimate": estimate.to_dict(), "peak_rss_mb": peak,
                   "estimate_error": (estimate.total_mb - peak) / peak if peak else None},
        "loss": _loss_summary(history),
        "eval": {"before": before.get("eval"), "after": after.get("eval")},
        "tasks": {"before": before.get("tasks", {}), "after": after.get("tasks", {}), "new": tasks.new,
                  "base": tasks.base, "n": args.eval_rows},
        "artifact": str(artifact),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
    }
    if main:
        log.close()
        write_metrics(out / "metrics.json", metrics)
        evals = [(0, before.get("eval")), (steps_done, after.get("eval"))]
        plot_loss(history, out / "loss.png", f"{_model_name(loaded)} · {args.method} · {data.train.source}",
                  [(s, e["loss"]) for s, e in evals if e])
        say("\n".join(["", "── summary " + "─" * 60, *summary_lines(metrics)]))
    return TrainResult(out, metrics, False, steps_done)


# -- pieces of the loop ----------------------------------------------------------------------------------
def _evaluate(model, unwrapped, tokenizer, eval_data, tasks: EvalTasks, args: TrainArgs, accelerator,
              pad_id: int, autocast) -> dict[str, Any]:
    """Eval loss on the eval data (all processes), and built-in task accuracy (main process)."""
    result: dict[str, Any] = {}
    if eval_data is not None:
        result["eval"] = evaluate_loss(model, eval_data.examples, pad_id, args.batch_size, accelerator,
                                       autocast).to_dict()
    if tasks.all and accelerator.is_main_process:
        with autocast():
            scores = evaluate_tasks(unwrapped, tokenizer, tasks.all, n=args.eval_rows)
        result["tasks"] = {name: s.accuracy for name, s in scores.items()}
    accelerator.wait_for_everyone()
    return result


def _save_checkpoint(out: Path, step: int, model, optimizer, hooks, history, before, fp, trainable_names,
                     args: TrainArgs, total_steps: int, plan: BatchPlan, accelerator) -> Path | None:
    from accelerate.utils import gather_object

    rng = ckpt.rng_state()
    rngs = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    full_state = accelerator.get_state_dict(model)  # gathers shards under FSDP
    path = None
    if accelerator.is_main_process:
        epoch, in_epoch = plan.position(step)
        path = ckpt.save_checkpoint(
            out / "checkpoints", step,
            trainable={n: full_state[n] for n in trainable_names},
            optimizer=optimizer.state_dict(),
            schedule={"schedule": args.schedule, "warmup_steps": args.warmup_steps, "total_steps": total_steps},
            hooks=[h.state_dict() for h in hooks],
            rng=rngs,
            state={"history": history, "before": before, "fingerprint": fp, "args": args.to_dict(), "epoch": epoch,
                   "step_in_epoch": in_epoch, "steps_per_epoch": plan.steps_per_epoch},
            keep=args.keep_checkpoints,
        )
    accelerator.wait_for_everyone()
    return path


def _adopt_optimizer(optimizer, factor: float) -> None:
    """A replacement optimizer's groups without ``base_lr`` are taken to be at this step's rate."""
    for group in optimizer.param_groups:
        if "base_lr" not in group:
            group["base_lr"] = group["lr"] / factor if factor > 0 else group["lr"]


def _sum_over_processes(value: float, accelerator) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def _any_process(flag: bool, accelerator) -> bool:
    return _sum_over_processes(1.0 if flag else 0.0, accelerator) > 0


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [r["loss"] for r in history]
    if not losses:
        return {"first": None, "last": None, "min": None}
    tail = losses[-10:]
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "last10_mean": sum(tail) / len(tail)}


def _model_name(loaded) -> str:
    arch = type(loaded.model).__name__
    return f"embedded tiny-base ({arch})" if loaded.embedded else f"{loaded.path.name} ({arch})"


class _StopFlag:
    requested = False
    signum: int | None = None


@contextmanager
def _stop_signals():
    """SIGINT / SIGTERM ask the loop to stop after the current step and save a checkpoint; a second
    signal kills at once (the previous checkpoint stays intact: saves are atomic)."""
    flag = _StopFlag()
    if _is_main_thread():
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if flag.requested:
                signal.signal(signum, previous[signum] if callable(previous[signum]) else signal.SIG_DFL)
                raise KeyboardInterrupt
            flag.requested, flag.signum = True, signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield flag
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    else:  # signal handlers can only be set from the main thread
        yield flag


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
