"""One adapted nn.Linear, fwd + bwd: the frozen floor, lorakit fused (base and branch in one node) and
lorakit unfused (``branch.set_fusion(False)``: the base as its own node, the branch added by ``addmm_``,
autograd summing the two ∂x), interleaved in one process.

    python bench/bench_fused_linear.py                  # SmolLM2-135M's four projection shapes, N = 1024
    python bench/bench_fused_linear.py --rounds 60 --dropout 0
    python bench/bench_fused_linear.py --profile --dropout 0   # torch.profiler op tables, 576 -> 576

Per round, each shape runs floor, fused and unfused back to back (order rotating); the figures are the
medians of per-round CPU-time ratios (``time.process_time``, one thread), with their interquartile range,
so a slow minute of this shared VM hits the three alike. The floor is the same Linear, frozen, with the
input gradient only (what any LoRA step pays for the projection). r = 16, alpha 32, all fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down of SmolLM2-135M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--profile", action="store_true",
                    help="instead: torch.profiler self-CPU op tables of 20 fwd+bwd, floor and fused, 576 -> 576")
    args = ap.parse_args()

    import torch
    from torch import nn

    import lorakit
    from lorakit.layers.branch import set_fusion

    torch.set_num_threads(1)
    setups = []
    for fan_in, fan_out in SHAPES:
        torch.manual_seed(0)
        floor = nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False)
        lora = nn.Sequential(nn.Linear(fan_in, fan_out, bias=False))
        lora[0].weight.data.copy_(floor.weight)
        lorakit.inject(lora, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=["0"],
                                                init_lora_weights=False))
        lora.train()
        x = torch.randn(args.tokens, fan_in, requires_grad=True)
        g = torch.randn(args.tokens, fan_out)
        setups.append(((fan_in, fan_out), floor, lora, x, g))

    def step(model, x, g) -> float:
        t = time.process_time()
        model(x).backward(g)
        dt = time.process_time() - t
        x.grad = None
        for p in model.parameters():
            p.grad = None
        return dt

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        _, floor, lora, x, g = setups[0]
        for name, model in (("floor", floor), ("fused", lora)):
            for _ in range(5):
                step(model, x, g)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    step(model, x, g)
            print(name, "(20 fwd + bwd)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return

    modes = ["floor", "fused", "unfused"]
    times: dict = {}
    for r in range(args.rounds + 2):
        for key, floor, lora, x, g in setups:
            order = modes[r % 3:] + modes[: r % 3]
            row = {}
            for mode in order:
                if mode == "floor":
                    row[mode] = step(floor, x, g)
                else:
                    was = set_fusion(mode == "fused")
                    row[mode] = step(lora, x, g)
                    set_fusion(was)
            if r >= 2:  # two warm-up rounds
                times.setdefault(key, []).append(row)

    def q(xs):
        qs = statistics.quantiles(xs, n=4)
        return f"{statistics.median(xs):.3f} ({qs[0]:.3f}-{qs[2]:.3f})"

    print(f"N = {args.tokens}, r = 16, p = {args.dropout}, {args.rounds} rounds; ms are medians, ratios are "
          "medians of per-round ratios (interquartile range)")
    print(f"{'in -> out':12s} {'floor ms':>9s} {'fused ms':>9s} {'unfused ms':>10s}   {'fused/floor':>20s}   "
          f"{'unfused/floor':>20s}   {'fused/unfused':>20s}")
    for key, rows in times.items():
        ms = {m: statistics.median(r[m] for r in rows) * 1e3 for m in modes}
        print(f"{key[0]:>4d} -> {key[1]:<4d}  {ms['floor']:9.2f} {ms['fused']:9.2f} {ms['unfused']:10.2f}   "
              f"{q([r['fused'] / r['floor'] for r in rows]):>20s}   {q([r['unfused'] / r['floor'] for r in rows]):>20s}   "
              f"{q([r['fused'] / r['unfused'] for r in rows]):>20s}")


if __name__ == "__main__":
    main()
