"""One rebuild of SmolLM2-135M's 4-bit weights: the compiled lookup kernel vs the numpy path, interleaved.

    python bench/bench_dequant4_kernel.py [--rounds 5] [--layers 30] [--dtype float32]

What a QLoRA training step does twice (issue 14): every linear weight of the 30 blocks (q/o 576×576,
k/v 192×576, gate/up 1536×576, down 576×1536: 106 M weights, NF4, blocksize 64, double-quantized),
dequantized tile by tile exactly as ``quant/autograd4.py`` does (``_Plan.tiles``: the absmax decode once
per weight, then ``kernels4_cpu.dequantize_span`` per ~2 MB tile into a reused buffer), no matmul. Also the
whole-weight ``Quantized4bit.dequantize`` (merge/export path) and the double-quant absmax decode alone.

Modes alternate within every round (c, numpy, c, numpy, ...; ``LORAKIT_NO_CKERNEL`` toggled in-process);
CPU time of this thread (``time.thread_time``) on one torch thread, so other jobs on the box distort it
least. Prints ns per weight: median [min-max] over rounds, and the numpy/c ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lorakit.quant import autograd4, ckernel, nf4

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def rebuild(weights, dtype) -> None:
    for q in weights:
        for _ in autograd4._Plan(q, dtype, 64).tiles():
            pass


def whole(weights, dtype) -> None:
    for q in weights:
        q.dequantize(dtype)


def absmax(weights, dtype) -> None:
    for q in weights:
        q.absmax  # noqa: B018  (the double-quant decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    weights = [nf4.quantize(torch.randn(s, generator=g) * 0.02, double_quant=True)
               for _ in range(args.layers) for s in SHAPES]
    n = sum(q.layout.numel for q in weights)
    os.environ.pop("LORAKIT_NO_CKERNEL", None)
    kinds = {"c": "c-simd" if ckernel.simd_available() else ("c" if ckernel.library() else "numpy (no kernel!)"),
             "numpy": "numpy"}
    print(f"{len(weights)} weights, {n / 1e6:.1f} M elements, {args.dtype} out; c = {kinds['c']}")
    jobs = {"tiled rebuild": (rebuild, n), "whole-W dequantize": (whole, n), "absmax decode": (absmax, n)}
    res = {(j, m): [] for j in jobs for m in kinds}
    for _ in range(args.rounds):
        for job, (fn, count) in jobs.items():
            for mode in kinds:
                if mode == "numpy":
                    os.environ["LORAKIT_NO_CKERNEL"] = "1"
                else:
                    os.environ.pop("LORAKIT_NO_CKERNEL", None)
                t = time.thread_time_ns()
                fn(weights, dtype)
                res[(job, mode)].append((time.thread_time_ns() - t) / count)
    os.environ.pop("LORAKIT_NO_CKERNEL", None)
    for job in jobs:
        med = {}
        for mode in kinds:
            v = res[(job, mode)]
            med[mode] = statistics.median(v)
            print(f"  {job:20s} {mode:6s} {med[mode]:7.3f} ns/weight [{min(v):.3f}-{max(v):.3f}]"
                  f"  = {med[mode] * n / 1e9:.3f} s per rebuild")
        rounds = [a / b for a, b in zip(res[(job, "numpy")], res[(job, "c")])]
        print(f"  {job:20s} numpy/c {med['numpy'] / med['c']:.2f}x (per round {min(rounds):.2f}-{max(rounds):.2f})")


if __name__ == "__main__":
    main()
