"""Where a LoRA step's time goes over the frozen floor: torch.profiler, op by op, one process.

    python bench/profile_lora.py                       # the bench shape (issue 2 §8)
    python bench/profile_lora.py --shape smollm2 --layers 6   # SmolLM2-135M's shape, fewer layers

Runs ``--steps`` profiled steps of the floor (input gradients only) and of lorakit LoRA (r=16,
all-linear, dropout 0.05) on the same model, and prints the self-CPU time per op for each and the
difference, largest first: the ops a LoRA step adds (or makes slower) over the floor.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_lora  # noqa: E402  (build(), lora_kwargs())


def profile(mode: str, args) -> dict[str, tuple[float, int]]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    model, ids = bench_lora.build(args)
    if mode == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
    elif mode == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**bench_lora.lora_kwargs()))
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(**{**bench_lora.lora_kwargs(), "lora_dropout": args.dropout}))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step():
        if mode == "floor":
            out = model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids)
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    table: dict[str, tuple[float, int]] = collections.defaultdict(lambda: (0.0, 0))
    for ev in prof.key_averages():
        t, n = table[ev.key]
        table[ev.key] = (t + ev.self_cpu_time_total / 1e3 / args.steps, n + ev.count // args.steps)
    return dict(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["bench", "smollm2"], default="bench")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (profiling only)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--modes", default="floor,lorakit")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    args.quick = False
    import torch

    torch.set_num_threads(args.threads)
    if args.layers is not None:
        orig = bench_lora.build

        def build(a):
            from transformers import LlamaConfig

            real_init = LlamaConfig.__init__

            def init(self, *p, **kw):
                real_init(self, *p, **kw)
                self.num_hidden_layers = args.layers

            LlamaConfig.__init__ = init
            try:
                return orig(a)
            finally:
                LlamaConfig.__init__ = real_init

        bench_lora.build = build
    modes = args.modes.split(",")
    tables = {m: profile(m, args) for m in modes}
    ref = tables[modes[0]]
    keys = set().union(*tables.values())
    totals = {m: sum(t for t, _ in tab.values()) for m, tab in tables.items()}
    print(f"self-CPU ms per step (shape {args.shape}, layers {args.layers or 'all'}, {args.threads} threads)")
    print("total: " + "  ".join(f"{m} {totals[m]:.1f}" for m in modes))
    head = f"{'op':42s}" + "".join(f"{m:>14s}" for m in modes) + "".join(f"{'Δ ' + m:>14s}" for m in modes[1:])
    print(head)
    last = tables[modes[-1]]
    rows = sorted(keys, key=lambda k: -(last.get(k, (0, 0))[0] - ref.get(k, (0, 0))[0]))
    for k in rows[:args.top]:
        vals = "".join(f"{tables[m].get(k, (0, 0))[0]:9.1f} ×{tables[m].get(k, (0, 0))[1]:<4d}" for m in modes)
        deltas = "".join(f"{tables[m].get(k, (0, 0))[0] - ref.get(k, (0, 0))[0]:14.1f}" for m in modes[1:])
        print(f"{k[:42]:42s}{vals}{deltas}")


if __name__ == "__main__":
    main()
