"""Threads on a shared CPU: a LoRA step at 1 and 2 threads, with and without OpenMP spin-waiting.

    python bench/bench_threads.py                     # as the box is
    python bench/bench_threads.py --load 1            # with one busy process beside it (a loaded box)

torch's CPU build runs its parallel regions on GNU OpenMP, whose idle threads spin (busy-wait) for a
while before sleeping (OMP_WAIT_POLICY / GOMP_SPINCOUNT). When another process holds a core, a spinning
thread and the thread it waits for fight over the same core, and each parallel region stalls for a
scheduler time slice. Each setting runs in its own process (OpenMP reads the variables once, at start),
in interleaved rounds; the table gives medians and min-max per setting.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "1 thread": {"threads": 1, "env": {}},
    "2 threads, spin (torch default)": {"threads": 2, "env": {"OMP_WAIT_POLICY": "ACTIVE"}},
    "2 threads, passive (lorakit default)": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
}


def child(threads: int, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=4000)
    model = lorakit.inject(LlamaForCausalLM(cfg), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, 4000, (4, 128))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if i:
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times)}


def _burn(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--load", type=int, default=0, help="busy processes to run beside the benchmark")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    results: dict[str, list[float]] = {k: [] for k in SETTINGS}
    try:
        for rnd in range(args.rounds):
            for name, s in SETTINGS.items():
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LORAKIT_OMP_WAIT_POLICY")}
                env.update(s["env"])
                env["LORAKIT_OMP_WAIT_POLICY"] = "keep"  # measure the setting itself, not lorakit's default
                out = subprocess.run([sys.executable, __file__, "--child", str(s["threads"]), "--steps", str(args.steps)],
                                     capture_output=True, text=True, check=True, env=env)
                t = json.loads(out.stdout.strip().splitlines()[-1])["median_s"]
                results[name].append(t)
                print(f"round {rnd + 1}  {name:38s} {t:.3f} s/step", flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join()
    print(f"\nload: {args.load} busy process(es) beside the benchmark, {os.cpu_count()} CPUs")
    base = statistics.median(results["1 thread"])
    for name, ts in results.items():
        m = statistics.median(ts)
        print(f"{name:38s} median {m:.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  {m / base:.2f}x 1 thread")


if __name__ == "__main__":
    main()
