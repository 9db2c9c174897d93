"""LoRA on q and v of GPT-2's fused ``c_attn`` (the LoRA paper's GPT-2 setup), side by side in one run:

* ``lorakit fused_slices``   ``LoraConfig(fused_slices={"c_attn": [True, False, True]})``: x → A (2r) →
                             per-slice B → added to the q and v columns only;
* ``lorakit full-width``     the same ΔW as plain LoRA of rank 2r with a block-diagonal B (what the PEFT
                             file holds), run through lorakit's fused linear branch;
* ``peft full-width``        that file loaded by PEFT (``--peft``; PEFT has no sliced LoRA).

One step = forward + backward of the c_attn layers of a GPT-2-small-shaped stack (12 × c_attn 768 →
2304) on a (batch, seq, 768) input; the methods take turns for ``--rounds`` rounds (load drift hits
them alike) and each reports the median per-step time, its spread (min–max of the round medians)
and the ratio to fused_slices. Outputs are checked equal first.

    python bench/bench_fused_slices.py [--peft] [--rounds 5] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorakit  # noqa: E402
from lorakit.state import lora_layers  # noqa: E402

ENABLE = [True, False, True]


class Stack(nn.Module):
    """12 GPT-2 Conv1D c_attn projections (768 → 2304), each fed the same kind of input."""

    def __init__(self, layers: int, d: int):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.h = nn.ModuleList(nn.ModuleDict({"c_attn": Conv1D(3 * d, d)}) for _ in range(layers))

    def forward(self, x):
        return sum(block["c_attn"](x).sum() for block in self.h)


def build(args):
    torch.manual_seed(0)
    sliced = lorakit.inject(Stack(args.layers, args.d), lorakit.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=["c_attn"], init_lora_weights=False,
        fused_slices={"c_attn": ENABLE}))
    tmp = Path(tempfile.mkdtemp())
    lorakit.save_adapter(sliced, tmp)
    torch.manual_seed(0)
    base = Stack(args.layers, args.d)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in sliced.state_dict().items() if ".lora." not in k})
    full = _plain_full_width(sliced, base, args.r)
    models = {"lorakit fused_slices": sliced, "lorakit full-width": full}
    if args.peft:
        import peft

        torch.manual_seed(0)
        pbase = Stack(args.layers, args.d)
        pbase.load_state_dict(base.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models["peft full-width"] = peft.PeftModel.from_pretrained(pbase, str(tmp), is_trainable=True)
    return models


def _plain_full_width(sliced, base, r: int):
    """Plain LoRA of rank 2r holding the sliced adapters' full-width (block-diagonal) factors."""
    import copy

    plain = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(
        r=2 * r, lora_alpha=4 * r, target_modules=["c_attn"]))
    hosts = dict(lora_layers(plain))
    with torch.no_grad():
        for path, host in lora_layers(sliced):
            t = host.lora["default"].peft_tensors(host.kind)
            hosts[path].lora["default"].lora_A.copy_(t["lora_A.weight"])
            hosts[path].lora["default"].lora_B.copy_(t["lora_B.weight"])
    return plain


def step(model, x):
    loss = model(x)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peft", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = build(args)
    x = torch.randn(args.batch, args.seq, args.d)
    with torch.no_grad():
        ref = models["lorakit fused_slices"](x)
        for m in models.values():
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-2)
    medians = {n: [] for n in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            step(m, x)  # warm-up
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(m, x)
                times.append(time.perf_counter() - t0)
            medians[name].append(statistics.median(times))
    base = statistics.median(medians["lorakit fused_slices"])
    print(f"{args.layers} × c_attn {args.d}→{3 * args.d}, r={args.r} per slice (q, v), x {tuple(x.shape)}, "
          f"{args.threads} thread(s), {args.rounds} rounds × {args.steps} steps")
    print(f"{'method':24s} {'median s/step':>14s} {'spread':>20s} {'ratio':>7s}")
    for name, ms in medians.items():
        med = statistics.median(ms)
        print(f"{name:24s} {med:14.4f} {min(ms):9.4f}–{max(ms):.4f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
