"""LoRA training-step time and memory: lorakit vs PEFT vs full fine-tuning vs the frozen floor.

    python bench/bench_lora.py                # the issue's setting (takes a few minutes on 2 cores)
    python bench/bench_lora.py --quick        # a small model, seconds
    python bench/bench_lora.py --shape smollm2 --modes floor,full,peft,lorakit,lorakit-ce
                                              # SmolLM2-135M's shape (random init), issue 15
    python bench/bench_lora.py --compare-dropout   # per-projection dropout masks vs the shared-mask option

Setting (issue 2 §8): Llama-shaped model (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab
8000), batch 4 × 256 tokens, r=16, lora_alpha=32, lora_dropout=0.05, all-linear, AdamW, 2 threads.

Modes, each in a fresh subprocess (so peak RSS is its own), run in interleaved rounds:
  floor    back-propagation through the frozen model with no weight gradients (input grads only)
  full     full fine-tuning
  peft     PEFT LoRA
  lorakit  lorakit LoRA (the loss from the model's full logits, as the others)
  lorakit-ce  lorakit LoRA with lorakit.losses' chunked cross-entropy (never the full logits)
  lorakit-bf16  lorakit LoRA under torch.autocast("cpu", bfloat16) (fp32 weights and factors), issue 15 §3
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

MODES = ["floor", "full", "peft", "lorakit", "lorakit-ce", "lorakit-bf16", "qlora", "infer-base", "infer-lorakit", "infer-merged"]
DROPOUT_MODES = ["lorakit", "lorakit-shared", "peft"]


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.shape == "smollm2":
        # SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, GQA 9/3 heads, vocab 49,152, tied.
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                          tie_word_embeddings=True)
    elif args.quick:
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
    elif mode in ("lorakit", "lorakit-ce", "lorakit-bf16", "lorakit-shared", "infer-lorakit", "infer-merged"):
        import lorakit
        from lorakit.layers.host import share_dropout_masks

        lorakit.inject(model, lorakit.LoraConfig(**lora_kwargs()))
        if mode == "lorakit-shared":
            share_dropout_masks(model)
        if mode == "infer-merged":
            lorakit.merge(model)
        model.train(mode in ("lorakit", "lorakit-ce", "lorakit-bf16", "lorakit-shared"))
    else:
        model.eval()

    times, cpu = [], []
    if mode.startswith("infer"):
        model.eval()
        with torch.no_grad():
            for i in range(args.steps + 1):
                t, c = time.perf_counter(), time.process_time()
                model(input_ids=ids)
                if i:
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        embed = model.get_input_embeddings()
        for i in range(args.steps + 1):
            t, c = time.perf_counter(), time.process_time()
            if mode == "floor":
                # Make the embeddings' output require grad so backward runs through every layer while
                # no weight gets a gradient: the cost any LoRA step must pay at least.
                x = embed(ids).detach().requires_grad_(True)
                out = model(inputs_embeds=x, labels=ids)
            elif mode == "lorakit-ce":
                from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits

                with hidden_states_instead_of_logits(model) as head:
                    hidden = model(input_ids=ids).logits
                loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean")
            elif mode == "lorakit-bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(input_ids=ids, labels=ids)
            else:
                out = model(input_ids=ids, labels=ids)
            (loss if mode == "lorakit-ce" else out.loss).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"mode": mode, "median_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_rss_mib": rss,
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", choices=["bench", "smollm2"], default="bench")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--compare-dropout", action="store_true", help=f"modes {','.join(DROPOUT_MODES)}")
    ap.add_argument("--alt-src", help="A/B: modes named MODE@alt run MODE with this src dir first on "
                    "PYTHONPATH (e.g. an exported older lorakit: git archive HEAD~1 src | tar -x -C /tmp/old)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return

    modes = DROPOUT_MODES if args.compare_dropout else args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    base_cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--batch", str(args.batch),
                "--seq", str(args.seq), "--threads", str(args.threads), "--shape", args.shape] + (["--quick"] if args.quick else [])
    for rnd in range(args.rounds):
        for mode in modes:
            # Every mode runs with OpenMP threads that sleep rather than spin (what the lorakit command
            # sets; see bench/bench_threads.py): on a shared box spinning slows every mode several-fold.
            env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
            child = mode
            if mode.endswith("@alt"):
                child = mode[:-4]
                env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(args.alt_src), env.get("PYTHONPATH", "")])
            out = subprocess.run(base_cmd + ["--child", child], capture_output=True, text=True, check=True, env=env)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(res)
            print(f"round {rnd + 1} {mode:14s} {res['median_s']:.3f} s/step wall  {res['cpu_s']:.3f} s/step CPU  "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB  load {res['load']:.1f}", flush=True)
    summarize(modes, results)


def summarize(modes: list[str], results: dict[str, list[dict]]) -> None:
    """Medians over rounds, spread, ratios; for wall time and for CPU time (process time: on a shared
    box it counts this process's work only, so with --threads 1 it is the robust figure)."""
    rss = {m: statistics.median(r["peak_rss_mib"] for r in rs) for m, rs in results.items()}
    loads = [r["load"] for rs in results.values() for r in rs]
    print(f"\nload average (1 min) during the runs: median {statistics.median(loads):.1f}, "
          f"{min(loads):.1f} - {max(loads):.1f}")
    for key, label in (("median_s", "wall"), ("cpu_s", "CPU")):
        med = {m: statistics.median(r[key] for r in rs) for m, rs in results.items()}
        print(f"\n[{label} time] mode      median s/step   spread (min-max over rounds)   peak RSS MiB")
        for m in modes:
            lo, hi = min(r[key] for r in results[m]), max(r[key] for r in results[m])
            print(f"{m:15s} {med[m]:13.3f}   {lo:7.3f} - {hi:7.3f}                 {rss[m]:12.0f}")

        def ratio(a, b, goal, med=med, key=key):
            if a in med and b in med:
                r = med[a] / med[b]
                per_round = [x[key] / y[key] for x, y in zip(results[a], results[b])]
                print(f"{a} / {b:13s} = {r:5.2f}   per round {min(per_round):.2f} - {max(per_round):.2f}"
                      f"   (goal <= {goal:.2f})  {'OK' if r <= goal else 'MISSED'}")

        print()
        ratio("lorakit", "floor", 1.10)
        ratio("lorakit", "full", 0.75)
        ratio("lorakit-ce", "floor", 1.10)
        ratio("lorakit-ce", "full", 0.75)
        ratio("lorakit-ce", "peft", 1.00)
        ratio("lorakit-bf16", "lorakit", 99)
        ratio("peft", "full", 99)
        ratio("qlora", "lorakit", 1.30)
        ratio("infer-lorakit", "infer-base", 1.10)
        ratio("infer-merged", "infer-base", 1.05)
        ratio("lorakit-shared", "lorakit", 99)
        for m in modes:
            if m.endswith("@alt"):
                ratio(m[:-4], m, 99)
    print()
    if "lorakit" in rss and "peft" in rss:
        print(f"peak RSS lorakit / peft = {rss['lorakit'] / rss['peft']:.3f}   (goal <= 1.00)")
    if "lorakit-ce" in rss and "peft" in rss:
        print(f"peak RSS lorakit-ce / peft = {rss['lorakit-ce'] / rss['peft']:.3f}   (goal <= 0.60, issue 15)")
    if "lorakit-bf16" in rss and "lorakit" in rss:
        print(f"peak RSS lorakit-bf16 / lorakit = {rss['lorakit-bf16'] / rss['lorakit']:.3f}")
    if "lorakit" in rss and "lorakit-shared" in rss:
        print(f"peak RSS lorakit-shared / lorakit = {rss['lorakit-shared'] / rss['lorakit']:.3f}")


if __name__ == "__main__":
    main()
