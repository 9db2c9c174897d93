"""DoRA training-step time and memory: lorakit DoRA vs PEFT DoRA, both against lorakit's LoRA step.

    python bench/bench_dora.py                # Llama-shaped model of bench_lora.py (minutes on 2 cores)
    python bench/bench_dora.py --quick        # a small model, seconds

Goal (issue 9 §5): a lorakit DoRA step ≤ 1.3 × a lorakit LoRA step. PEFT's DoRA is run beside it for
reference (users report ≈ 2× a LoRA step). Setting: Llama-shaped model (hidden 512, intermediate
1376, 4 layers, vocab 8000), batch 4 × 256 tokens, r=16, lora_alpha=32, all-linear, AdamW, 2 threads;
``--dropout`` sets lora_dropout (default 0: PEFT then reuses the base output; with dropout > 0 PEFT
runs a second base matmul on the dropped input, lorakit does not — see adapter_kinds/dora.py).

Modes, each in a fresh subprocess (its own peak RSS), in interleaved rounds:
  lorakit-lora   lorakit LoRA          lorakit-dora   lorakit DoRA
  peft-lora      PEFT LoRA             peft-dora      PEFT DoRA (use_dora=True)
  lorakit-dora-nf4  lorakit DoRA on an NF4 + double-quantized base (fp32 compute)
Each mode times ``--steps`` steps after one warm-up and reports the median; the summary prints the
median over rounds, the spread (min–max of the rounds' medians) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ["lorakit-lora", "lorakit-dora", "peft-dora", "peft-lora", "lorakit-dora-nf4"]


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.quick:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    else:
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    return model, ids


def run_mode(mode: str, args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    model, ids = build(args)
    kw = dict(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules="all-linear")
    if mode.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**kw, use_dora=mode == "peft-dora"))
    else:
        import lorakit

        if mode.endswith("nf4"):
            lorakit.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
        lorakit.inject(model, lorakit.LoraConfig(**kw, use_dora="dora" in mode))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"mode": mode, "median_s": statistics.median(times), "peak_rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return

    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    base_cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--batch", str(args.batch),
                "--seq", str(args.seq), "--threads", str(args.threads), "--dropout", str(args.dropout)]
    base_cmd += ["--quick"] if args.quick else []
    for rnd in range(args.rounds):
        for mode in modes:
            out = subprocess.run(base_cmd + ["--child", mode], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(res)
            print(f"round {rnd + 1} {mode:17s} {res['median_s']:.3f} s/step  peak RSS {res['peak_rss_mib']:.0f} MiB",
                  flush=True)

    med = {m: statistics.median(r["median_s"] for r in rs) for m, rs in results.items()}
    lo = {m: min(r["median_s"] for r in rs) for m, rs in results.items()}
    hi = {m: max(r["median_s"] for r in rs) for m, rs in results.items()}
    rss = {m: statistics.median(r["peak_rss_mib"] for r in rs) for m, rs in results.items()}
    print("\nmode               median s/step   spread (min–max)    peak RSS MiB")
    for m in modes:
        print(f"{m:18s} {med[m]:13.3f}   {lo[m]:.3f}–{hi[m]:.3f}       {rss[m]:12.0f}")

    print()
    for a, b, goal in [("lorakit-dora", "lorakit-lora", 1.30), ("peft-dora", "lorakit-lora", None),
                       ("peft-dora", "peft-lora", None), ("lorakit-dora", "peft-dora", None),
                       ("lorakit-dora-nf4", "lorakit-dora", None)]:
        if a in med and b in med:
            r = med[a] / med[b]
            verdict = f"(goal <= {goal:.2f})  {'OK' if r <= goal else 'MISSED'}" if goal else ""
            print(f"{a:17s} / {b:13s} = {r:5.2f}   {verdict}")
    if "lorakit-dora" in rss and "peft-dora" in rss:
        print(f"peak RSS lorakit-dora / peft-dora = {rss['lorakit-dora'] / rss['peft-dora']:.3f}")


if __name__ == "__main__":
    main()
