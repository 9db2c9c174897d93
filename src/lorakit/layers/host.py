"""``LoraLayer``: wraps a base module and adds named adapters beside it (composition).

    x ──► base_layer ──────────────────────┐
    │                                      + ──► y
    └─► dropout ─► A (r) ─► B ─► ×scaling ─┘      (one branch per active, unmerged adapter)

The base module is kept as it is (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``, ``nn.Conv*d``,
a quantized linear, ...); its *kind* (``kinds.py``) knows its layout. Adapters are a name → module
map of :class:`~lorakit.layers.protocol.Adapter` objects of any kind (LoRA, AdaLoRA, O-LoRA, DoRA …);
the layer asks each the same questions (``forward_into``, ``delta_2d``, ``dropout``) and never tests which
kind it is. Merging adds ΔW into the base weight and is explicit and idempotent (never a side effect
of ``.eval()``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterNotFoundError, AdapterStateError, UnsupportedModuleError
from .dropout import SharedMasks, draw_mask
from .kinds import BaseKind
from .protocol import Adapter

# The host's own attributes; every other attribute read or written on a host goes to its base.
_OWN = frozenset({"base_layer", "kind", "lora", "active", "merged", "disabled", "row_adapters", "training"})


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
        self.masks: SharedMasks | None = None  # None: an independent dropout mask per projection

    # -- the base's attributes -----------------------------------------------------------------
    # Models read attributes of the layers they own (T5: ``self.wo.weight.dtype``; ViT/CLIP: the
    # patch conv's ``weight``; Whisper: ``conv1.stride``), so a host answers every attribute it does
    # not have itself from its base, whatever the base kind (Linear, Conv, Embedding, QuantLinear).
    # Parameters, buffers and submodules keep nn.Module's handling: __getattr__ runs only after
    # nn.Module's lookup failed, so the state dict is unchanged (``<path>.base_layer.weight``).
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("_") or name in _OWN:
                raise
            return getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        # ``host.weight = p`` (e.g. transformers re-tying embeddings) must reach the base, or the host
        # would grow a parameter of its own that shadows the base's and enters the state dict.
        base = self.__dict__.get("_modules", {}).get("base_layer")
        if (base is not None and name not in _OWN and not name.startswith("_") and name not in self.__dict__
                and hasattr(base, name)):
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)

    # -- adapters ------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> Adapter:
        """Attach ``adapter`` (any kind on the adapter protocol) under ``name``."""
        if not isinstance(adapter, Adapter):
            raise UnsupportedModuleError(
                f"{type(adapter).__name__} is not an adapter: subclass lorakit.layers.protocol.Adapter "
                "(see its docstring for what a kind provides)."
            )
        self.lora[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise AdapterStateError(f"adapter {name!r} is merged into {self.kind.name} weights; unmerge first.")
        del self.lora[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapter(self, name: str) -> Adapter:
        if name not in self.lora:
            raise AdapterNotFoundError(f"this layer has no adapter {name!r}; it has {sorted(self.lora)}.")
        return self.lora[name]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.disabled and self.row_adapters is None and not args and not kwargs:
            live = self.active if not self.merged else tuple(n for n in self.active if n not in self.merged)
            if len(live) == 1:
                adapter = self.lora[live[0]]
                if adapter.fuses_with_base and self.kind.can_fuse(self.base_layer, x):
                    # the base op and the branch in one node (protocol: forward_fused)
                    return adapter.forward_fused(self.kind, self.base_layer, x, self._mask(adapter, x))
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if not isinstance(out, torch.Tensor):
            raise _not_a_linear_map(self.base_layer, out)
        self._check_out_features(out)
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        for name in self.active:
            if name not in self.merged:
                out = self._run_adapter(self.lora[name], out, x)
        return out

    def _check_out_features(self, out: torch.Tensor) -> None:
        """A linear base must give (..., out_features); B's rows are that many. DeepSeek-V4's grouped
        o_a_proj (an nn.Linear subclass, weight (g·d_g, in/g)) gives (..., g, d_g) from a block-diagonal
        product, which no ΔW = B·A of the full weight describes."""
        dims = getattr(self.kind, "dims", None)
        if self.kind.linear and dims is not None and (out.dim() == 0 or out.shape[-1] != dims(self.base_layer)[1]):
            raise UnsupportedModuleError(
                f"a LoRA-wrapped {type(self.base_layer).__name__} returned shape {tuple(out.shape)}, not "
                f"(..., {dims(self.base_layer)[1]}) = (..., out_features): its forward is not x·Wᵀ (a grouped or "
                "reshaping projection?), so a LoRA update of its weight cannot be added to its output. Remove it "
                "from target_modules (with 'all-linear', add its name to exclude_modules).")

    def _mask(self, adapter: Adapter, x: torch.Tensor):
        """The adapter's dropout mask for x while training (None: no dropout)."""
        p = adapter.dropout
        if self.training and p > 0.0 and not self.kind.embedding and torch.is_floating_point(x):
            return self.masks.mask(x, p) if self.masks is not None else draw_mask(x, p)
        return None

    def _run_adapter(self, adapter: Adapter, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + the adapter's update of x, with the adapter's dropout on x while training."""
        return adapter.forward_into(self.kind, self.base_layer, out, x, self._mask(adapter, x))

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
            # The adapter sees its rows' base output (DoRA rescales it; LoRA adds to it).
            sub_out = self._run_adapter(self.lora[name], out.index_select(0, rows), x.index_select(0, rows))
            out = out.index_copy(0, rows, sub_out.to(out.dtype))
        return out

    # -- merging -------------------------------------------------------------------------------
    def _base_weight_2d(self, adapter: Adapter) -> torch.Tensor | None:
        return self.kind.weight_2d(self.base_layer).detach().float() if adapter.needs_base_weight else None

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` in the base weight's layout (fp32), against the current weight."""
        adapter = self.adapter(name)
        return self.kind.to_layout(self.base_layer, adapter.delta_2d(self._base_weight_2d(adapter)).float())

    def merge(self, names: list[str] | tuple[str, ...] | None = None, safe: bool = False) -> None:
        if safe:
            self.check_merge(names)
        for name in self.active if names is None else names:
            if name in self.merged or name not in self.lora:
                continue  # idempotent: merging twice is merging once
            self.kind.add_to_weight(self.base_layer, self.delta(name))
            self.merged.append(name)

    def check_merge(self, names: list[str] | tuple[str, ...] | None = None) -> None:
        """safe_merge's check of ``names`` together, changing nothing: ``AdapterStateError`` if the merged
        weight would hold inf/NaN. ``lorakit.merge`` checks every layer first, then merges."""
        w = None
        for name in self.active if names is None else names:
            if name in self.merged or name not in self.lora:
                continue
            if w is None:
                w = self.kind.weight(self.base_layer)
            # in the base's dtype, as add_to_weight adds: an fp16 weight overflows where fp32 would not
            w = w + self.delta(name).to(w.dtype)
            if not torch.isfinite(w).all():
                raise AdapterStateError(
                    f"merging adapter {name!r} would put inf/NaN into a {self.kind.name} weight; "
                    "no adapter was merged. Check the adapter's weights (trained with a NaN loss?)."
                )

    def unmerge(self) -> None:
        while self.merged:
            adapter = self.lora[self.merged.pop()]
            delta = adapter.unmerge_delta_2d(self._base_weight_2d(adapter)).float()
            self.kind.add_to_weight(self.base_layer, -self.kind.to_layout(self.base_layer, delta))

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={list(self.active)}, merged={self.merged}"


def share_dropout_masks(model: nn.Module, share: bool = True) -> SharedMasks | None:
    """Option: let the adapter layers of ``model`` share one dropout mask per input tensor (see
    ``dropout.py``); ``share=False`` goes back to independent per-projection masks. Returns the cache."""
    masks = SharedMasks() if share else None
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.masks = masks
    return masks


def _not_a_linear_map(base: nn.Module, out) -> UnsupportedModuleError:
    # e.g. Phi-MoE's router: an nn.Linear subclass whose forward returns (logits, weights, experts)
    return UnsupportedModuleError(
        f"a LoRA-wrapped {type(base).__name__} returned a {type(out).__name__}, not a tensor: its forward is more "
        "than the linear map (an MoE router?), so the LoRA update cannot be added to its output. Remove it from "
        "target_modules (with 'all-linear', add its name to exclude_modules).")
