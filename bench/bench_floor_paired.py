"""The LoRA step against the frozen floor and full fine-tuning, paired step by step in one process.

    python bench/bench_floor_paired.py --rounds 20                  # the bench shape (issue 15 §1)
    python bench/bench_floor_paired.py --shape smollm2 --rounds 8   # SmolLM2-135M's shape, random init
    python bench/bench_floor_paired.py --procs 3 --rounds 10        # the same in 3 fresh processes
    python bench/bench_floor_paired.py --unfused --only lorakit,lorakit-unfused --rounds 40   # an A/B alone

Why a second bench beside ``bench_lora.py``: there every mode runs in its own subprocess, and on this
VM one thread's CPU time for the same step differs 40-50 % between subprocesses (and between minutes,
as other jobs come and go). A ratio of two such medians cannot be pinned to ±10 %. Here the three
models live in one process and a round is one step of each, in a rotating order, back to back: slow
minutes and a slow process hit all three alike, and the figure is the median of the per-round ratios.

Models (same init, ``bench_lora.build``): ``floor`` — every weight frozen, the embeddings' output
requires grad, so backward runs through every layer with input gradients only (what any LoRA step
must pay at least); ``lorakit`` — lorakit LoRA r=16, alpha 32, dropout 0.05, all-linear, AdamW;
``full`` — full fine-tuning, AdamW; ``peft`` (``--peft``) — PEFT LoRA with the same config;
``lorakit-p0`` (``--p0``) — lorakit LoRA without dropout, to split the overhead into dropout and the rest;
``lorakit-unfused`` (``--unfused``) — lorakit with the base Linear run as its own node (``branch.set_fusion(False)``). The loss
is the model's own (full logits) in every mode; ``--ce`` gives every lorakit mode the chunked CE instead.
CPU time is ``time.process_time`` with one torch thread (``--threads``); wall time is printed too.
Peak memory is not measured here (the models share one heap): ``bench_lora.py`` does that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_lora  # noqa: E402  (build(), lora_kwargs())

GOALS = {("lorakit", "floor"): 1.10, ("lorakit", "full"): 0.75, ("lorakit", "peft"): 1.0,
         ("lorakit-unfused", "floor"): 99, ("lorakit", "lorakit-unfused"): 99,
         ("lorakit-p0", "floor"): 99, ("lorakit", "lorakit-p0"): 99}


def make_steps(args) -> dict:
    """mode -> a closure running one training step of that mode's model."""
    import torch

    steps = {}
    for mode in args.modes:
        model, ids = bench_lora.build(args)
        if mode == "floor":
            for p in model.parameters():
                p.requires_grad_(False)
        elif mode == "peft":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(**bench_lora.lora_kwargs()))
        elif mode in ("lorakit", "lorakit-p0", "lorakit-unfused"):
            import lorakit

            kw = {**bench_lora.lora_kwargs(), **({"lora_dropout": 0.0} if mode == "lorakit-p0" else {})}
            lorakit.inject(model, lorakit.LoraConfig(**kw))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        steps[mode] = _step(mode, model, ids, opt, args.ce)
    return steps


def _step(mode, model, ids, opt, ce: bool):
    embed = model.get_input_embeddings()

    def step() -> None:
        if mode.startswith("lorakit"):
            from lorakit.layers.branch import set_fusion

            set_fusion(mode != "lorakit-unfused")
        if mode == "floor":
            loss = model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss
        elif mode.startswith("lorakit") and ce:
            from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits

            with hidden_states_instead_of_logits(model) as head:
                hidden = model(input_ids=ids).logits
            loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean")
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def run_child(args) -> list[dict]:
    """Rounds of one step per mode, the order rotating each round; per-step CPU and wall seconds."""
    import torch

    torch.set_num_threads(args.threads)
    steps = make_steps(args)
    for step in steps.values():  # warm-up: first-touch pages, autograd caches, optimizer state
        step()
    rounds = []
    for r in range(args.rounds):
        order = args.modes[r % len(args.modes):] + args.modes[: r % len(args.modes)]
        row = {}
        for mode in order:
            t, c = time.perf_counter(), time.process_time()
            steps[mode]()
            row[mode] = (time.process_time() - c, time.perf_counter() - t)
        rounds.append(row)
        print(json.dumps({"round": r, **{m: round(v[0], 4) for m, v in row.items()}}), file=sys.stderr, flush=True)
    return rounds


def summarize(modes: list[str], rounds: list[dict]) -> None:
    print(f"{len(rounds)} paired rounds; load average now {os.getloadavg()[0]:.1f}")
    for k, label in ((0, "CPU"), (1, "wall")):
        print(f"\n[{label} s/step] mode   median   min - max   (interquartile)")
        for m in modes:
            xs = sorted(r[m][k] for r in rounds)
            q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
            print(f"{m:10s} {statistics.median(xs):8.3f}   {xs[0]:.3f} - {xs[-1]:.3f}   ({q[0]:.3f} - {q[2]:.3f})")
        print()
        for (a, b), goal in GOALS.items():
            if a in modes and b in modes:
                per = sorted(r[a][k] / r[b][k] for r in rounds)
                q = statistics.quantiles(per, n=4) if len(per) >= 2 else [per[0]] * 3
                med = statistics.median(per)
                verdict = ("OK" if med <= goal else "MISSED") if label == "CPU" else ""
                print(f"{a} / {b:6s} median of per-round ratios {med:.3f}   interquartile {q[0]:.3f} - {q[2]:.3f}"
                      f"   min - max {per[0]:.3f} - {per[-1]:.3f}   (goal <= {goal:.2f}) {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["bench", "smollm2"], default="bench")
    ap.add_argument("--quick", action="store_true", help="a tiny model, seconds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=10, help="paired rounds per process")
    ap.add_argument("--procs", type=int, default=1, help="fresh processes, run one after another")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peft", action="store_true", help="add PEFT LoRA as a mode")
    ap.add_argument("--p0", action="store_true", help="add lorakit LoRA without dropout (what dropout costs)")
    ap.add_argument("--ce", action="store_true", help="lorakit with the chunked cross-entropy")
    ap.add_argument("--unfused", action="store_true",
                    help="add lorakit with the base Linear and the branch as two nodes (branch.set_fusion(False))")
    ap.add_argument("--only", help="run only these modes, comma-separated (e.g. lorakit,lorakit-unfused for an A/B)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.modes = ["floor", "lorakit", "full"] + (["peft"] if args.peft else []) + (["lorakit-p0"] if args.p0 else [])
    args.modes += ["lorakit-unfused"] if args.unfused else []
    if args.only:
        wanted = [m.strip() for m in args.only.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(args.modes))
        if unknown or not wanted:
            sys.exit(f"--only {args.only!r}: choose among {args.modes} (add --peft / --p0 / --unfused for those modes)")
        args.modes = wanted
    if args.child:
        print(json.dumps(run_child(args)))
        return
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape, "--rounds", str(args.rounds),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    cmd += ["--only", ",".join(args.modes)]
    cmd += [flag for flag, on in (("--quick", args.quick), ("--peft", args.peft), ("--ce", args.ce), ("--p0", args.p0), ("--unfused", args.unfused))
            if on]
    rounds = []
    for p in range(args.procs):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"child process failed:\n{out.stderr[-4000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rounds += got
        a, b = ("lorakit", "floor") if "floor" in args.modes else (args.modes[0], args.modes[-1])
        print(f"process {p + 1}: {len(got)} rounds, {a} / {b} per-round median "
              f"{statistics.median(r[a][0] / r[b][0] for r in got):.3f}", flush=True)
    summarize(args.modes, rounds)


if __name__ == "__main__":
    main()
