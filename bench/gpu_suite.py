"""One prepared GPU check (issue 15 §4): correctness of lorakit's GPU paths against CPU results, then
side-by-side step timings against PEFT (+ bitsandbytes for QLoRA), printing one table. ~10 minutes on
one GPU. Run through ``bench/gpu_suite.sh``; without a CUDA device it says so and exits 0.

    bash bench/gpu_suite.sh                    # everything
    python bench/gpu_suite.py --skip-timing    # correctness only (a minute)

Correctness (CUDA vs the same computation on CPU, fp32, TF32 off):
  lora      a tiny Llama with LoRA on all linears: loss and every adapter gradient
  dora      the same with use_dora
  nf4       blockwise NF4 + double quantization: packed bytes and dequantized weight (CPU numpy path vs
            the torch path on CUDA), and bit-equality of the packed bytes with bitsandbytes'
  qlora     forward/backward of a QLoRA model
  ce        chunked cross-entropy loss and gradients vs the plain loss
  compile   the LoRA model under torch.compile (inductor), fullgraph, vs eager
Timings (SmolLM2-135M's shape, random init, batch 4 × 256, r=16 all-linear, dropout 0.05, AdamW, bf16
autocast; interleaved rounds, median of steps; ratios): floor, full, peft, lorakit, lorakit+compile,
qlora (lorakit NF4) and peft+bnb (bitsandbytes NF4). Goals: lorakit ≤ 0.6× peft, qlora ≤ 0.6× peft+bnb.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

NO_CUDA = "gpu_suite: no CUDA device (torch.cuda.is_available() is False); nothing was run."


def tiny_llama(layers=2, vocab=128, hidden=64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def loss_and_grads(model, ids, chunked=False):
    from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits

    model.zero_grad(set_to_none=True)
    if chunked:
        with hidden_states_instead_of_logits(model) as head:
            hidden = model(input_ids=ids).logits
        loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean", chunk_tokens=16)
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def compare(name, cpu, gpu, rtol=2e-4, atol=2e-5) -> tuple[str, bool, str]:
    import torch

    (l1, g1), (l2, g2) = cpu, gpu
    worst = float((l1 - l2).abs())
    ok = torch.allclose(l1, l2, rtol=rtol, atol=atol) and g1.keys() == g2.keys()
    for k in g1:
        if k in g2:
            worst = max(worst, float((g1[k] - g2[k]).abs().max()))
            ok = ok and torch.allclose(g1[k], g2[k], rtol=rtol, atol=atol)
    return name, ok, f"{len(g1)} grads, max |diff| {worst:.2e}"


def correctness() -> list[tuple[str, bool, str]]:
    import copy

    import torch

    import lorakit
    from lorakit.quant.nf4 import quantize

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for name, extra in (("lora", {}), ("dora", {"use_dora": True})):
        model = tiny_llama()
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False, **extra))
        model.eval()  # no dropout: CPU and CUDA draw different masks
        gpu = copy.deepcopy(model).cuda()
        rows.append(compare(name, loss_and_grads(model, ids), loss_and_grads(gpu, ids.cuda())))
        if name == "lora":
            rows.append(compare("ce", loss_and_grads(model, ids, chunked=True),
                                loss_and_grads(gpu, ids.cuda(), chunked=True)))
            torch._dynamo.reset()
            compiled = torch.compile(gpu, fullgraph=True)
            rows.append(compare("compile", loss_and_grads(model, ids), loss_and_grads(compiled, ids.cuda()),
                                rtol=1e-3, atol=1e-4))
    # NF4 + double quant: CPU (numpy kernels) vs CUDA (torch ops), and vs bitsandbytes' bytes.
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(2))
    qc, qg = quantize(w, 64, double_quant=True), quantize(w.cuda(), 64, double_quant=True)
    same = torch.equal(qc.packed, qg.packed.cpu())
    deq = float((qc.dequantize(torch.float32) - qg.dequantize(torch.float32).cpu()).abs().max())
    detail = f"packed equal CPU/CUDA: {same}; dequant max |diff| {deq:.1e}"
    try:
        import bitsandbytes.functional as bnbf

        packed, _state = bnbf.quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4", compress_statistics=False)
        qs = quantize(w.cuda(), 64, double_quant=False)
        bnb_same = torch.equal(packed.view(-1).cpu(), qs.packed.view(-1).cpu())
        detail += f"; bytes equal bitsandbytes: {bnb_same}"
        same = same and bnb_same
    except ImportError:
        detail += "; bitsandbytes not installed"
    rows.append(("nf4", same and deq == 0.0, detail))
    model = tiny_llama()
    lorakit.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    rows.append(compare("qlora", loss_and_grads(model, ids), loss_and_grads(copy.deepcopy(model).cuda(), ids.cuda())))
    return rows


def smollm2(quant=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def bnb_nf4(model):
    """Every nn.Linear but the head → bitsandbytes Linear4bit (NF4, double quant, bf16 compute); the
    weights are quantized when the model moves to the GPU (Params4bit)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    for path, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod is not head:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, q)
    return model


def build(mode):
    import torch

    import lorakit

    lk = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    model = smollm2()
    if mode == "peft+bnb":
        import peft

        model = bnb_nf4(model)
        model = peft.get_peft_model(model.cuda(), peft.LoraConfig(**lk))
    elif mode == "qlora":
        lorakit.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
        lorakit.inject(model, lorakit.LoraConfig(**lk))
    elif mode == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**lk))
    elif mode.startswith("lorakit"):
        lorakit.inject(model, lorakit.LoraConfig(**lk))
    elif mode == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
    model = model.cuda().train()
    return model


def time_mode(mode, steps) -> tuple[float, float]:
    import torch

    from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits

    model = build(mode)
    run = torch.compile(model) if mode == "lorakit+compile" else model
    ids = torch.randint(0, 49152, (4, 256), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):  # two warm-up steps (compile)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if mode == "floor":
                loss = run(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss
            elif mode.startswith("lorakit") or mode == "qlora":
                with hidden_states_instead_of_logits(model) as head:
                    hidden = run(input_ids=ids).logits
                loss = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], reduction="mean")
            else:
                loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, run, opt
    torch.cuda.empty_cache()
    return statistics.median(times), peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--modes", default="floor,full,peft,lorakit,lorakit+compile,qlora,peft+bnb")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    rows = correctness()
    print("\ncheck     ok     detail")
    for name, ok, detail in rows:
        print(f"{name:9s} {'OK ' if ok else 'FAIL'}   {detail}", flush=True)
    if args.skip_timing:
        return 0 if all(ok for _, ok, _ in rows) else 1
    modes = args.modes.split(",")
    res: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for m in modes:
            try:
                res[m].append(time_mode(m, args.steps))
                print(f"round {rnd + 1} {m:16s} {res[m][-1][0] * 1e3:8.1f} ms/step  peak {res[m][-1][1]:7.0f} MiB",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - a peer failing (bnb build) must not hide the others
                print(f"round {rnd + 1} {m:16s} FAILED: {type(exc).__name__}: {exc}", flush=True)
    med = {m: statistics.median(t for t, _ in r) for m, r in res.items() if r}
    print("\nmode              median ms/step   spread ms        peak MiB")
    for m in modes:
        if m in med:
            ts = [t for t, _ in res[m]]
            print(f"{m:17s} {med[m] * 1e3:12.1f}   {min(ts) * 1e3:7.1f}-{max(ts) * 1e3:7.1f}   "
                  f"{statistics.median(p for _, p in res[m]):9.0f}")
    for a, b, goal in (("lorakit", "peft", 0.6), ("lorakit+compile", "peft", 0.6), ("qlora", "peft+bnb", 0.6),
                       ("lorakit", "floor", 1.10), ("lorakit", "full", 0.75)):
        if a in med and b in med:
            r = med[a] / med[b]
            print(f"{a} / {b} = {r:.2f}  (goal <= {goal})  {'OK' if r <= goal else 'MISSED'}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
