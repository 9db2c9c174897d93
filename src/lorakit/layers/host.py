"""``LoraLayer``: wraps a base module and adds named adapters beside it (composition).

    x ──► base_layer ──────────────────────┐
    │                                      + ──► y
    └─► dropout ─► A (r) ─► B ─► ×scaling ─┘      (one branch per active, unmerged adapter)

The base module is kept as it is (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``, ``nn.Conv*d``,
a quantized linear, ...); its *kind* (``kinds.py``) knows its layout. Adapters are a name → module
map. Merging adds ΔW into the base weight and is explicit and idempotent (never a side effect of
``.eval()``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterNotFoundError, AdapterStateError
from .adapter import LoraAdapter
from .dropout import shared_mask
from .kinds import BaseKind


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, kind: BaseKind):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.lora = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # per-row selection, set by a context

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: bool | str = True) -> LoraAdapter:
        geometry = self.kind.geometry(self.base_layer, r)
        # A quantized base may hold only buffers (packed weight, absmax): look at both.
        ref = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()]), None)
        device = ref.device if ref is not None else None
        # Factors train in fp32 even on a bf16/fp16 base (stable Adam updates); the branch casts
        # them to the compute dtype, which costs only rank-sized copies.
        adapter = LoraAdapter(geometry, r, alpha, scaling, dropout, dtype=torch.float32, device=device)
        adapter.reset(self.kind.zero_b, init)
        self.lora[name] = adapter
        return adapter

    def add_module_adapter(self, name: str, adapter: nn.Module) -> None:
        """Attach an adapter of another kind (AdaLoRA, O-LoRA) with the same contract."""
        self.lora[name] = adapter

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise AdapterStateError(f"adapter {name!r} is merged into {self.kind.name} weights; unmerge first.")
        del self.lora[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapter(self, name: str) -> nn.Module:
        if name not in self.lora:
            raise AdapterNotFoundError(f"this layer has no adapter {name!r}; it has {sorted(self.lora)}.")
        return self.lora[name]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        for name in self.active:
            if name not in self.merged:
                out = self._branch(self.lora[name], out, x)
        return out

    def _branch(self, adapter: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + the adapter's update of x (the adapter contract: ``factors()`` and ``dropout``)."""
        a, b, s = adapter.factors()
        if a.shape[0] == 0:  # an adapter pruned to rank 0 (AdaLoRA) adds nothing
            return out
        p = getattr(adapter, "dropout", 0.0)
        mask = shared_mask(x, p) if self.training and p > 0.0 and torch.is_floating_point(x) else None
        return self.kind.branch(self.base_layer, out, x, a, b, s, mask)

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row i of the batch uses adapter ``row_adapters[i]`` (None = base only)."""
        names = self.row_adapters
        if len(names) != x.shape[0]:
            raise AdapterStateError(
                f"per-row adapter names: got {len(names)} names for a batch of {x.shape[0]} rows; "
                "give exactly one name (or None) per row."
            )
        if self.merged:
            raise AdapterStateError(f"per-row adapters need unmerged adapters; {self.merged} are merged — unmerge first.")
        for name in dict.fromkeys(n for n in names if n is not None):
            if name not in self.lora:
                continue  # this layer is not adapted by that adapter
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=out.device)
            sub_out = out.index_select(0, rows)
            delta = self._branch(self.lora[name], torch.zeros_like(sub_out), x.index_select(0, rows))
            out = out.index_add(0, rows, delta.to(out.dtype))
        return out

    # -- merging -------------------------------------------------------------------------------
    def delta(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` in the base weight's layout (fp32)."""
        return self.kind.to_layout(self.base_layer, self.adapter(name).delta_2d().float())

    def merge(self, names: list[str] | tuple[str, ...] | None = None, safe: bool = False) -> None:
        for name in self.active if names is None else names:
            if name in self.merged or name not in self.lora:
                continue  # idempotent: merging twice is merging once
            delta = self.delta(name)
            if safe:
                w = self.kind.weight(self.base_layer)
                # in the base's dtype, as add_to_weight adds: an fp16 weight overflows where fp32 would not
                if not torch.isfinite(w + delta.to(w.dtype)).all():
                    raise AdapterStateError(
                        f"merging adapter {name!r} would put inf/NaN into a {self.kind.name} weight; "
                        "the adapter was not merged. Check the adapter's weights (trained with a NaN loss?)."
                    )
            self.kind.add_to_weight(self.base_layer, delta)
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            self.kind.add_to_weight(self.base_layer, -self.delta(name))

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={list(self.active)}, merged={self.merged}"
