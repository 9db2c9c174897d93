"""QLoRA through the CLI at scale: `lorakit train quant=nf4` on a Llama-2-7B/13B-shaped checkpoint
(random bf16 shards, Llama-2 shapes as in ``bench_qlora_big.py``, written at disk speed), a few steps, peak RSS against
the goal (7B ≤ 6 GiB, 13B ≤ 10 GiB) and against the estimate the command prints before training.

    python bench/bench_qlora_cli_big.py --size tiny                       # seconds
    python bench/bench_qlora_cli_big.py --size 7b --dir /tmp/l7b --delete # writes 13.5 GB, removes it after

The command runs in a child process (the checkpoint writer in another), so the peak RSS is that of
`lorakit train` alone: ``resource.getrusage(RUSAGE_CHILDREN)`` after it exits, and the run's own
``metrics.json`` (``memory.peak_rss_mb``) — both are the kernel's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_qlora_big import GOAL_GIB, SHARD_BYTES, SIZES, checkpoint_tensors, llama_config  # noqa: E402

POOL = 1 << 26  # bf16 values of random N(0, 0.02) data every tensor's bytes are cut from (128 MB)


def write_checkpoint_fast(size: str, out: str) -> None:
    """A Llama-shaped bf16 safetensors checkpoint in ~1 GB shards, written at disk speed.

    Generating N(0, 0.02) values for 13B weights takes longer than the whole benchmark on a busy
    2-core box (bench_qlora_big.write_checkpoint: 19 min for 7B here), so every tensor's bytes are a
    slice of one 128 MB pool of random bf16 values, starting at a different offset. Memory and time of
    quantized loading and training do not depend on the values being independent across tensors.
    """
    import numpy as np
    import torch

    out_dir = Path(out)
    cfg = llama_config(size)
    names = checkpoint_tensors(cfg)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, generator=gen).mul_(0.02).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    one = torch.ones(1, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    shards, cur, cur_bytes = [], [], 0
    for name, shape in names:
        cur.append((name, shape))
        cur_bytes += 2 * int(np.prod(shape))
        if cur_bytes >= SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    weight_map, offset_seed = {}, 0
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(out_dir / file, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for _name, shape in shard:
                n = 2 * int(np.prod(shape))
                if len(shape) == 1:
                    f.write(one * (n // 2))
                    continue
                offset_seed = (offset_seed + 7919 * 2) % (2 * POOL)
                start = offset_seed
                while n > 0:
                    chunk = min(n, 2 * POOL - start)
                    f.write(memoryview(pool)[start:start + chunk])
                    n -= chunk
                    start = 0
        weight_map.update({name: file for name, _ in shard})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out_dir)  # config.json last: its presence marks a complete checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--dir", required=False, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optim", default="adamw8bit")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 compute (the recipe's); off by default: CPUs without AVX512-BF16/AMX emulate it, ~50x slower")
    ap.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    args = ap.parse_args()
    ckpt = Path(args.dir or f"/tmp/qlora-cli-{args.size}")
    t0 = time.perf_counter()
    if not (ckpt / "config.json").is_file():
        ckpt.mkdir(parents=True, exist_ok=True)
        proc = mp.get_context("spawn").Process(target=write_checkpoint_fast, args=(args.size, str(ckpt)))
        proc.start()
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"writing the checkpoint failed (exit code {proc.exitcode})")
    if not (ckpt / "tokenizer_config.json").is_file():  # lorakit's character tokenizer: ids < vocab_size
        from lorakit.tasks import build_tokenizer

        build_tokenizer().save_pretrained(ckpt)
    data = ckpt / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 2}) + "\n"
                            for _ in range(16)))
    gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
    print(f"checkpoint {ckpt}: {gb:.2f} GB bf16, ready after {time.perf_counter() - t0:.0f} s", flush=True)

    out = ckpt.parent / (ckpt.name + "-run")
    cmd = [sys.executable, "-m", "lorakit.cli", "train", "--config", "recipes/qlora.yaml", "--model", str(ckpt),
           "--data", str(data), "--output-dir", str(out), "--overwrite", f"max_steps={args.steps}", "batch_size=1",
           "grad_accum=1", f"max_length={args.seq}", "r=16", "lora_alpha=32", "lora_dropout=0", "eval_rows=0",
           f"threads={args.threads}", f"optim={args.optim}", f"bf16={str(args.bf16).lower()}", "progress=false", "save_every=0", "warmup_steps=0"]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - t0
    print(res.stdout[-3000:])
    if res.returncode:
        print(res.stderr[-3000:])
        raise SystemExit(f"lorakit train failed ({res.returncode})")
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB (Linux)
    m = json.loads((out / "metrics.json").read_text())
    est_mb = m["memory"]["estimate"]["total_mb"]
    peak_mb = m["memory"]["peak_rss_mb"]
    goal = GOAL_GIB.get(args.size)
    print(f"RESULT size={args.size} wall={wall:.0f}s step={m['time']['step_seconds']:.1f}s "
          f"peak_rss={peak_mb / 1024:.2f} GiB (child rusage {child_peak:.2f} GiB) estimate={est_mb / 1024:.2f} GiB "
          f"estimate_error={(est_mb - peak_mb) / peak_mb:+.1%} loss {m['loss']['first']:.3f}->{m['loss']['last']:.3f}"
          + ("" if goal is None else f" goal<= {goal:g} GiB: {'met' if peak_mb / 1024 <= goal else 'NOT met'}"))
    shutil.rmtree(out, ignore_errors=True)
    if args.delete:
        shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
