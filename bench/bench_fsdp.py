"""One process vs DDP vs FSDP (torch FSDP2 over gloo) on CPU: the same `lorakit train` run, same global batch.

    python bench/bench_fsdp.py                 # 2 rounds, 2 processes, a Llama of hidden 256 × 4 layers
    python bench/bench_fsdp.py --rounds 3 --steps 12 --quant nf4

Each mode is a fresh `lorakit train` (the CLI, under `torchrun --standalone` for ddp/fsdp) on the same
random-init model and data; rounds are interleaved (one, ddp, fsdp, one, ddp, fsdp, ...). Reported per
mode, median over rounds (spread = max - min): seconds per optimizer step (metrics.json, evaluation
excluded), peak RSS of the main process, the final loss, and the largest relative loss difference from
the one-process run (the same global batch: 1 × 2B vs 2 × B). On a 2-core box the processes share the
cores, so the parallel modes cannot be faster than one process; the figure that matters there is the
loss agreement and the memory per process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_model(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.tasks import build_tokenizer, write_jsonl

    model = root / "model"
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    data = write_jsonl("rev", root / "train.jsonl", n=256, seed=0)
    return model, data


def run(mode: str, out: Path, model: Path, data: Path, a) -> dict:
    per_proc = a.batch if mode == "one" else a.batch // 2
    cli = ["-m", "lorakit.cli", "train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
           "--overwrite", "--no-progress", f"max_steps={a.steps}", f"batch_size={per_proc}", "lr=1e-3", "r=16",
           "lora_alpha=32", "threads=1", "max_length=128", "eval_rows=8", f"quant={a.quant}", "chunked_ce=false"]
    if mode == "one":
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cli,
               f"distributed={mode}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    losses = [float(r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]
    return {"step_s": m["time"]["step_seconds"], "rss_mb": m["memory"]["peak_rss_mb"], "losses": losses,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quant", default="none", choices=["none", "nf4"])
    p.add_argument("--modes", default="one,ddp,fsdp")
    a = p.parse_args()
    modes = a.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = make_model(root, a.hidden, a.layers)
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.rounds):
            for mode in modes:
                res = run(mode, root / f"{mode}-{r}", model, data, a)
                results[mode].append(res)
                print(f"round {r + 1} {mode:5s} {res['step_s']:.3f} s/step  rss {res['rss_mb']:.0f} MB  "
                      f"final loss {res['losses'][-1]:.6f}  wall {res['wall_s']:.0f} s", flush=True)
    ref = results.get("one")
    print(f"\nhidden {a.hidden} × {a.layers} layers, global batch {a.batch} × ≤128 tokens, r=16, quant={a.quant}, "
          f"{a.steps} steps, {a.rounds} rounds (median, spread)")
    print(f"{'mode':6s} {'s/step':>16s} {'× one':>7s} {'peak RSS MB':>18s} {'final loss':>11s} {'max |Δloss|/loss':>17s}")
    base = statistics.median(x["step_s"] for x in ref) if ref else None
    for mode, rs in results.items():
        step = [x["step_s"] for x in rs]
        rss = [x["rss_mb"] for x in rs]
        dl = max(abs(u - v) / abs(v) for x, y in zip(rs, ref) for u, v in zip(x["losses"], y["losses"])) if ref else 0
        ratio = f"{statistics.median(step) / base:7.2f}" if base else "      -"
        print(f"{mode:6s} {statistics.median(step):8.3f} ±{max(step) - min(step):6.3f} {ratio} "
              f"{statistics.median(rss):9.0f} ±{max(rss) - min(rss):6.0f} {rs[-1]['losses'][-1]:11.6f} {dl:17.2e}")


if __name__ == "__main__":
    main()
