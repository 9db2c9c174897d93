"""One adapted projection alone: the LoRA branch's fwd + bwd cost over the frozen floor, A/B.

    python bench/bench_branch.py                              # N=1024 tokens, in=out=512, r=16, p=0.05
    python bench/bench_branch.py --in 576 --out 1536 --alt-src /tmp/old/src   # against an older lorakit

Each variant runs in its own subprocess (1 thread), interleaved rounds; inside, the floor (a frozen
``nn.Linear`` with an input gradient) and the same layer with a lorakit LoRA branch alternate, and
``time.thread_time`` medians of ``--reps`` fwd+bwd give the branch's overhead. Issue 15 item 1: the
passes over x per projection (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args) -> dict:
    import torch
    from torch import nn

    import lorakit

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def make(lora: bool) -> nn.Module:
        lin = nn.Linear(args.in_features, args.out_features, bias=False).requires_grad_(False)
        m = nn.Sequential(lin)
        if lora:
            lorakit.inject(m, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=["0"],
                                                 init_lora_weights=False))
        return m.train()

    x0 = torch.randn(4, args.tokens // 4, args.in_features)
    g = torch.randn(4, args.tokens // 4, args.out_features)

    def step(m):
        x = x0.clone().requires_grad_(True)
        m(x).backward(g)

    mods = {"floor": make(False), "lora": make(True)}
    times: dict[str, list[float]] = {k: [] for k in mods}
    for rep in range(args.reps + 3):
        for k, m in mods.items():
            t = time.thread_time()
            step(m)
            if rep >= 3:  # warm-up
                times[k].append(time.thread_time() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"floor_ms": med["floor"], "overhead_ms": med["lora"] - med["floor"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--in", dest="in_features", type=int, default=512)
    ap.add_argument("--out", dest="out_features", type=int, default=512)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alt-src", help="also run an older lorakit (its src dir first on PYTHONPATH) as 'alt'")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    variants = {"lorakit": here, **({"alt": os.path.abspath(args.alt_src)} if args.alt_src else {})}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tokens", str(args.tokens), "--in",
           str(args.in_features), "--out", str(args.out_features), "--dropout", str(args.dropout), "--reps", str(args.reps)]
    res: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for name, src in variants.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1"}
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1])
            res[name].append(r)
            print(f"round {rnd + 1} {name:8s} floor {r['floor_ms']:7.2f} ms  branch overhead {r['overhead_ms']:6.2f} ms  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nN={args.tokens} in={args.in_features} out={args.out_features} r=16 p={args.dropout}, 1 thread, thread_time")
    for name, rs in res.items():
        ov = [r["overhead_ms"] for r in rs]
        fl = statistics.median(r["floor_ms"] for r in rs)
        print(f"{name:8s} overhead median {statistics.median(ov):6.2f} ms (spread {min(ov):.2f} - {max(ov):.2f}), "
              f"floor {fl:.2f} ms, overhead / floor {statistics.median(ov) / fl:.2f}")
    if "alt" in res:
        per = [a["overhead_ms"] / b["overhead_ms"] for a, b in zip(res["lorakit"], res["alt"])]
        print(f"lorakit / alt overhead = {statistics.median(per):.2f}   per round {min(per):.2f} - {max(per):.2f}")


if __name__ == "__main__":
    main()
