"""How each adapter kind appears in single-file diffusion LoRAs (kohya / LyCORIS keys), and how a pipeline
component gets adapters of that kind.

A static table (``FILE_KINDS``), one entry per kind: the tensor suffixes of a module in the file, the
per-module spec read from them (rank, α, and for LoKr the factor shapes), which adapter tensor each
suffix fills, and what is written. Readers (ComfyUI, A1111, LyCORIS) apply, per module:

    LoRA   ΔW = α/r · up · down                      r = lora_down.shape[0]
    LoHa   ΔW = α/r · (w1a·w1b) ⊙ (w2a·w2b)           r = hada_w1_b.shape[0]
    LoKr   ΔW = s · W1 ⊗ W2                           s = α/r (r = the factored factor's rank), s = 1 when
                                                       both factors are full (α ignored) — LyCORIS' rule
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter_kinds._dense import base_shape
from ..adapter_kinds.loha import LoHaAdapter
from ..adapter_kinds.lokr import LoKrAdapter, LoKrKind
from ..adapter_kinds.lora import LoraAdapter
from ..adapter_kinds.lycoris_config import LoHaConfig, LoKrConfig
from ..inject import inject_adapter
from .config import DiffusionLoraConfig, lora_config_for, patterns_for


def inject(module: nn.Module, config, name: str, kind=None) -> None:
    """Add adapter ``name`` to one pipeline component, leaving fused (merged) adapters merged as diffusers
    does — not lorakit.inject's unmerge on switching; ``apply_all`` snapshots and restores the component."""
    inject_adapter(module, config, name, kind)


def effective_scaling(adapter: nn.Module) -> float:
    """The adapter's scaling without a user strength applied by ``stack.set_adapters``."""
    return float(getattr(adapter, "base_scaling", adapter.scaling))


class LoraFileKind:
    name = "lora"
    adapter_type = LoraAdapter
    required = frozenset({"lora_down.weight", "lora_up.weight"})

    def matches(self, keys: set[str]) -> bool:
        return self.required <= keys <= self.required | {"alpha"}

    def spec(self, group: dict[str, torch.Tensor], module: nn.Module | None = None) -> tuple[int, float]:
        r = int(group["lora_down.weight"].shape[0])
        return r, float(group["alpha"]) if "alpha" in group else float(r)  # no alpha: α = r (scale 1)

    def misfit(self, spec, module: nn.Module) -> str | None:
        """Why a spec read from the file cannot adapt ``module`` (None: it can); shapes are checked later."""
        return None

    def params(self, adapter: nn.Module) -> dict[str, torch.Tensor]:
        """suffix → the adapter tensor it fills."""
        return {"lora_down.weight": adapter.lora_A, "lora_up.weight": adapter.lora_B}

    def write(self, adapter: nn.Module) -> dict[str, torch.Tensor]:
        # The true per-module α with ΔW = α/r·B·A (rsLoRA too: α_file = s·r).
        alpha = effective_scaling(adapter) * adapter.lora_A.shape[0]
        return {**self.params(adapter), "alpha": torch.tensor(alpha)}

    def inject(self, module: nn.Module, plan: dict, config: DiffusionLoraConfig, name: str) -> None:
        inject(module, lora_config_for(plan, dropout=config.dropout), name)


class LohaFileKind(LoraFileKind):
    name = "loha"
    adapter_type = LoHaAdapter
    required = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})

    def spec(self, group, module=None):
        r = int(group["hada_w1_b"].shape[0])
        return r, float(group["alpha"]) if "alpha" in group else float(r)

    def params(self, adapter):
        return adapter.peft_tensors()

    def write(self, adapter):
        return {**self.params(adapter), "alpha": torch.tensor(effective_scaling(adapter) * adapter.r)}

    def inject(self, module, plan, config, name):
        r, alpha, rank_pattern, alpha_pattern = patterns_for(plan)
        inject(module, LoHaConfig(r=r, alpha=alpha, target_modules=list(plan), rank_pattern=rank_pattern,
                                  alpha_pattern=alpha_pattern), name)


@dataclass(frozen=True)
class LoKrSpec:
    """A LoKr module as a file stores it: which factors are full, their shapes, rank and scale."""

    r: int
    alpha: float
    full_w1: bool
    full_w2: bool
    split: tuple[tuple[int, int], tuple[int, int]]  # ((out_l, out_k), (in_m, in_n))
    scaling: float


class _ShapedLoKr(LoKrKind):
    """LoKr adapters shaped exactly as a file's (its factor split may not be the default one)."""

    def __init__(self, specs: dict[str, LoKrSpec]):
        self.specs = specs

    def create(self, base_kind, base, path, config):
        s = self.specs[path]
        return LoKrAdapter(base, s.r, s.alpha, full_w1=s.full_w1, full_w2=s.full_w2, split=s.split, scaling=s.scaling)


class LokrFileKind(LoraFileKind):
    name = "lokr"
    adapter_type = LoKrAdapter
    required = frozenset()
    _w1, _w2 = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}), ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})

    def matches(self, keys):
        rest = keys - {"alpha"}
        return any(a | b == rest for a in self._w1 for b in self._w2)

    def spec(self, group, module: nn.Module | None = None) -> LoKrSpec:
        w1, w2 = group.get("lokr_w1"), group.get("lokr_w2")
        out_l, in_m = w1.shape if w1 is not None else (group["lokr_w1_a"].shape[0], group["lokr_w1_b"].shape[1])
        out_k = (w2 if w2 is not None else group["lokr_w2_a"]).shape[0]
        in_total = module.in_channels if isinstance(module, nn.Conv2d) else getattr(module, "in_features", in_m)
        in_n = in_total // in_m if in_m else 0
        # ComfyUI's rule: the rank is the factored factor's (w2 wins when both are), no rank → s = 1
        r = None
        if w1 is None:
            r = int(group["lokr_w1_b"].shape[0])
        if w2 is None:
            r = int(group["lokr_w2_b"].shape[0])
        alpha = float(group["alpha"]) if "alpha" in group else None
        scaling = alpha / r if (r is not None and alpha is not None) else 1.0
        rank = r if r is not None else max(out_k, in_n)
        return LoKrSpec(rank, alpha if alpha is not None else float(rank), w1 is not None, w2 is not None,
                        ((int(out_l), int(out_k)), (int(in_m), int(in_n))), scaling)

    def misfit(self, spec: LoKrSpec, module: nn.Module) -> str | None:
        # W1 ⊗ W2 is (out_l·out_k, in_m·in_n): it must be the module's (out, in) matrix
        out, fan_in, _ = base_shape(module)
        (out_l, out_k), (in_m, in_n) = spec.split
        if out_l * out_k != out or in_m * in_n != fan_in:
            return (f"its Kronecker factors give a ({out_l}·{out_k}, {in_m}·{in_n}) matrix, the module's is "
                    f"({out}, {fan_in})")
        return None

    def params(self, adapter):
        return adapter.peft_tensors()

    def write(self, adapter):
        s = effective_scaling(adapter)
        out = dict(self.params(adapter))
        if adapter.full_w1 and adapter.full_w2:
            # readers use s = 1 for two full factors: fold any other scale into W2, α = r
            out["lokr_w2"] = out["lokr_w2"] * s
            return {**out, "alpha": torch.tensor(float(adapter.r))}
        return {**out, "alpha": torch.tensor(s * adapter.r)}

    def inject(self, module, plan, config, name):
        if all(isinstance(v, LoKrSpec) for v in plan.values()):  # from a file: its exact shapes
            kind = _ShapedLoKr(plan)
            cfg = LoKrConfig(target_modules=list(plan), scale_rule="lycoris")
            inject(module, cfg, name, kind=kind)
            return
        r, alpha, rank_pattern, alpha_pattern = patterns_for(plan)
        inject(module, LoKrConfig(r=r, alpha=alpha, target_modules=list(plan), rank_pattern=rank_pattern,
                                  alpha_pattern=alpha_pattern, decompose_both=config.decompose_both,
                                  decompose_factor=config.lokr_factor, scale_rule="lycoris"), name)


FILE_KINDS = {k.name: k for k in (LoraFileKind(), LohaFileKind(), LokrFileKind())}


def kind_for_adapter(adapter: nn.Module):
    for kind in FILE_KINDS.values():
        if type(adapter) is kind.adapter_type:
            return kind
    return None


def tensor_problems(mod: str, group: dict[str, torch.Tensor]) -> list[str]:
    """What makes a module's file tensors unreadable before any rank or α is taken from them: an
    ``alpha`` that is not one finite number > 0, a factor that is not a 2-D (Linear) or 4-D (conv)
    tensor with non-zero sizes. ``mod`` is the module's name in the file."""
    out = []
    for suffix, t in group.items():
        key = f"{mod}.{suffix}"
        if suffix == "alpha":
            if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
                out.append(f"{key}: {t.dtype} tensor of shape {tuple(t.shape)}; alpha must be one number")
            elif not (math.isfinite(value := float(t)) and value > 0):
                out.append(f"{key} = {value}: alpha must be a finite number > 0")
        elif t.dim() not in (2, 4) or 0 in t.shape:
            out.append(f"{key}: shape {tuple(t.shape)} is not a 2-D (Linear) or 4-D (conv) factor with non-zero sizes")
        elif suffix in MATRIX_ONLY and t.dim() != 2:  # read as (rows, cols) below: a ValueError before
            out.append(f"{key}: shape {tuple(t.shape)}; LoKr's {suffix} is always a 2-D matrix (only lokr_w2 / "
                       "lokr_w2_b hold a conv kernel)")
    return out


#: LoKr factors LyCORIS always writes as matrices, for Linear and conv modules alike.
MATRIX_ONLY = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"})


def classify(group: dict[str, torch.Tensor]):
    """The file kind whose key family a module's tensors form exactly, or None."""
    keys = set(group)
    for kind in FILE_KINDS.values():
        if kind.matches(keys):
            return kind
    return None
