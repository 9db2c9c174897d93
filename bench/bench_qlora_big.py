"""QLoRA at scale on the CPU: load a Llama-2-7B/13B-shaped checkpoint in NF4 + double quantization and
take one LoRA training step, reporting peak resident memory (QLoRA §1: a 7B model fine-tunes in
≈ 5 GB). Goal: peak RSS ≤ 6 GiB for 7B and ≤ 10 GiB for 13B.

    python bench/bench_qlora_big.py --size tiny                 # seconds; checks the pipeline
    python bench/bench_qlora_big.py --size 7b --dir /data/l7b   # writes 13.5 GB once (random bf16)
    python bench/bench_qlora_big.py --size 7b --dir /data/l7b   # reuses it

The checkpoint (random N(0, 0.02) weights, Llama-2 shapes, bf16, ~1 GB shards plus an index) is
written layer by layer in a child process, so its memory does not count in the measurement. The
measured process then runs ``load_quantized`` → ``prepare_for_kbit_training`` → ``lorakit.inject``
(r=16, alpha=32, all-linear) → forward/backward on ``--seq`` tokens → one ``Adam8bit`` step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # Llama-2 shapes (Touvron et al. 2023, Table 1 / the released configs)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000),
}
GOAL_GIB = {"7b": 6.0, "13b": 10.0}
SHARD_BYTES = 1 << 30


def llama_config(size: str):
    from transformers import LlamaConfig

    s = SIZES[size]
    return LlamaConfig(**s, num_key_value_heads=s["num_attention_heads"], max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                       torch_dtype="bfloat16")


def checkpoint_tensors(cfg):
    """(name, shape) of every tensor of a Llama checkpoint, in file order."""
    names = [("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))]
    for i in range(cfg.num_hidden_layers):
        names += layer_tensors(cfg, i)
    return names + [("model.norm.weight", (cfg.hidden_size,)), ("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))]


def layer_tensors(cfg, i: int):
    """(name, shape) of decoder layer i, in checkpoint naming."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    p = f"model.layers.{i}."
    return [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]


def write_checkpoint(size: str, out: str) -> None:
    """Random bf16 checkpoint, one shard (~1 GB) in memory at a time."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out_dir = Path(out)
    cfg = llama_config(size)
    names = checkpoint_tensors(cfg)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, n_shard = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        n_shard += 1
        file = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in names:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
        shard[name] = t.to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out_dir)  # config.json last: its presence marks a complete checkpoint


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--dir", default=None, help="checkpoint directory (written if it has no config.json)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lorakit
    from lorakit.quant import Adam8bit, load_quantized, prepare_for_kbit_training

    if not hasattr(lorakit, "inject"):
        raise SystemExit("lorakit.inject is missing: the LoRA core is not in this tree yet; this benchmark needs it.")
    tmp = None
    ckpt = Path(args.dir) if args.dir else Path(tmp := tempfile.mkdtemp(prefix=f"qlora-{args.size}-"))
    t0 = time.perf_counter()
    if not (ckpt / "config.json").is_file():
        ckpt.mkdir(parents=True, exist_ok=True)
        proc = mp.get_context("spawn").Process(target=write_checkpoint, args=(args.size, str(ckpt)))
        proc.start()
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"writing the checkpoint failed (exit code {proc.exitcode})")
    gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
    t_write = time.perf_counter() - t0
    print(f"checkpoint: {ckpt} ({gb:.3f} GB bf16), ready in {t_write:.0f}s; torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    model = load_quantized(ckpt, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
    rss_load = peak_rss_gib()
    qbytes = sum(b.numel() * b.element_size() for b in model.buffers()) / 2**30
    fbytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"load_quantized: {t_load:.0f}s, peak RSS {rss_load:.2f} GiB "
          f"(quantized weights {qbytes:.3f} GiB, other parameters {fbytes:.3f} GiB)")

    model = prepare_for_kbit_training(model)
    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adam8bit(params, lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t_step = time.perf_counter() - t0
    rss = peak_rss_gib()
    n_lora = sum(p.numel() for p in params)
    print(f"one QLoRA step ({n_lora / 1e6:.1f}M LoRA params, {args.seq} tokens): {t_step:.0f}s, loss {loss.item():.3f}, "
          f"optimizer state {opt.state_bytes() / 2**20:.0f} MiB")
    goal = GOAL_GIB.get(args.size)
    verdict = "" if goal is None else f" — goal ≤ {goal:g} GiB: {'met' if rss <= goal else 'NOT met'}"
    print(f"peak RSS {rss:.2f} GiB{verdict}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
