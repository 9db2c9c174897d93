"""AdaLoRA vs LoRA, side by side in one run: per-step training time, and quality at an equal budget.

    python bench/bench_adalora.py                       # timing only (a few minutes on 1 CPU thread)
    python bench/bench_adalora.py --peft                # … and PEFT's LoRA / AdaLoRA on the same model
    python bench/bench_adalora.py --quality --seeds 0 1 2   # + `lorakit train` LoRA vs AdaLoRA on the
                                                        #   embedded model's default task (or --model DIR)

**Timing.** A small Llama-shaped model (random init, built from a config), all linear layers adapted.
Every method trains on the same batches with AdamW; the methods take turns (one block of steps each,
``--rounds`` times) so that drift in machine load hits them alike, and each reports the median of its
per-step wall times. One step = forward, backward, optimizer step and, for AdaLoRA, what its hook does
(orthogonal regulariser, importance update, masking). Compared:

* ``lora r=R``                      the baseline;
* ``adalora budgeting ΔT=1``        init_r = 1.5·R, masking after *every* step (the worst case);
* ``adalora budgeting ΔT=10``       masking every 10 steps (the paper's settings use 10–100);
* ``adalora after cut``             the final allocation made and the factors cut to b(T) = R·matrices.

The paper (Zhang et al. 2023) reports AdaLoRA's training time at +11 % to +16 % over LoRA's.
The whole-run overhead of lorakit's AdaLoRA is the step-weighted mix of the phases (printed, using
``--method adalora``'s default t_i = 10 %, t_f = 30 % of the run).

**Quality.** ``lorakit train`` with ``--method lora --r R`` and ``--method adalora --r R`` (the same final
budget: target_r = R, init_r = ⌈1.5·R⌉) per seed; reports eval loss / accuracy and the task accuracy after
training from each run's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorakit  # noqa: E402
from lorakit.train.hooks import HookContext  # noqa: E402
from lorakit.variants.adalora import AdaLoraConfig, AdaLoraHook, inject_adalora  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(args, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=args.hidden // 64, vocab_size=args.vocab, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


# -- timing ------------------------------------------------------------------------------------------
class Runner:
    """One method on its own model copy; ``steps(k)`` trains k steps and returns their wall times."""

    def __init__(self, name, model, batches, hook=None, peft_alloc=None, total=10**6):
        self.name, self.model, self.batches, self.hook, self.peft_alloc = name, model, batches, hook, peft_alloc
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.ctx = HookContext(model=model, optimizer=self.opt, step=0, total_steps=total)
        self.t = 0
        self.times: list[float] = []
        model.train()
        if hook is not None:
            hook.on_train_start(self.ctx)

    def steps(self, k):
        for _ in range(k):
            ids = self.batches[self.t % len(self.batches)]
            t0 = time.perf_counter()
            self.ctx.step = self.t
            loss = self.model(input_ids=ids, labels=ids).loss
            if self.hook is not None:
                extra = self.hook.extra_loss(self.ctx)
                loss = loss + extra if extra is not None else loss
            loss.backward()
            if self.hook is not None:
                self.hook.after_backward(self.ctx)
            self.ctx.optimizer.step()
            if self.peft_alloc is not None:
                self.peft_alloc(self.t)  # PEFT's documented place: after step, before zero_grad
            self.ctx.optimizer.zero_grad(set_to_none=True)
            if self.hook is not None:
                self.hook.after_step(self.ctx)
            self.times.append(time.perf_counter() - t0)
            self.t += 1


def timing(args):
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(8)]
    r, init_r = args.r, math.ceil(1.5 * args.r)
    runners = [Runner(f"lora r={r}", lorakit.inject(llama(args), lorakit.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=TARGETS)), batches)]

    def adalora(delta_t, name):
        cfg = AdaLoraConfig(init_r=init_r, target_r=r, lora_alpha=2 * r, target_modules=TARGETS, tinit=0,
                            tfinal=0, deltaT=delta_t, total_step=10**6)
        model = inject_adalora(llama(args), cfg)
        return Runner(name, model, batches, hook=AdaLoraHook(report=False, verbose=False))

    runners.append(adalora(1, f"adalora budgeting ΔT=1 (init_r={init_r})"))
    runners.append(adalora(10, f"adalora budgeting ΔT=10 (init_r={init_r})"))
    cut = adalora(1, f"adalora after cut (b(T)={r}·matrices)")
    cut.steps(3)  # some importance history, then the final allocation and the cut
    cut.hook.allocator.finalize(cut.model, cut.opt, cut=True)
    cut.times.clear()
    runners.append(cut)
    if args.peft:
        import peft

        warnings.filterwarnings("ignore")
        pl = peft.get_peft_model(llama(args), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        runners.append(Runner(f"peft lora r={r}", pl, batches))
        pa = peft.get_peft_model(llama(args), peft.AdaLoraConfig(
            init_r=init_r, target_r=r, lora_alpha=2 * r, target_modules=TARGETS, tinit=0, tfinal=0, deltaT=1,
            total_step=10**6))
        runners.append(Runner(f"peft adalora budgeting ΔT=1 (init_r={init_r})", pa, batches,
                              peft_alloc=pa.base_model.update_and_allocate))
    for run in runners:  # warm-up, not timed
        run.steps(args.warmup)
        run.times.clear()
    per_round = {run.name: [] for run in runners}  # each method's median step time in each round
    for _ in range(args.rounds):
        for run in runners:
            run.steps(args.block)
            per_round[run.name].append(statistics.median(run.times[-args.block:]))
    base = statistics.median(runners[0].times)
    rows = []
    print(f"\nper-step time, {args.rounds} rounds × {args.block} steps, {args.threads} thread(s); model: "
          f"Llama {args.layers}×{args.hidden}, batch {args.batch}×{args.seq} tokens, targets {', '.join(TARGETS)}")
    print("'paired' = median over rounds of (this method / LoRA in the same round): robust to load drift")
    print(f"{'method':48s} {'median ms':>10s} {'vs LoRA':>8s} {'paired':>8s} {'trainable':>10s}")
    paired = {}
    for run in runners:
        med = statistics.median(run.times)
        paired[run.name] = statistics.median(a / b for a, b in zip(per_round[run.name], per_round[runners[0].name]))
        n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        print(f"{run.name:48s} {1e3 * med:10.2f} {med / base:7.3f}× {paired[run.name]:7.3f}× {n:10,d}")
        rows.append({"method": run.name, "median_ms": 1e3 * med, "ratio": med / base,
                     "paired_ratio": paired[run.name], "trainable": n})
    ada, after = paired[runners[1].name], paired[runners[3].name]
    tf = 0.3  # --method adalora's default t_f: the last 30 % of the run is cut; before it, uncut
    mix = (1 - tf) * ada + tf * after
    print(f"whole run (ΔT=1, t_i=10 %, t_f=30 %, paired ratios): {mix:.3f}× LoRA (paper: 1.11–1.16×)")
    return {"rows": rows, "whole_run_ratio": mix}


# -- quality -------------------------------------------------------------------------------------------
def quality(args):
    from lorakit.train.args import EMBEDDED_DEFAULTS, TrainArgs
    from lorakit.train.loop import train

    out = {}
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_adalora_"))
    # AdaLoRA starts from λ = 0, so P and Q get no gradient until λ grows (∂L/∂P ∝ diag(λ)); it needs a
    # larger learning rate than LoRA. Each method runs at its own lr; LoRA also at AdaLoRA's, for fairness.
    embedded = not (args.model or args.data)
    lora_lr = args.lora_lr or (EMBEDDED_DEFAULTS["lr"] if embedded else TrainArgs.__dataclass_fields__["lr"].default)
    plans = [("lora", lora_lr), ("lora", args.adalora_lr), ("adalora", args.adalora_lr)]
    for method, lr in plans:
        for seed in args.seeds:
            run_dir = root / f"{method}-lr{lr:g}-s{seed}"
            # The same settings as `lorakit train` on the embedded model (lr, batch, steps, rows).
            kw = dict(EMBEDDED_DEFAULTS) if embedded else {}
            kw.update(method=method, r=args.r, seed=seed, output_dir=str(run_dir), overwrite=True,
                      threads=args.threads, progress=False)
            if args.steps:
                kw["max_steps"] = args.steps
            kw["lr"] = lr
            if args.model:
                kw["model"] = args.model
            if args.data:
                kw["data"] = args.data
            res = train(TrainArgs(**kw))
            m = res.metrics
            out[f"{method}-lr{lr:g}-s{seed}"] = {
                "trainable": m["parameters"]["trainable"], "eval_after": m["eval"]["after"],
                "tasks_after": m["tasks"]["after"], "train_seconds": m["time"]["train_seconds"],
            }
    print(f"\nequal final budget (r={args.r}; AdaLoRA init_r={math.ceil(1.5 * args.r)} → target_r={args.r}), "
          f"seeds {args.seeds}:")
    for key, v in out.items():
        ev = v["eval_after"] or {}
        print(f"{key:14s} eval loss {ev.get('loss', float('nan')):.4f}  acc {ev.get('accuracy', float('nan')):.3f}"
              f"  tasks {json.dumps(v['tasks_after'])}  train {v['train_seconds']:.1f} s  trainable {v['trainable']:,}")
    target = None
    for method, lr in plans:
        runs = [out[f"{method}-lr{lr:g}-s{s}"] for s in args.seeds]
        target = target or next(iter(runs[0]["tasks_after"]), None)
        accs = [r["tasks_after"].get(target) for r in runs]
        kept = [statistics.mean(v for k, v in r["tasks_after"].items() if k != target) for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{method:8s} lr {lr:<6g} {target} exact-match {statistics.mean(accs):.3f} ± {sd:.3f}   "
              f"base tasks kept {statistics.mean(kept):.3f}   (seeds {args.seeds})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--r", type=int, default=8, help="LoRA rank = AdaLoRA target_r (init_r = ⌈1.5 r⌉)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=3, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--peft", action="store_true", help="also time PEFT's LoRA and AdaLoRA")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--quality", action="store_true", help="also run lorakit train: LoRA vs AdaLoRA")
    p.add_argument("--model", help="model directory for --quality (default: the embedded model)")
    p.add_argument("--data", help="training data for --quality (default: the model's default task)")
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA's lr for --quality (default: the recipe's)")
    p.add_argument("--adalora-lr", type=float, default=1e-2, help="AdaLoRA's lr for --quality")
    p.add_argument("--steps", type=int, default=None, help="max_steps for --quality (default: the recipe's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="where --quality runs go (default: a temporary directory)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = {"args": vars(args)}
    if not args.no_timing:
        results["timing"] = timing(args)
    if args.quality:
        results["quality"] = quality(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
