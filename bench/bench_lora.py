"""LoRA training-step time and memory: lorakit vs PEFT vs full fine-tuning vs the frozen floor.

    python bench/bench_lora.py                # the issue's setting (takes a few minutes on 2 cores)
    python bench/bench_lora.py --quick        # a small model, seconds
    python bench/bench_lora.py --compare-dropout   # per-projection dropout masks vs the shared-mask option

Setting (issue 2 §8): Llama-shaped model (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab
8000), batch 4 × 256 tokens, r=16, lora_alpha=32, lora_dropout=0.05, all-linear, AdamW, 2 threads.

Modes, each in a fresh subprocess (so peak RSS is its own), run in interleaved rounds:
  floor    back-propagation through the frozen model with no weight gradients (input grads only)
  full     full fine-tuning
  peft     PEFT LoRA
  lorakit  lorakit LoRA (independent dropout mask per projection, the default)
  lorakit-shared  lorakit LoRA with ``share_dropout_masks`` (one mask per input tensor)
  qlora    lorakit LoRA on an NF4 + double-quantized base (fp32 compute), issue 3's QLoRA-vs-LoRA goal
  infer-*  no-grad forward: base, lorakit unmerged, lorakit merged
Each mode times ``--steps`` steps after one warm-up and reports the median; the summary prints the
median over rounds and the ratios the issue sets goals for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ["floor", "full", "peft", "lorakit", "qlora", "infer-base", "infer-lorakit", "infer-merged"]
DROPOUT_MODES = ["lorakit", "lorakit-shared", "peft"]


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


def lora_kwargs():
    return dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def run_mode(mode: str, args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    model, ids = build(args)
    if mode == "full":
        model.train()
    elif mode == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
    elif mode in ("peft",):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs()))
        model.train()
    elif mode == "qlora":
        import lorakit

        lorakit.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
        lorakit.inject(model, lorakit.LoraConfig(**lora_kwargs()))
        model.train()
    elif mode in ("lorakit", "lorakit-shared", "infer-lorakit", "infer-merged"):
        import lorakit
        from lorakit.layers.host import share_dropout_masks

        lorakit.inject(model, lorakit.LoraConfig(**lora_kwargs()))
        if mode == "lorakit-shared":
            share_dropout_masks(model)
        if mode == "infer-merged":
            lorakit.merge(model)
        model.train(mode in ("lorakit", "lorakit-shared"))
    else:
        model.eval()

    times = []
    if mode.startswith("infer"):
        model.eval()
        with torch.no_grad():
            for i in range(args.steps + 1):
                t = time.perf_counter()
                model(input_ids=ids)
                if i:
                    times.append(time.perf_counter() - t)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        embed = model.get_input_embeddings()
        for i in range(args.steps + 1):
            t = time.perf_counter()
            if mode == "floor":
                # Make the embeddings' output require grad so backward runs through every layer while
                # no weight gets a gradient: the cost any LoRA step must pay at least.
                x = embed(ids).detach().requires_grad_(True)
                out = model(inputs_embeds=x, labels=ids)
            else:
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"mode": mode, "median_s": statistics.median(times), "peak_rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--compare-dropout", action="store_true", help=f"modes {','.join(DROPOUT_MODES)}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return

    modes = DROPOUT_MODES if args.compare_dropout else args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    base_cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--batch", str(args.batch),
                "--seq", str(args.seq), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    for rnd in range(args.rounds):
        for mode in modes:
            out = subprocess.run(base_cmd + ["--child", mode], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(res)
            print(f"round {rnd + 1} {mode:14s} {res['median_s']:.3f} s/step  peak RSS {res['peak_rss_mib']:.0f} MiB",
                  flush=True)

    med = {m: statistics.median(r["median_s"] for r in rs) for m, rs in results.items()}
    rss = {m: statistics.median(r["peak_rss_mib"] for r in rs) for m, rs in results.items()}
    print("\nmode            median s/step   spread (min-max over rounds)   peak RSS MiB")
    for m in modes:
        lo, hi = min(r["median_s"] for r in results[m]), max(r["median_s"] for r in results[m])
        print(f"{m:15s} {med[m]:13.3f}   {lo:7.3f} - {hi:7.3f}                 {rss[m]:12.0f}")

    def ratio(a, b, goal, cmp="<="):
        if a in med and b in med:
            r = med[a] / med[b]
            ok = r <= goal
            print(f"{a} / {b:13s} = {r:5.2f}   (goal {cmp} {goal:.2f})  {'OK' if ok else 'MISSED'}")

    print()
    ratio("lorakit", "floor", 1.10)
    ratio("lorakit", "full", 0.75)
    ratio("lorakit", "peft", 0.65)
    ratio("peft", "full", 99)
    ratio("qlora", "lorakit", 1.30)
    ratio("infer-lorakit", "infer-base", 1.10)
    ratio("infer-merged", "infer-base", 1.05)
    ratio("lorakit-shared", "lorakit", 99)
    if "lorakit" in rss and "peft" in rss:
        print(f"peak RSS lorakit / peft = {rss['lorakit'] / rss['peft']:.3f}   (goal <= 1.00)")
    if "lorakit" in rss and "lorakit-shared" in rss:
        print(f"peak RSS lorakit-shared / lorakit = {rss['lorakit-shared'] / rss['lorakit']:.3f}")


if __name__ == "__main__":
    main()
