"""LoKr: Kronecker-product update (Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", ICLR 2024, §3.2; LyCORIS' ``lokr``).

    ΔW = s · W1 ⊗ W2        W1: (out_l, in_m)   W2: (out_k, in_n[, k, k])
    out = out_l · out_k,  in = in_m · in_n      (``factorization``: LyCORIS' split of each dimension)

Each factor is stored full (``lokr_w1`` / ``lokr_w2``) or as a rank-r product (``lokr_w1_a`` (out_l, r) ·
``lokr_w1_b`` (r, in_m); ``lokr_w2_a`` (out_k, r) · ``lokr_w2_b`` (r, in_n·k·k)). LyCORIS' choice, also
PEFT's: W2 is factored when r < max(out_k, in_n)/2, W1 only with ``decompose_both`` and
r < max(out_l, in_m)/2. Scale: s = α/r, except LyCORIS' rule that a module whose factors are *both
full* has s = 1 (it sets α = r; ComfyUI likewise ignores α then). PEFT always uses α/r — lorakit
keeps the scale an adapter was created or loaded with (``scaling``) and writes files so that each
reader gets the same ΔW. Tucker convs (``lokr_t2``) are not implemented.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from ..layers.kinds import BaseKind
from ..layers.protocol import Adapter, AdapterKind, base_device
from ..state import layer_adapters
from ._dense import apply_dense, base_shape, refuses
from .lycoris_config import LoKrConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` = m·n with m ≤ n (LyCORIS): ``factor`` > 0 dividing it gives (factor, dim/factor);
    otherwise m grows through the divisors while m + n shrinks and m ≤ factor (-1: no bound, i.e. the
    most balanced split). E.g. 256 → (16, 16), 128 → (8, 16), 127 → (1, 127), 128 with factor 4 → (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > bound:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def lycoris_scaling(r: int, alpha: float, full_w1: bool, full_w2: bool) -> float:
    """LyCORIS: α/r, but 1 when both Kronecker factors are full matrices."""
    return 1.0 if (full_w1 and full_w2) else float(alpha) / r


class LoKrAdapter(Adapter):
    """W1 (full or w1_a·w1_b) and W2 (full or w2_a·w2_b) of one layer; ``delta_2d`` is the one LoKr formula."""

    def __init__(self, base: nn.Module, r: int, alpha: float, factor: int = -1, decompose_both: bool = False,
                 full_w1: bool | None = None, full_w2: bool | None = None, scaling: float | None = None,
                 split: tuple[tuple[int, int], tuple[int, int]] | None = None):
        super().__init__()
        out, fan_in, k = base_shape(base)
        (out_l, out_k), (in_m, in_n) = split or (factorization(out, factor), factorization(fan_in, factor))
        if out_l * out_k != out or in_m * in_n != fan_in:
            raise ValueError(f"LoKr split {(out_l, out_k)} × {(in_m, in_n)} does not give ({out}, {fan_in})")
        if full_w1 is None:
            full_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
        if full_w2 is None:
            full_w2 = not (r < max(out_k, in_n) / 2)
        if full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, in_m))
        if full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *k))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_n * math.prod(k)))
        self.full_w1, self.full_w2 = full_w1, full_w2
        self.r, self.alpha = r, float(alpha)
        self.scaling = lycoris_scaling(r, alpha, full_w1, full_w2) if scaling is None else float(scaling)
        self.dropout = 0.0

    def reset(self, zero: bool | str = True) -> None:
        """ΔW = 0 at start: PEFT's way (True) zeroes W1 (or w1_a); LyCORIS' way ("lycoris") zeroes W2
        (or w2_b). ``zero=False`` makes every factor random (tests)."""
        with torch.no_grad():
            for p in self.parameters():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if zero == "lycoris":
                nn.init.zeros_(self.lokr_w2 if self.full_w2 else self.lokr_w2_b)
            elif zero:
                nn.init.zeros_(self.lokr_w1 if self.full_w1 else self.lokr_w1_a)

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b  # (out_l, in_m)

    def w2(self) -> torch.Tensor:
        return self.lokr_w2.flatten(1) if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b  # (out_k, in_n·k·k)

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s · W1 ⊗ W2 as an (out, in·k·k) matrix. With W2 flattened to (out_k, in_n·k·k), the 2-D
        Kronecker product lays columns out as (in_m, in_n, k, k) — the conv weight's own order."""
        return torch.kron(self.w1(), self.w2()) * self.scaling

    def apply(self, kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        return apply_dense(kind, base, base_out, x, self.delta_2d(), mask)

    def peft_tensors(self, kind: BaseKind | None = None) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"w1={'full' if self.full_w1 else 'a·b'}, w2={'full' if self.full_w2 else 'a·b'}")


class LoKrKind(AdapterKind):
    """LoKr on the adapter protocol: ``LoKrConfig``; files with ``peft_type: "LOKR"``."""

    name = "lokr"
    peft_type = "LOKR"
    config_type = LoKrConfig

    def refuses(self, base_kind, base):
        return refuses(base, "LoKr")

    def create(self, base_kind, base, path, config: LoKrConfig) -> LoKrAdapter:
        r, alpha = config.rank_for(path), config.alpha_for(path)
        adapter = LoKrAdapter(base, r, alpha, factor=config.decompose_factor, decompose_both=config.decompose_both,
                              scaling=None if config.scale_rule == "lycoris" else alpha / r)
        adapter.reset(zero=config.init_weights)
        return adapter.to(base_device(base))

    def file_config(self, model, adapter_name, config: LoKrConfig) -> LoKrConfig:
        """PEFT scales by α/r everywhere: give each module whose scale differs (LyCORIS' rule) α = s·r."""
        extra = {}
        for path, _, ad in layer_adapters(model, adapter_name, LoKrAdapter):
            if abs(_own_scaling(ad) - config.alpha_for(path) / ad.r) > 1e-12:
                extra[re.escape(path)] = _own_scaling(ad) * ad.r
        if not extra:
            return config
        return dataclasses.replace(config, alpha_pattern={**config.alpha_pattern, **extra}, scale_rule="peft")


def _own_scaling(adapter: LoKrAdapter) -> float:
    return float(getattr(adapter, "base_scaling", adapter.scaling))  # without a set_adapters weight


LOKR = LoKrKind()
