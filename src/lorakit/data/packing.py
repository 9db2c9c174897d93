"""Padding-free packing: several rows share one sequence, and attention never crosses a row boundary.

Rows (already encoded, each at most ``max_length`` tokens) are packed into sequences of at most
``max_length`` tokens by best-fit decreasing (the longest row first, each into the fullest sequence it
still fits; Johnson 1973, the bin-packing heuristic TRL's ``packing_strategy="bfd"`` also uses), so the
sequences come out nearly full and a micro-batch of them needs almost no padding.

Inside a sequence each row keeps its own positions: ``position_ids`` restart at 0 for every row, the
way transformers' ``DataCollatorWithFlattening`` marks packed rows. The model is told where rows
end in one of two ways (``lorakit/train/packing_check.py`` probes which one the model honours):

* ``position_ids`` — no attention mask at all: transformers' mask builder (``masking_utils.
  find_packed_sequence_indices``) reads the restarts and builds a block-diagonal causal mask for sdpa /
  eager, and flash-attention runs its varlen kernel on the same restarts. ``use_cache=False`` is part of
  the batch: with a cache the restarts are ignored and rows would see each other.
* ``block_mask`` — an explicit 4-D mask (B, 1, T, T): token i may attend to j iff both are in the same
  row and j ≤ i (bool for sdpa, additive float 0 / -inf-like otherwise).

Labels never cross a boundary: each row's first token gets label -100, so the last token of a row is
not trained to predict the first token of the next. A row's own first label is never a target anyway
(the loss predicts token t+1 from t), so a packed batch has exactly the target tokens of its rows
unpacked — and, up to float rounding, the same per-token losses (``tests/train/test_packing.py``).
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

IGNORE = -100
MODES = ("position_ids", "block_mask")


def pack_rows(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Best-fit-decreasing packing of ``examples`` (``input_ids`` / ``labels`` lists, each ≤ ``max_length``)
    into sequences of ≤ ``max_length`` tokens. Each packed example gets ``seq_lens`` (its rows' lengths,
    in order); every row's first label becomes ``IGNORE``. Deterministic for a given input."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties keep order
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room → bins with exactly that much room
    rooms: list[int] = []  # sorted distinct keys of by_room (at most max_length + 1 of them)
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}; truncate first")
        k = bisect.bisect_left(rooms, n)  # the smallest room that still fits: the best fit
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left not in by_room:
            by_room[left] = []
            bisect.insort(rooms, left)
        by_room[left].append(b)
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += examples[i]["input_ids"]
            labels += [IGNORE] + list(examples[i]["labels"][1:])  # never predict a row's start from the row before
        packed.append({"input_ids": ids, "labels": labels, "seq_lens": [len(examples[i]["input_ids"]) for i in members]})
    return packed


def collate_packed(examples: list[dict[str, Any]], pad_id: int, mode: str,
                   mask_dtype: torch.dtype = torch.bool) -> dict[str, Any]:
    """(B, T) ``input_ids`` / ``labels`` / ``position_ids`` (restarting per row; the right padding is one
    more "row" of its own, never a target) plus, for ``block_mask``, a (B, 1, T, T) ``attention_mask``;
    ``use_cache=False`` always."""
    if mode not in MODES:
        raise ValueError(f"packing mode {mode!r}: expected one of {MODES}")
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.zeros((B, T), dtype=torch.long)  # which row of the sequence each token belongs to
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        lens = list(e.get("seq_lens") or [n]) + ([T - n] if T > n else [])
        position_ids[b] = torch.cat([torch.arange(k) for k in lens])
        segment[b] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    batch: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                             "use_cache": False}
    if mode == "block_mask":
        batch["attention_mask"] = block_causal_mask(segment, mask_dtype)
    return batch


def block_causal_mask(segment: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(B, T) row ids → (B, 1, T, T): True (or 0.0) where query i may attend key j — same row, j ≤ i;
    False (or the dtype's most negative value) elsewhere."""
    T = segment.shape[1]
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    if dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]



def real_tokens(examples: list[dict[str, Any]]) -> int:
    """Tokens of the rows themselves (what a micro-batch of ``examples`` holds besides padding)."""
    return sum(len(e["input_ids"]) for e in examples)
