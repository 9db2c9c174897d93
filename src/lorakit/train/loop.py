"""``train(args)``: the whole fine-tuning run, written out top to bottom.

    set up  →  resume?  →  estimate  →  score before  →  for each step: micro-batches → backward
    → clip → hooks.after_backward → optimizer.step → hooks.after_step → log → checkpoint?  →  final
    checkpoint → artifact → score after → summary, metrics.json, loss.png

Variants plug in through hooks (``hooks.py``) and methods (``methods.py``), never by editing this
file. Distributed runs: launch the same command with ``torchrun`` or ``accelerate launch``;
``accelerate`` holds the process group and DDP, ``fsdp.py`` shards the model (``distributed=fsdp``).

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
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._fs import atomic_write_json
from ..data.batches import BatchPlan, collate, model_loss_sum, target_count
from ..data.packing import collate_packed
from ..errors import ConfigError, TrainingError
from ..losses import unsupported_reason
from ..offload import offload_checkpoints
from ..quant.head16 import keep_head_16bit
from ..summary import trainable_parameters
from . import checkpoint as ckpt
from . import dist_checkpoint as dckpt
from . import fsdp as fsdp_mod
from . import resume_checks
from .args import TrainArgs
from .distributed import save_artifact
from .early_stop import BEST_DIR, EarlyStopping, write_best
from .estimate import estimate_run, peak_rss_mb
from .gen_eval import GenerationEval, build_generation_eval, write_generations
from .hooks import HookContext, TrainHook
from .inference import LABELS_FILE
from .lock import RunLock
from .loggers_ext import (
    check_report_to,
    close_trackers,
    eval_numbers,
    log_all,
    open_trackers,
    step_numbers,
    summary_numbers,
    tensorboard_wanted,
)
from .logs import StepLog
from .methods import check_options as check_method_options
from .metrics import evaluate_loss
from .neftune import NEFTuneHook
from .packing_check import mask_dtype_for, packing_mode
from .probe import ForgettingProbe
from .progress import Progress, quiet_loading, warmup_warning
from .report import RunTiming, plot_loss, run_metrics, summary_lines, write_metrics
from .samples import build_sampler
from .schedule import apply_lr, init_base_lr, lr_factor
from .setup import (
    EvalTasks,
    build_method,
    build_optimizer,
    check_eval_settings,
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
        check_method_options(args)  # a bad method_options fails before the output directory is made
        mode = fsdp_mod.resolve_mode(args)  # "single", "ddp" or "fsdp"; refuses fsdp without a launcher
        if mode == "fsdp":
            fsdp_mod.check_fsdp_args(args)  # before anything is written
        check_eval_settings(args)  # eval_every / save_best / early stopping without eval data
        # One run per output directory, held until this call returns or raises (rank 0 of a launch).
        with RunLock(args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext(), \
                ExitStack() as closing:  # experiment trackers end as failed when the run raises
            return _train(args, list(hooks), closing, mode)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(args: TrainArgs, hooks: list[TrainHook], closing: ExitStack, mode: str) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    fsdp = mode == "fsdp"
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or fsdp
    # Mixed precision is our own autocast, not accelerate's: its setting is process-global and
    # could not change between two train() calls in one process.
    accelerator = Accelerator(cpu=multi and not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    def autocast():
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    say = print if main else (lambda *a, **k: None)
    check_report_to(args.report_to)  # a missing MLflow / W&B fails before anything is loaded or cleared
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
    model_name = _model_name(loaded)  # before FSDP renames the class
    setup = build_method(loaded.model, args)
    model, tokenizer = setup.model, loaded.tokenizer
    if args.quant in ("nf4", "fp4", "int8") and args.quant_head == "bf16" and not fsdp:
        say(keep_head_16bit(model))  # after the method: a head that trains or carries an adapter is kept
    all_hooks: list[TrainHook] = [*setup.hooks, *hooks]
    if data.probe is not None:
        all_hooks.append(ForgettingProbe(data.probe.examples, tokenizer.pad_token_id, args.probe_every,
                                         args.probe_max_kl, args.probe_action, say))
    if args.neftune_alpha:  # last, so checkpointed hook states keep their order with or without it
        all_hooks.append(NEFTuneHook(args.neftune_alpha))
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = trainable_parameters(model)
    if fsdp:  # before the optimizer exists: sharding replaces every parameter object
        setup.param_groups = fsdp_mod.shard_model(model, accelerator.device, setup.param_groups)
    optimizer = build_optimizer(setup, args)
    init_base_lr(optimizer)
    plan = BatchPlan(len(data.train.examples), args.batch_size, args.grad_accum, world, args.seed)
    total_steps = plan.total_steps(args.epochs, args.max_steps)
    tasks = eval_tasks(args, loaded)
    gen_eval = build_generation_eval(args, data.raw_eval, tokenizer, loaded.task)  # checks the scorer, before training
    if fsdp and gen_eval is not None:  # generation on one process would hang FSDP's collective forward passes
        say("generation score: skipped under FSDP (it generates on the main process only); score the saved "
            "adapter with `lorakit eval --scorer ...`.")
        gen_eval = None
    tracking_best = bool(args.early_stopping_patience or args.save_best)
    if tracking_best and data.eval is None:
        raise ConfigError(f"{'early_stopping_patience' if args.early_stopping_patience else 'save_best'} needs eval "
                          "data; give eval_data or eval_split.")
    pad_id = tokenizer.pad_token_id
    if not fsdp:  # DDP (or nothing) through accelerate; an FSDP2 model is already in place
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # The chunked loss needs the head's input; models that post-process logits keep the plain loss.
    # Under FSDP the head's weight is a shard outside the root's forward, so the plain loss there too.
    chunked = (args.chunked_ce and loaded.task == "causal-lm" and not fsdp
               and unsupported_reason(unwrapped) is None)
    if fsdp and args.save_best:
        raise ConfigError("save_best is not supported under FSDP yet; drop it or use distributed=ddp.")
    set_seed(args.seed + rank)  # dropout differs between processes, reproducibly

    # -- resume ---------------------------------------------------------------------------------------
    start_step, history, before = 0, [], {}
    fp = {**fingerprint(args, world), **resume_checks.data_digests(args), **setup.fingerprint}
    if resume_path is not None:
        path = resume_path
        state = resume_checks.resume_from(path, model=unwrapped, optimizer=optimizer, hooks=all_hooks,
                                          total_steps=total_steps, fingerprint=fp, args=args, rank=rank)
        start_step, history, before = state.step, state.state["history"], state.state.get("before", {})
        say(f"resuming from {path} at step {start_step}/{total_steps}")
    stopper = EarlyStopping(args.metric_for_best, args.early_stopping_patience)
    stopper.replay(history)  # its state is the logged evaluations
    sampler = build_sampler(args, data.raw_train, data.raw_eval, tokenizer, loaded.task, out, start_step) \
        if main else None

    # -- what this run is, and what it will cost ------------------------------------------------------
    say(f"lorakit train: {model_name} · {args.method} · {data.train.source} → {out}"
        + (f" · {world} processes" if world > 1 else ""))
    say(f"parameters: {counts.trainable:,} trainable / {counts.total:,} total ({counts.percent:.2f}%)")
    device = accelerator.device
    # Packed sequences (packing=true) carry their row boundaries in the way the model was found to honour.
    pack_mode = packing_mode(unwrapped, device, pad_id) if data.train.packed else None
    if pack_mode:
        say(f"packing: {data.train.rows:,} rows → {len(data.train.examples):,} sequences of ≤ {args.max_length} "
            f"tokens; rows kept apart by {pack_mode.replace('_', ' ')}")

    def batch_of(indices: list[int]) -> dict[str, Any]:
        rows = [data.train.examples[i] for i in indices]
        return collate_packed(rows, pad_id, pack_mode, mask_dtype_for(unwrapped)) if pack_mode else collate(rows, pad_id)

    example = batch_of(plan.micro_batches(0, rank)[0])

    def no_sync():
        # FSDP2 reduce-scatters every micro-batch (its unsynced gradients would outlive zero_grad).
        return nullcontext() if fsdp else accelerator.no_sync(model)

    def probe() -> None:
        with no_sync(), autocast():
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
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
        before = _evaluate(model, unwrapped, tokenizer, data.eval, tasks, gen_eval, args, accelerator, pad_id,
                           autocast, fsdp)
    eval_seconds = time.perf_counter() - t_eval

    # -- the loop -------------------------------------------------------------------------------------
    log = StepLog(out, history, tensorboard_wanted(args.report_to)) if main else None
    trackers = open_trackers(args.report_to, out, args.to_dict()) if main else []
    closing.push(lambda exc_type, *_: close_trackers(
        trackers, "killed" if exc_type is KeyboardInterrupt else "failed" if exc_type else "finished"))
    if start_step == 0:
        log_all(trackers, eval_numbers(before), 0)
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
            micro = [batch_of(idx) for idx in plan.micro_batches(step, rank)]
            n_step = _sum_over_processes(sum(target_count(b) for b in micro), accelerator)
            loss_sum, extra_sum = 0.0, 0.0
            for m, batch in enumerate(micro):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                labels = batch.pop("labels")
                last = m == len(micro) - 1
                with nullcontext() if last else no_sync():  # all-reduce once per step
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
            clip = fsdp_mod.clip_grad_norm if fsdp else accelerator.clip_grad_norm_
            grad_norm = float(clip([p for p in model.parameters() if p.requires_grad],
                                   args.max_grad_norm or float("inf")))
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
                if gen_eval is not None:  # generated on the main process, the score shared with all
                    row["eval_score"] = _sum_over_processes(gen_eval.run(unwrapped, autocast).score if main else 0.0,
                                                            accelerator)
                if tracking_best and stopper.observe(step + 1, row.get(args.metric_for_best)) and args.save_best:
                    _save_best(out, step + 1, stopper, setup, unwrapped, tokenizer, data, args, accelerator)
                ctx.stop_reason = ctx.stop_reason or stopper.stop_reason
                loop_eval_seconds += time.perf_counter() - t_ev
            history.append(row)
            steps_done = step + 1
            if log is not None:
                log.log(row)
                log_all(trackers, step_numbers(row), step + 1)
            bar.update(step + 1, step_loss, lr, row["seconds"])
            if sampler is not None and sampler.due(step + 1):
                t_ev = time.perf_counter()
                sampler.write(sampler.run(unwrapped, step + 1, autocast), log, bar.write)
                loop_eval_seconds += time.perf_counter() - t_ev
            if ctx.stop_reason:
                say(f"\n{ctx.stop_reason}")
                break
            if _any_process(stop.requested, accelerator):
                interrupted = True
                break
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                last_ckpt = _save_checkpoint(out, step + 1, model, optimizer, all_hooks, history, before, fp,
                                             trainable_names, args, total_steps, plan, accelerator, fsdp)
    bar.close()
    train_seconds = time.perf_counter() - t_train - loop_eval_seconds  # s/step excludes evaluation
    eval_seconds += loop_eval_seconds

    # -- the end: checkpoint, artifact, score after, report ---------------------------------------------
    last_ckpt = _save_checkpoint(out, steps_done, model, optimizer, all_hooks, history, before, fp,
                                 trainable_names, args, total_steps, plan, accelerator, fsdp)
    if interrupted:
        say(f"\ninterrupted at step {steps_done}/{total_steps}: checkpoint saved to {last_ckpt}. "
            f"Continue with: lorakit train ... --output-dir {out} --resume auto")
        close_trackers(trackers, "killed")
        return TrainResult(out, {}, True, steps_done, stop.signum)
    for hook in all_hooks:  # before the artifact: a hook may finalize the adapter (AdaLoRA's last cut)
        hook.on_train_end(ctx)
    artifact = out / setup.artifact
    save_artifact(accelerator, unwrapped, setup, artifact, tokenizer, trainable_names, fsdp)
    if main and data.label2id:  # a classifier's labels, for `lorakit eval/merge` to rebuild its head

        atomic_write_json(artifact / LABELS_FILE, data.label2id)
    # The quantized base this adapter was trained on, for `lorakit merge` (a GGUF base is the file itself).
    if main and args.quant not in ("none", "gguf"):
        from .qlora_record import write_qlora_record

        write_qlora_record(artifact, args)
    t_eval = time.perf_counter()
    after = _evaluate(model, unwrapped, tokenizer, data.eval, tasks, gen_eval, args, accelerator, pad_id, autocast,
                      fsdp)
    eval_seconds += time.perf_counter() - t_eval
    if tracking_best and (not args.eval_every or steps_done % args.eval_every):  # the last step was not evaluated
        value = (after.get("eval") or {}).get("loss") if args.metric_for_best == "eval_loss" else \
            _sum_over_processes((after.get("score") or {}).get("score", 0.0) if main else 0.0, accelerator)
        if stopper.observe(steps_done, value, final=True) and args.save_best:
            _save_best(out, steps_done, stopper, setup, unwrapped, tokenizer, data, args, accelerator)
    if main and gen_eval is not None and gen_eval.last is not None:
        write_generations(out / "generations.jsonl", gen_eval.last, steps_done)

    timing = RunTiming(train_seconds, eval_seconds, time.perf_counter() - t_start)
    metrics = run_metrics(
        args=args, loaded=loaded, model_name=model_name, out=out, world=world, counts=counts, data=data,
        steps=(start_step, steps_done, total_steps, ctx.stop_reason), history=history, timing=timing,
        estimate=estimate, peak_mb=peak_rss_mb(), before=before, after=after, tasks=tasks,
        score_how=gen_eval.describe() if gen_eval is not None else None,
        best=stopper.summary(out / BEST_DIR if args.save_best else None) if tracking_best else None,
        artifact=artifact, checkpoint=last_ckpt)
    if main:
        log.close()
        write_metrics(out / "metrics.json", metrics)
        log_all(trackers, eval_numbers(after), steps_done)
        for tracker in trackers:
            tracker.summary(summary_numbers(metrics), steps_done, out / "metrics.json")
        close_trackers(trackers, "finished")
        evals = [(0, before.get("eval")), (steps_done, after.get("eval"))]
        plot_loss(history, out / "loss.png", f"{model_name} · {args.method} · {data.train.source}",
                  [(s, e["loss"]) for s, e in evals if e])
        say("\n".join(["", "── summary " + "─" * 60, *summary_lines(metrics)]))
    return TrainResult(out, metrics, False, steps_done)


# -- pieces of the loop ----------------------------------------------------------------------------------
def _evaluate(model, unwrapped, tokenizer, eval_data, tasks: EvalTasks, gen_eval: GenerationEval | None,
              args: TrainArgs, accelerator, pad_id: int, autocast, sharded: bool = False) -> dict[str, Any]:
    """Eval loss on the eval data (all processes), built-in task accuracy (main process; every process
    under FSDP, whose forward passes are collective — they all score the same rows) and the generation
    score on the user's eval rows (main process)."""
    result: dict[str, Any] = {}
    if eval_data is not None:
        result["eval"] = evaluate_loss(model, eval_data.examples, pad_id, args.batch_size, accelerator,
                                       autocast).to_dict()
    if tasks.all and (accelerator.is_main_process or sharded):
        with autocast():
            scores = evaluate_tasks(unwrapped, tokenizer, tasks.all, n=args.eval_rows)
        if accelerator.is_main_process:
            result["tasks"] = {name: s.accuracy for name, s in scores.items()}
    if gen_eval is not None and accelerator.is_main_process:
        result["score"] = gen_eval.run(unwrapped, autocast).to_dict()
    accelerator.wait_for_everyone()
    return result


def _save_checkpoint(out: Path, step: int, model, optimizer, hooks, history, before, fp, trainable_names,
                     args: TrainArgs, total_steps: int, plan: BatchPlan, accelerator, sharded: bool) -> Path | None:
    from accelerate.utils import gather_object

    rng = ckpt.rng_state()
    rngs = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    main = accelerator.is_main_process
    if sharded:  # whole tensors gathered on the main process: the files of a one-process run
        trainable = dckpt.gather_trainable(accelerator.unwrap_model(model), trainable_names, main)
        optim_state = dckpt.gather_optimizer_state(optimizer, main)
    else:
        full_state = accelerator.get_state_dict(model)
        trainable = {n: full_state[n] for n in trainable_names}
        optim_state = optimizer.state_dict() if main else {}
    path = None
    if main:
        epoch, in_epoch = plan.position(step)
        path = ckpt.save_checkpoint(
            out / "checkpoints", step,
            trainable=trainable,
            optimizer=optim_state,
            schedule={"schedule": args.schedule, "warmup_steps": args.warmup_steps, "total_steps": total_steps},
            hooks=[h.state_dict() for h in hooks],
            rng=rngs,
            state={"history": history, "before": before, "fingerprint": fp, "args": args.to_dict(), "epoch": epoch,
                   "step_in_epoch": in_epoch, "steps_per_epoch": plan.steps_per_epoch},
            keep=args.keep_checkpoints,
        )
    accelerator.wait_for_everyone()
    return path


def _save_best(out: Path, step: int, stopper: EarlyStopping, setup, unwrapped, tokenizer, data, args: TrainArgs,
               accelerator) -> None:
    """The method's artifact as it is now, into ``out/best`` (atomically), with what the final artifact holds."""
    if accelerator.is_main_process:
        def fill(tmp: Path) -> None:
            setup.save(unwrapped, tmp, tokenizer)
            if data.label2id:
                atomic_write_json(tmp / LABELS_FILE, data.label2id)
            if args.quant not in ("none", "gguf"):
                from .qlora_record import write_qlora_record

                write_qlora_record(tmp, args)

        write_best(out / BEST_DIR, fill, step, stopper.metric, stopper.best_value)
    accelerator.wait_for_everyone()


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
