"""The chunked cross-entropy's frozen-head path at several tile sizes, against the fused path that reads
the whole head (what lorakit did before), on SmolLM2's head shape (49,152 × 576, tied, frozen).

    python bench/bench_ce_tiles.py [--tokens 63,1023] [--repeats 5] [--tiles 18,19,20,21,22]

For each case and repeat (interleaved): CPU time (``time.thread_time``, 1 thread) of loss + ∂h, and
the peak RSS above the RSS before the call (VmHWM reset through ``/proc/self/clear_refs``; the lean
allocator is on, so freed tensors leave the RSS). Cases:

* ``fused-fp32``: ``_FusedLinearCE`` over the fp32 head, full-vocabulary chunks (the old path);
* ``tiled-fp32 2^k``: a frozen fp32 ``nn.Linear`` through the tiled online-softmax path;
* ``tiled-bf16 2^k``: ``FrozenHead`` (the bf16 head of ``quant_head=bf16``), each tile upcast.

2^k is both ``TILE_ELEMENTS`` (W tile) and ``LOGITS_TILE_ELEMENTS`` (logits tile). Prints medians,
[min-max] and the ratio to ``fused-fp32``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="63,1023")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiles", default="18,19,20,21,22", help="log2 of the tile element counts")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from lorakit import losses
    from lorakit.quant.head16 import FrozenHead
    from lorakit.quant.malloc import lean_allocator

    lean_allocator()
    V, H = 49152, 576
    w = torch.randn(V, H) * 0.02
    lin = nn.Linear(H, V, bias=False).requires_grad_(False)
    lin.weight.data = w
    bf = FrozenHead(w.to(torch.bfloat16), None, torch.float32)
    defaults = (losses.TILE_ELEMENTS, losses.LOGITS_TILE_ELEMENTS)
    for n in map(int, a.tokens.split(",")):
        h0 = torch.randn(n, H)
        y = torch.randint(0, V, (n,))
        cases = [("fused-fp32", None, None)]
        for k in map(int, a.tiles.split(",")):
            cases += [(f"tiled-fp32 2^{k}", lin, 1 << k), (f"tiled-bf16 2^{k}", bf, 1 << k)]
        res: dict[str, list[tuple[float, float]]] = {c[0]: [] for c in cases}
        for _ in range(a.repeats):
            for name, head, tile in cases:
                h = h0.clone().requires_grad_(True)
                base = _vm("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
                t = time.thread_time()
                if head is None:
                    loss = losses._FusedLinearCE.apply(h, w, None, y, losses.default_chunk_tokens(V), -100)
                else:
                    losses.TILE_ELEMENTS = losses.LOGITS_TILE_ELEMENTS = tile
                    loss = losses.chunked_cross_entropy(h, head, y)
                loss.backward()
                res[name].append((time.thread_time() - t, _vm("VmHWM") - base))
                losses.TILE_ELEMENTS, losses.LOGITS_TILE_ELEMENTS = defaults
        ref = statistics.median(t for t, _ in res["fused-fp32"])
        print(f"\n{n} tokens, V={V}, H={H}, {a.repeats} repeats: CPU s median [min-max], peak RSS above the call's start")
        for name, rows in res.items():
            ts, ms = [t for t, _ in rows], [m for _, m in rows]
            print(f"  {name:18s} {statistics.median(ts):6.3f} s [{min(ts):.3f}-{max(ts):.3f}]  x{statistics.median(ts) / ref:4.2f}"
                  f"   peak +{statistics.median(ms):6.1f} MiB [{min(ms):.1f}-{max(ms):.1f}]")


if __name__ == "__main__":
    main()
