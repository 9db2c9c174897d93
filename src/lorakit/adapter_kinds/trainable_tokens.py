"""Trainable tokens: train only chosen rows of an embedding (e.g. the rows of new special tokens),
PEFT's ``LoraConfig(trainable_token_indices=...)`` — an adapter on the adapter protocol.

The adapter holds the new values of the chosen rows, not a difference (PEFT's choice, so that a
resized-and-reinitialised embedding still gets defined rows)::

    E'[i] = values[j]   if i = token_indices[j]        E'[i] = E[i] otherwise        E: (num, dim)

Forward replaces the looked-up rows (no (num, dim) copy: ``where`` on the (…, dim) output); merge
writes the rows into the weight, unmerge writes the original rows back (kept in a buffer, as PEFT
does). With tied input/output embeddings the output head must see the same rows: a
:class:`TiedTokensAdapter` on the head recomputes the logits of the chosen tokens with the new rows
(``logits[..., i] = h · values[j]``) and writes nothing to the file (PEFT saves the rows once).

File tensor: ``<embedding path>.token_adapter.trainable_tokens_delta`` (n_tokens, dim), config
``trainable_token_indices``: a list (the input embedding) or ``{module name: list}``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterStateError
from ..layers.kinds import BaseKind
from ..layers.protocol import Adapter


class TrainableTokensAdapter(Adapter):
    """New values for rows ``token_indices`` of an ``nn.Embedding`` weight (num, dim)."""

    needs_base_weight = True
    merges_into_tied_weight = True  # the new rows are meant for every user of a tied weight (the head)

    def __init__(self, weight: torch.Tensor, token_indices: list[int], init: bool = True):
        super().__init__()
        num, dim = weight.shape
        idx = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        original = weight.detach()[idx].float()  # (n, dim)
        values = original.clone() if init else torch.randn(original.shape, device=weight.device)
        self.trainable_tokens_delta = nn.Parameter(values)  # PEFT's name: these are the new rows
        self.register_buffer("token_indices", idx, persistent=False)
        self.register_buffer("trainable_tokens_original", original, persistent=False)
        slots = torch.full((num,), -1, dtype=torch.long, device=weight.device)
        slots[idx] = torch.arange(len(token_indices), device=weight.device)
        self.register_buffer("slots", slots, persistent=False)  # token id -> row of values, or -1

    def forward_into(self, kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        slot = self.slots[x]  # (...,)
        rows = self.trainable_tokens_delta.to(base_out.dtype)[slot.clamp(min=0)]  # (..., dim)
        return torch.where((slot >= 0).unsqueeze(-1), rows, base_out)

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the (dim, num) layout of an embedding: zero but for the chosen columns (rows of E),
        values − current rows."""
        if base_weight is None:
            raise AdapterStateError("a trainable-tokens adapter replaces rows of its embedding; it has no ΔW "
                                    "without that weight — merge it with lorakit.merge instead.")
        delta = torch.zeros_like(base_weight, dtype=torch.float32)
        delta[:, self.token_indices] = self.trainable_tokens_delta.detach().float().T - base_weight.float()[:, self.token_indices]
        return delta

    def unmerge_delta_2d(self, merged_weight: torch.Tensor | None = None) -> torch.Tensor:
        delta = torch.zeros_like(merged_weight, dtype=torch.float32)
        delta[:, self.token_indices] = merged_weight.float()[:, self.token_indices] - self.trainable_tokens_original.T
        return delta

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        return {"token_adapter.trainable_tokens_delta": self.trainable_tokens_delta}

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.tolist()}"


class TiedTokensAdapter(Adapter):
    """On an output head tied to the embedding: the chosen tokens' logits use the new rows.

    logits (..., num) = h (..., dim) · Eᵀ; for token i = token_indices[j]: logits[..., i] = h · values[j].
    Holds no tensor of its own (the values are the embedding adapter's), so nothing goes to the file.
    """

    needs_base_weight = True
    merges_into_tied_weight = True

    def __init__(self, source: TrainableTokensAdapter):
        super().__init__()
        self.__dict__["source"] = source  # not a submodule: its parameter is saved and trained once

    def forward_into(self, kind, base, base_out, x, mask):
        src = self.source
        new = x.to(base_out.dtype) @ src.trainable_tokens_delta.to(base_out.dtype).T  # (..., n)
        return base_out.index_copy(-1, src.token_indices, new)

    def delta_2d(self, base_weight=None):
        # the head's weight IS the embedding's (tied): merging the embedding adapter already wrote the rows
        return torch.zeros_like(base_weight, dtype=torch.float32)

    def unmerge_delta_2d(self, merged_weight=None):
        return torch.zeros_like(merged_weight, dtype=torch.float32)

    def peft_tensors(self, kind):
        return {}
