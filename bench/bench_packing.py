"""Padding-free packing vs padded batches: tokens/s and padding, on rows of varied length.

    python bench/bench_packing.py                  # 256 rows, max_length 512, 3 rounds
    python bench/bench_packing.py --rows 512 --rounds 5 --threads 2

One LoRA training pass (forward + backward over every row, lorakit's chunked loss, no optimizer step)
on a random-init Llama (hidden 256, 4 layers, vocab 4000, LoRA r 16 on all linear layers), per way of
batching the same rows:

* ``padded``            lorakit's ``collate``: ``--batch`` rows per micro-batch, right-padded to the longest
* ``packed pos-ids``    lorakit's ``pack_rows`` (best-fit decreasing into ``--max-length`` sequences) +
                        ``collate_packed`` with restarting position_ids (transformers builds the mask)
* ``packed 4-D mask``   the same sequences with lorakit's explicit block-diagonal mask
* ``HF flattening``     the peer: transformers' ``DataCollatorWithFlattening`` — each micro-batch of
                        ``--batch`` rows concatenated into one (1, ΣL) row with restarting position_ids

Row lengths are log-normal (median ≈ 100 tokens, long tail to ``--max-length``), a third of each row a
prompt without targets. The variants run in interleaved rounds (order rotated each round); the table
gives medians and min-max of tokens/s (row tokens, padding not counted; by wall-clock time and by the
process's CPU time, steadier on a shared machine) over rounds, the padding
fraction (padded positions / all positions computed), and the summed loss of the pass as a check that
every variant computed the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_rows(n: int, max_length: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + 4.6).round().clamp(8, max_length).long().tolist()
    rows = []
    for L in lengths:
        ids = torch.randint(3, 4000, (L,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (L // 3) + ids[L // 3:]})
    return rows


def batches(variant: str, rows: list[dict], args) -> list[dict]:
    from transformers import DataCollatorWithFlattening

    from lorakit.data.batches import collate
    from lorakit.data.packing import collate_packed, pack_rows

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [rows[i] for i in order]
    b = args.batch
    if variant == "padded":
        return [collate(shuffled[i:i + b], 0) for i in range(0, len(rows), b)]
    if variant == "HF flattening":
        flat = DataCollatorWithFlattening()
        out = []
        for i in range(0, len(rows), b):
            batch = flat([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in shuffled[i:i + b]])
            out.append({**batch, "use_cache": False})
        return out
    packed = pack_rows(shuffled, args.max_length)
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    per = max(1, round(b * mean / args.max_length))  # sequences per micro-batch: about the padded batch's tokens
    mode = "position_ids" if variant == "packed pos-ids" else "block_mask"
    return [collate_packed(packed[i:i + per], 0, mode, torch.bool) for i in range(0, len(packed), per)]


def padding_fraction(bs: list[dict], real: int) -> float:
    total = sum(b["input_ids"].numel() for b in bs)
    return 1.0 - real / total


def run_pass(model, bs: list[dict]) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, summed loss) of one forward + backward over ``bs``."""
    from lorakit.data.batches import model_loss_sum

    t, c = time.perf_counter(), time.process_time()
    total = 0.0
    for batch in bs:
        batch = dict(batch)
        labels = batch.pop("labels")
        loss = model_loss_sum(model, model, batch, labels, chunked=True)
        loss.backward()
        total += float(loss.detach())
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="rows per padded micro-batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train.packing_check import packing_mode

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=4000, max_position_embeddings=args.max_length)
    model = lorakit.inject(LlamaForCausalLM(cfg), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for module in model.modules():  # LoRA B starts at 0; make the adapter take part in the loss
        if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.Module):
            for q in module.lora_B.parameters():
                torch.nn.init.normal_(q, std=0.02)
    print(f"packing mode the probe picks for this model: {packing_mode(model)}")
    model.train()

    rows = make_rows(args.rows, args.max_length, args.seed)
    real = sum(len(r["input_ids"]) for r in rows)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    print(f"{len(rows)} rows, {real:,} tokens, length median {lengths[len(lengths) // 2]}, min {lengths[0]}, "
          f"max {lengths[-1]}; padded batch {args.batch} rows; max_length {args.max_length}; "
          f"{args.threads} thread(s); torch {torch.__version__}")
    variants = ["padded", "packed pos-ids", "packed 4-D mask", "HF flattening"]
    prepared = {v: batches(v, rows, args) for v in variants}
    for v in variants:  # warm-up: a few micro-batches each
        run_pass(model, prepared[v][:2])
    speed: dict[str, list[float]] = {v: [] for v in variants}
    cpu_speed: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            seconds, cpu, total = run_pass(model, prepared[v])
            speed[v].append(real / seconds)
            cpu_speed[v].append(real / cpu)
            losses[v] = total
            print(f"round {rnd + 1}  {v:16s} {real / seconds:9.0f} tokens/s  ({seconds:.2f} s wall, {cpu:.2f} s CPU)",
                  flush=True)

    ref_loss = losses["padded"]
    # Wall time is what a user waits for; CPU time (process_time) is the work done, steadier on a shared box.
    for label, table in (("wall", speed), ("CPU", cpu_speed)):
        base = statistics.median(table["padded"])
        print(f"\ntokens/s by {label} time  micro-batches  padding   median    min-max          vs padded   Σ loss rel. diff")
        for v in variants:
            med = statistics.median(table[v])
            print(f"{v:22s} {len(prepared[v]):13d}  {100 * padding_fraction(prepared[v], real):6.1f}%  {med:7.0f}   "
                  f"{min(table[v]):6.0f}-{max(table[v]):<7.0f}   {med / base:8.2f}x   "
                  f"{abs(losses[v] - ref_loss) / abs(ref_loss):.1e}")


if __name__ == "__main__":
    main()
