"""O-LoRA's adapter kind (Wang et al., EMNLP 2023 Findings, arXiv 2310.14152): frozen factors of the
past tasks plus a trainable pair for the current one. The loss term and the task sequencing are in
``lorakit.variants.olora``.

    y = W x + [B_past | B_t] · s · [A_past ; A_t] x          A_past: (R, in), A_t: (r, in)
      = W x + Σ_{i<t} s_i B_i A_i x  +  s B_t A_t x          (one fused rank-(R + r) branch)

The scaling of past tasks is folded into the stored past B, so the sum of updates stays exact even if
tasks used different scalings. On the adapter protocol the concatenated factors are the fused
branch's (A, B) and also the file's tensors: an O-LoRA adapter is saved as ONE plain PEFT LoRA adapter
of rank R + r with α chosen so that α/(R + r) = s (``peft_type: "LORA"``; it loads back as plain LoRA,
or as the past of a new O-LoRA adapter with ``lorakit.variants.olora.load_past``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterNotFoundError
from ..layers.kinds import BaseKind, Geometry, init_factors
from ..layers.protocol import Adapter, AdapterKind, base_device
from ..state import layer_adapters


class OLoraAdapter(Adapter):
    """Frozen past factors (buffers, so no optimizer or ``requires_grad`` refresh can touch them)
    plus one trainable pair for the current task. Same contract as ``LoraAdapter``."""

    def __init__(self, geometry: Geometry, r: int, alpha: float, scaling: float, dropout: float,
                 zero_b: bool = True, device: torch.device | str | None = None):
        super().__init__()
        a_shape, b_shape = geometry.a_shape, geometry.b_shape
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device))  # (r, in…)  current task
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device))  # (out, r…)
        # Past tasks, scaling folded into B: ΔW_past = past_B · past_A (no extra factor).
        self.register_buffer("past_A", torch.zeros((0, *a_shape[1:]), device=device))  # (R, in…)
        self.register_buffer("past_B", torch.zeros((b_shape[0], 0, *b_shape[2:]), device=device))  # (out, R…)
        self.r, self.alpha, self.scaling, self.dropout = r, alpha, scaling, dropout
        self.zero_b = zero_b
        self.past_ranks: list[int] = []  # rank of each finished task, in order

    def reset(self, mode: bool | str = True) -> None:
        init_factors(self.lora_A, self.lora_B, self.zero_b, mode)

    @property
    def past_rank(self) -> int:
        return self.past_A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """([A_past; A_t], [B_past/s | B_t], s): one rank-(R + r) branch whose update is the exact sum."""
        if self.past_rank == 0:
            return self.lora_A, self.lora_B, self.scaling
        a = torch.cat([self.past_A.to(self.lora_A.dtype), self.lora_A], dim=0)  # (R + r, in…)
        b = torch.cat([self.past_B.to(self.lora_B.dtype) / self.scaling, self.lora_B], dim=1)  # (out, R + r…)
        return a, b, self.scaling

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s · B·A over past and current factors, as a (fan_out, fan_in) matrix."""
        a, b, s = self.factors()
        return (b.flatten(1) @ a.flatten(1)) * s

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        """Past + current factors as ONE plain LoRA pair of rank R + r (a new tensor once R > 0): the
        file is an ordinary PEFT LoRA adapter (see :meth:`OLoraKind.file_config` for its α)."""
        a, b, _ = self.factors()
        if kind.embedding:
            return {"lora_embedding_A": a, "lora_embedding_B": b}
        return {"lora_A.weight": a, "lora_B.weight": b}

    @torch.no_grad()
    def consolidate(self) -> None:
        """Append the current factors to the past ones and start a fresh pair (§3.3)."""
        self.past_A = torch.cat([self.past_A, self.lora_A.detach().to(self.past_A.dtype)], dim=0)
        self.past_B = torch.cat([self.past_B, (self.lora_B.detach() * self.scaling).to(self.past_B.dtype)], dim=1)
        self.past_ranks.append(self.r)
        self.reset()

    def extra_repr(self) -> str:
        return f"r={self.r}, past_ranks={self.past_ranks}, alpha={self.alpha}, scaling={self.scaling:g}"


class OLoraKind(AdapterKind):
    """Chosen explicitly (``inject(..., kind=OLORA)`` / ``add_olora``): a ``LoraConfig`` means plain
    LoRA by default, and the file this kind writes is a plain LoRA file."""

    name = "olora"
    peft_type = "LORA"
    config_type = LoraConfig

    def accepts_config(self, config) -> bool:
        return False

    def accepts_file(self, raw) -> bool:
        return False

    def refuses(self, base_kind, base):
        if base_kind.grouped:  # its past/new factor blocks are plain (out, R) matrices
            return (f"O-LoRA is not supported on grouped convolutions (groups={base.groups}). Remove it from "
                    "target_modules, or adapt it with plain LoRA")
        return None

    def create(self, base_kind, base, path, config: LoraConfig) -> OLoraAdapter:
        r = config.rank_for(path)
        adapter = OLoraAdapter(base_kind.geometry(base, r), r, config.alpha_for(path), config.scaling_for(path),
                               0.0 if base_kind.embedding else float(config.lora_dropout),
                               zero_b=base_kind.zero_b, device=base_device(base))
        adapter.reset(config.init_lora_weights)
        return adapter

    def file_config(self, model, adapter_name, config: LoraConfig) -> LoraConfig:
        """The flat LoRA config of rank R + r per layer with α/(R + r) = s (α/√(R + r) under rsLoRA)."""
        ranks, alphas = {}, {}
        for path, _, ad in layer_adapters(model, adapter_name, OLoraAdapter):
            rank = ad.past_rank + ad.r
            ranks[path] = rank
            alphas[path] = ad.scaling * (math.sqrt(rank) if config.use_rslora else rank)
        if not ranks:
            raise AdapterNotFoundError(f"adapter {adapter_name!r} has no O-LoRA layers to save.")
        r0, a0 = next(iter(ranks.values())), next(iter(alphas.values()))
        uniform = all(r == r0 for r in ranks.values()) and all(math.isclose(a, a0) for a in alphas.values())
        # rank_pattern keys are regexes matched against the end of a module path: escape the paths.
        return dataclasses.replace(
            config, r=r0, lora_alpha=a0,
            rank_pattern={} if uniform else {re.escape(p): r for p, r in ranks.items()},
            alpha_pattern={} if uniform else {re.escape(p): a for p, a in alphas.items()},
        )


OLORA = OLoraKind()
