"""LoRA on chosen output slices of a fused projection (loralib's ``MergedLinear``).

A fused projection computes several outputs with one weight: GPT-2's ``c_attn`` gives [q | k | v]
(3·d rows), Phi-3's ``qkv_proj`` the same. The LoRA paper adapts only q and v of GPT-2 (Hu et al.
2021, §4.2 and the GPT-2 runs of §5; loralib ``MergedLinear(enable_lora=[True, False, True])``): each
enabled slice j gets its own pair (A_j: r × in, B_j: d_slice × r) and the other slices get nothing.

Layout (loralib's, so its checkpoints load as they are)::

    lora_A  (k·r, in)          A_j = lora_A[j·r:(j+1)·r]           k = number of enabled slices
    lora_B  (k·d_slice, r)     B_j = lora_B[j·d_slice:(j+1)·d_slice]

    ΔW[rows_j] = s · B_j A_j   (zero on the rows of disabled slices)

What a *slice* is: the output rows are viewed as ``(heads, n, d)`` with n = len(enable); slice t is
every row ``(h, t, :)``. ``heads = 1`` is the plain concatenation [q | k | v] (GPT-2, Phi-3);
GPT-NeoX's ``query_key_value`` interleaves per head ((heads, 3, head_dim)), so there ``heads`` is the
number of attention heads and "q" is the q block of every head. B_j's rows follow the output rows of
slice j in increasing order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError


def slice_rows(fan_out: int, enable: Sequence[bool], heads: int = 1, where: str = "this layer") -> list[torch.Tensor]:
    """Output row indices of every enabled slice (see the module docstring), checked to divide."""
    n = len(enable)
    if n == 0 or fan_out % (n * heads) != 0:
        raise ConfigError(
            f"{where}: enable_lora has {n} entries (× {heads} head(s)), which does not divide the "
            f"{fan_out} outputs of the fused projection; give one entry per fused block, e.g. "
            "[True, False, True] for q, k, v of equal size."
        )
    d = fan_out // (n * heads)
    grid = torch.arange(fan_out).view(heads, n, d)
    return [grid[:, t, :].reshape(-1) for t in range(n) if enable[t]]


class SlicedAdapter(nn.Module):
    """Factors of LoRA on the enabled slices of a fused projection (layout in the module docstring)."""

    def __init__(self, fan_in: int, fan_out: int, enable: Sequence[bool], r: int, alpha: float,
                 scaling: float, dropout: float, heads: int = 1, where: str = "this layer",
                 device: torch.device | str | None = None):
        super().__init__()
        enable = [bool(e) for e in enable]
        if not any(enable):
            raise ConfigError(f"{where}: enable_lora {enable} enables no slice; set at least one entry to True.")
        rows = slice_rows(fan_out, enable, heads, where)
        k, d_slice = len(rows), rows[0].numel()
        self.enable, self.heads, self.fan_out = enable, heads, fan_out
        self.lora_A = nn.Parameter(torch.empty(k * r, fan_in, device=device))
        self.lora_B = nn.Parameter(torch.empty(k * d_slice, r, device=device))
        # Output row of each row of lora_B; not saved (it follows from enable and the shape).
        self.register_buffer("rows", torch.cat(rows).to(device), persistent=False)
        self.r, self.alpha, self.scaling, self.dropout = r, alpha, scaling, dropout

    @property
    def groups(self) -> int:
        return sum(self.enable)

    def reset(self, zero_b: bool = True, mode: bool | str = True) -> None:
        """A Kaiming-uniform (as nn.Linear), B = 0 (Hu et al. §4.1); ``mode=False``: B random too."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if mode is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as (k, r, in) and (k, d_slice, r) stacks."""
        k = self.groups
        return self.lora_A.view(k, self.r, -1), self.lora_B.view(k, -1, self.r)

    def delta_2d(self) -> torch.Tensor:
        """ΔW (fan_out, fan_in): s·B_j A_j on the rows of slice j, zero elsewhere."""
        a, b = self.blocks()
        per_slice = torch.bmm(b, a).reshape(-1, a.shape[-1]) * self.scaling  # (k·d_slice, in)
        out = per_slice.new_zeros(self.fan_out, a.shape[-1])
        return out.index_copy(0, self.rows, per_slice)

    def full_width(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same ΔW as an ordinary LoRA pair of rank k·r: A (k·r, in) and a block-diagonal B
        (fan_out, k·r) whose rows of disabled slices are zero. This is PEFT's form of the adapter
        (with α scaled by k so that α/(k·r) = α/r) and the narrowest exact one: ΔW has rank up to k·r."""
        a, b = self.blocks()
        bd = torch.block_diag(*b.unbind(0))  # (k·d_slice, k·r)
        full_b = bd.new_zeros(self.fan_out, bd.shape[1]).index_copy(0, self.rows, bd)
        return self.lora_A, full_b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        # The host's linear branch takes one (A, B) pair; the full-width form gives it exactly ΔW.
        a, b = self.full_width()
        return a, b, self.scaling

    def extra_repr(self) -> str:
        return (f"enable={self.enable}, heads={self.heads}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, dropout={self.dropout}")
