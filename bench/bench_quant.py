"""Side-by-side: lorakit's NF4/FP4 quantize and dequantize vs bitsandbytes' CPU path, plus storage.

    python bench/bench_quant.py                          # 4096 x 4096 bf16, NF4, blocksize 64
    python bench/bench_quant.py --quant-type fp4 --dtype fp32 --threads 1

Each repeat times lorakit and bitsandbytes back to back (interleaved), so a machine shared with other
work slows both alike; the table gives medians and the median of the per-repeat ratios. It also
checks that the bytes, absmax values and dequantized weights agree exactly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorakit.quant import nf4

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bnb_bits(packed: torch.Tensor, state, numel: int) -> float:
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * 4 + 4  # second-level absmax + offset
    return 8 * nbytes / numel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.disable = True  # bitsandbytes' fallback paths would torch.compile otherwise
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols).to(DTYPES[args.dtype])
    bs, qt = args.blocksize, args.quant_type

    ours = nf4.quantize(w, blocksize=bs, quant_type=qt)
    ours_dq = nf4.quantize(w, blocksize=bs, quant_type=qt, double_quant=True)
    b_packed, b_state = bnbf.quantize_4bit(w, blocksize=bs, quant_type=qt)
    b_packed_dq, b_state_dq = bnbf.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=True)
    exact = (torch.equal(ours.packed, b_packed) and torch.equal(ours.absmax, b_state.absmax)
             and torch.equal(ours.dequantize(), bnbf.dequantize_4bit(b_packed, b_state, quant_type=qt)))

    cases = {
        "quantize": (lambda: nf4.quantize(w, blocksize=bs, quant_type=qt),
                     lambda: bnbf.quantize_4bit(w, blocksize=bs, quant_type=qt)),
        "quantize+DQ": (lambda: nf4.quantize(w, blocksize=bs, quant_type=qt, double_quant=True),
                        lambda: bnbf.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=True)),
        "dequantize": (ours.dequantize, lambda: bnbf.dequantize_4bit(b_packed, b_state, quant_type=qt)),
        "dequantize+DQ": (ours_dq.dequantize, lambda: bnbf.dequantize_4bit(b_packed_dq, b_state_dq, quant_type=qt)),
    }
    for a, b in cases.values():  # warm-up
        a(), b()
    n = w.numel()
    print(f"{args.rows}x{args.cols} {args.dtype} {qt} blocksize {bs}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats; bit-exact with bitsandbytes: {exact}")
    print(f"{'op':<15}{'lorakit ms':>12}{'bnb ms':>10}{'speedup':>9}{'lorakit Melem/s':>17}")
    for name, (a, b) in cases.items():
        ta, tb = [], []
        for _ in range(args.repeats):
            ta.append(timed(a))
            tb.append(timed(b))
        ma, mb = statistics.median(ta), statistics.median(tb)
        ratio = statistics.median(y / x for x, y in zip(ta, tb))
        print(f"{name:<15}{ma * 1e3:>12.1f}{mb * 1e3:>10.1f}{ratio:>8.2f}x{n / ma / 1e6:>17.0f}")
    print("bits/param       lorakit   bnb")
    print(f"  without DQ    {ours.bits_per_param:>7.3f}  {bnb_bits(b_packed, b_state, n):>6.3f}")
    print(f"  with DQ       {ours_dq.bits_per_param:>7.3f}  {bnb_bits(b_packed_dq, b_state_dq, n):>6.3f}")


if __name__ == "__main__":
    main()
