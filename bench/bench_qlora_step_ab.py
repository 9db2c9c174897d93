"""LoRA vs QLoRA training steps in ONE process, alternating step by step: the compiled 4-bit kernel vs the
numpy dequantization, and both against the 16-bit LoRA step (issue 14's ≤ 1.3× bar).

    python bench/bench_qlora_step_ab.py [--rounds 8] [--batch 1] [--seq 64] [--dir DIR]

``bench_qlora_mem.py`` runs each mode in its own process, minutes apart; on a shared box whose load
changes by the minute its step-time ratios swing ±15 %. Here one process holds the LoRA model
(SmolLM2-135M fp32, gradient checkpointing) and the QLoRA model (NF4 + double quantization, bf16 frozen
head, as ``bench_qlora_mem.py``'s ``qlora`` mode), and each round runs one step of: LoRA, QLoRA with the C
kernel, QLoRA with numpy (``LORAKIT_NO_CKERNEL`` toggled between steps) — seconds apart. CPU time of the
process per step (``time.process_time``, ``--threads 1``); median [min-max] over rounds and the per-round
ratios. The first round is a warm-up and is dropped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import lorakit
from bench_qlora_mem import prepare
from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits
from lorakit.quant import ckernel, load_for_qlora, malloc
from lorakit.quant.head16 import keep_head_16bit


def build(kind: str, model_dir: str):
    if kind == "qlora":
        model = load_for_qlora(model_dir, quant="nf4", double_quant=True, compute_dtype=torch.float32)
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        keep_head_16bit(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, ids) -> float:
    c = time.process_time()
    with hidden_states_instead_of_logits(model) as head:
        hidden = model(input_ids=ids).logits  # (B, T, H)
    loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="the dequantized SmolLM2 dir (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    malloc.lean_allocator(malloc.SMALL_TENSORS)
    tmp = tempfile.TemporaryDirectory(prefix="smollm2-hf-") if args.dir is None else None
    model_dir = str(prepare(Path(args.dir or tmp.name)))
    lora, qlora = build("lora", model_dir), build("qlora", model_dir)
    vocab = qlora[0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    os.environ.pop("LORAKIT_NO_CKERNEL", None)
    kernel = "c-simd" if ckernel.simd_available() else ("c" if ckernel.library() else "numpy (no kernel!)")
    modes = {"lora": (lora, None), "qlora": (qlora, None), "qlora@numpy": (qlora, "1")}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):
        for mode, ((model, opt), env) in modes.items():
            if env:
                os.environ["LORAKIT_NO_CKERNEL"] = env
            else:
                os.environ.pop("LORAKIT_NO_CKERNEL", None)
            t = step(model, opt, ids)
            if r:
                cpu[mode].append(t)
        os.environ.pop("LORAKIT_NO_CKERNEL", None)
        if r:
            print(f"round {r}: " + "  ".join(f"{m} {cpu[m][-1]:.2f} s" for m in modes), flush=True)
    print(f"\nSmolLM2-135M, fp32 compute, batch {args.batch} x {args.seq} tokens, {args.threads} thread(s), "
          f"{args.rounds} rounds (+1 warm-up), CPU s per step, median [min-max]; qlora = {kernel}")
    med = {m: statistics.median(v) for m, v in cpu.items()}
    for m, v in cpu.items():
        print(f"  {m:12s} {med[m]:6.2f}  [{min(v):.2f}-{max(v):.2f}]")
    for a, b in (("qlora", "lora"), ("qlora@numpy", "lora"), ("qlora", "qlora@numpy")):
        rs = [x / y for x, y in zip(cpu[a], cpu[b])]
        print(f"  {a}/{b}: {med[a] / med[b]:.2f}x  [per round: median {statistics.median(rs):.2f}, "
              f"{min(rs):.2f}-{max(rs):.2f}]" + (" (bar <= 1.3)" if b == "lora" else ""))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
