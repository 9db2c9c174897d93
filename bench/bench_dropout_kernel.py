"""The seeded dropout kernel's builds side by side: one mask pass, and what dropout adds to a LoRA projection.

    python bench/bench_dropout_kernel.py [--rounds 30] [--tokens 1024]
    python bench/bench_dropout_kernel.py --alt-lib /tmp/old/dropout.so   # also an older build of dropout.c

For each projection shape of SmolLM2-135M (in = 576 or 1536, N = 4 × 256 tokens, fp32, r = 16) it
times, interleaved within every round:

* ``pass``: one ``SeededMask.drop`` over the (N, in) input (hash + copy of the kept elements), per build
  of ``layers/csrc/dropout.c`` this CPU runs (``seeded_dropout.use_build``: 0 portable C, 1 AVX2, 2 AVX-512;
  all give the same bits), and ``copy``: a plain ``Tensor.copy_`` of the same size, the memory-bound floor
  of any pass;
* ``branch``: forward + backward of one frozen projection with its LoRA branch at p = 0.05, minus the same
  at p = 0 (what dropout costs a projection: three mask passes), per build; and ``fresh temps``: the
  widest build with the two (N, in) temporaries allocated anew each time (``layers/scratch.py`` off).

``--alt-lib`` loads another compiled dropout.c (same entry points) and adds it as a build (e.g. the
previous landing's, to A/B a change in one process). CPU time of this thread on one torch thread;
medians over rounds with the interquartile range.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from lorakit.layers import scratch, seeded_dropout
from lorakit.layers.branch import lora_linear_branch
from lorakit.layers.dropout import draw_mask


def timed(fn) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--alt-lib", default=None, help="another build of layers/csrc/dropout.c to compare")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lib = seeded_dropout.kernel()
    if lib is None:
        raise SystemExit(f"no dropout kernel here: {seeded_dropout.unavailable_reason()}")
    names = {0: "portable", 1: "avx2", 2: "avx512"}
    builds = [(names[b], b) for b in range(seeded_dropout.use_build(2) + 1)]
    if args.alt_lib:
        alt = ctypes.CDLL(args.alt_lib)
        vp, i64, u64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32
        for fn in (alt.lk_drop32, alt.lk_drop16):
            fn.argtypes, fn.restype = [vp, vp, i64, u64, i32], None
        for fn in (alt.lk_drop32_inplace, alt.lk_keep8):
            fn.argtypes, fn.restype = [vp, i64, u64, i32], None
        builds.append(("alt", alt))

    def use(build) -> None:  # this build for the SeededMask calls that follow
        if isinstance(build, int):
            seeded_dropout._KERNEL._state["lib"] = lib  # noqa: SLF001
            seeded_dropout.use_build(build)
        else:
            seeded_dropout._KERNEL._state["lib"] = build  # noqa: SLF001

    print(f"N = {args.tokens} tokens, fp32, one thread, {args.rounds} interleaved rounds; ms, median (interquartile)")
    for k_in, k_out in [(576, 576), (576, 1536), (1536, 576)]:
        times = measure(args.tokens, k_in, k_out, builds, use, args.rounds)
        use(max(b for _, b in builds if isinstance(b, int)))
        report(k_in, k_out, times)


def measure(n: int, k_in: int, k_out: int, builds, use, rounds: int) -> dict[str, list[float]]:
    """ms per job and round for one projection shape, the jobs interleaved within each round."""
    r = 16
    torch.manual_seed(0)
    x = torch.randn(n, k_in, requires_grad=True)
    w = torch.randn(k_out, k_in) * 0.02
    a = (torch.randn(r, k_in) * 0.02).requires_grad_()
    b = (torch.randn(k_out, r) * 0.02).requires_grad_()
    g = torch.randn(n, k_out)
    buf = torch.empty(n, k_in)

    def branch(p: float) -> None:
        y = lora_linear_branch(x.detach() @ w.T, x, a, b, 2.0, draw_mask(x, p) if p else None)
        y.backward(g)

    mask = seeded_dropout.SeededMask(12345, *seeded_dropout.lane_rule(0.05), x.shape)
    jobs = {"copy": lambda: buf.copy_(x.detach()), "branch p=0": lambda: branch(0.0)}
    for name, build in builds:
        jobs[f"pass {name}"] = (lambda build=build: (use(build), mask.drop(x.detach(), buf)))
        jobs[f"branch p=.05 {name}"] = (lambda build=build: (use(build), branch(0.05)))
    widest = max(b for _, b in builds if isinstance(b, int))

    def fresh() -> None:  # the widest build, every (N, in) temporary allocated anew (no scratch.py)
        use(widest)
        was = scratch.set_enabled(False)
        try:
            branch(0.05)
        finally:
            scratch.set_enabled(was)

    jobs["branch p=.05 fresh temps"] = fresh
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for fn in jobs.values():  # warm-up
        fn()
    for _ in range(rounds):
        for key, fn in jobs.items():
            times[key].append(timed(fn) * 1e3)
    return times


def report(k_in: int, k_out: int, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["branch p=0"])
    print(f"\nprojection {k_in} -> {k_out}:  branch at p=0 {base:.2f} ms (fwd + bwd, incl. the frozen matmuls)")
    for key, xs in times.items():
        if key == "branch p=0":
            continue
        q = statistics.quantiles(xs, n=4)
        extra = ""
        if key.startswith("branch"):
            per = sorted(t - p0 for t, p0 in zip(xs, times["branch p=0"]))
            extra = f"   dropout adds {statistics.median(per):.2f} ms"
        print(f"  {key:22s} {statistics.median(xs):7.3f}  ({q[0]:.3f} - {q[2]:.3f}){extra}")


if __name__ == "__main__":
    main()
