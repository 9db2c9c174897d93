"""LoRA on chosen output slices of a fused projection (loralib's ``MergedLinear``; ``LoraConfig.fused_slices``).

A fused projection computes several outputs with one weight: GPT-2's ``c_attn`` gives [q | k | v]
(3·d rows), Phi-3's ``qkv_proj`` the same. The LoRA paper adapts q and v only (Hu et al. 2021, §4.2;
its GPT-2 code uses loralib ``MergedLinear(enable_lora=[True, False, True])``): each enabled slice j
gets its own pair (A_j: r × in, B_j: d × r), the other slices get nothing.

Layout (loralib's, so its checkpoints load as they are)::

    lora_A  (k·r, in)      A_j = lora_A[j·r:(j+1)·r]           k = number of enabled slices
    lora_B  (k·d, r)       B_j = lora_B[j·d:(j+1)·d]

    ΔW[rows_j] = s · B_j A_j        zero on the rows of disabled slices

What a *slice* is: the output rows are viewed as ``(heads, n, d)`` with n = len(enable); slice t is
every row ``(h, t, :)``. ``heads = 1``: the plain concatenation [q | k | v] (GPT-2 ``c_attn``, Phi-3
``qkv_proj``). GPT-NeoX's ``query_key_value`` interleaves per head — rows (heads, 3, head_dim) — so
there give ``heads = num_attention_heads`` and "q" is the q block of every head. B_j's rows follow the
output rows of slice j in increasing order.

Forward: x → A (all k slices in one GEMM) → per-slice B (one batched GEMM) → added to the output
columns of the enabled slices only; no block for a disabled slice is built.

File (PEFT's format): PEFT has no sliced LoRA, so the adapter is written as the same ΔW in plain
LoRA form — ``lora_A.weight`` = A (k·r, in) and ``lora_B.weight`` (fan_out, k·r), block-diagonal:
rows of slice j hold B_j in columns j·r…(j+1)·r, rows of disabled slices are zero — with rank k·r
and α·k (α·√k under rsLoRA) in ``rank_pattern``/``alpha_pattern`` so the scaling stays α/r. That is
the narrowest exact form: ΔW has rank up to k·r. ``adapter_config.json`` also carries
``fused_slices`` (PEFT ignores it with a warning), so lorakit loads the file back as this kind.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError
from ..layers.dropout import apply_mask
from ..layers.kinds import BaseKind
from ..layers.protocol import Adapter, AdapterKind, base_device
from ..state import layer_adapters
from .lora import LORA


def slice_rows(fan_out: int, enable: Sequence[bool], heads: int = 1, where: str = "this layer") -> list[torch.Tensor]:
    """Output row indices of every enabled slice (see the module docstring), checked to divide."""
    n = len(enable)
    if n == 0 or fan_out % (n * heads) != 0:
        raise ConfigError(
            f"{where}: enable_lora has {n} entries (× {heads} head(s)), which does not divide the "
            f"{fan_out} outputs of the fused projection; give one entry per fused block of equal size, "
            "e.g. [True, False, True] for q, k, v."
        )
    grid = torch.arange(fan_out).view(heads, n, fan_out // (n * heads))
    return [grid[:, t, :].reshape(-1) for t in range(n) if enable[t]]


class SlicedAdapter(Adapter):
    """Factors of LoRA on the enabled slices of a fused projection (layout in the module docstring)."""

    def __init__(self, fan_in: int, fan_out: int, enable: Sequence[bool], r: int, alpha: float,
                 scaling: float, dropout: float, heads: int = 1, where: str = "this layer",
                 device: torch.device | str | None = None):
        super().__init__()
        enable = [bool(e) for e in enable]
        if not any(enable):
            raise ConfigError(f"{where}: enable_lora {enable} enables no slice; set at least one entry to True.")
        rows = slice_rows(fan_out, enable, heads, where)
        k, d = len(rows), rows[0].numel()
        self.enable, self.heads, self.fan_out = enable, heads, fan_out
        self.lora_A = nn.Parameter(torch.empty(k * r, fan_in, device=device))  # (k·r, in)
        self.lora_B = nn.Parameter(torch.empty(k * d, r, device=device))  # (k·d, r)
        # Output row of each row of lora_B; not saved (it follows from enable, heads and the shape).
        self.register_buffer("rows", torch.cat(rows).to(device), persistent=False)
        self.r, self.alpha, self.scaling, self.dropout = r, alpha, scaling, dropout

    @property
    def groups(self) -> int:
        return sum(self.enable)

    def reset(self, mode: bool | str = True) -> None:
        """A Kaiming-uniform (as nn.Linear) or N(0, 1/r²) ("gaussian"); B = 0 (Hu et al. §4.1).
        ``mode=False``: B random too (ΔW ≠ 0, for tests)."""
        with torch.no_grad():
            if mode == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if mode is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def _blocks(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as (k, r, in) and (k, d, r) stacks."""
        k = self.groups
        a, b = self.lora_A.view(k, self.r, -1), self.lora_B.view(k, -1, self.r)
        return (a, b) if dtype is None else (a.to(dtype), b.to(dtype))

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (fan_out, fan_in): s·B_j A_j on the rows of slice j, zero elsewhere."""
        a, b = self._blocks()
        per_slice = torch.bmm(b, a).reshape(-1, a.shape[-1]) * self.scaling  # (k·d, in)
        return per_slice.new_zeros(self.fan_out, a.shape[-1]).index_copy(0, self.rows, per_slice)

    def forward_into(self, kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        dt = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
        x2 = apply_mask(x2, mask)
        a, b = self._blocks(dt)
        k, n = self.groups, x2.shape[0]
        xa = (x2 @ a.reshape(k * self.r, -1).T) * self.scaling  # (N, k·r): every slice's A in one GEMM
        y = torch.bmm(xa.view(n, k, self.r).transpose(0, 1), b.transpose(1, 2))  # (k, N, d)
        y = y.transpose(0, 1).reshape(n, -1)  # (N, k·d), columns in the order of self.rows
        out = base_out.reshape(n, self.fan_out).index_add(1, self.rows, y)  # only the enabled columns
        return out.view(base_out.shape)

    def full_width(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same ΔW as a plain LoRA pair of rank k·r: A (k·r, in), block-diagonal B (fan_out, k·r)."""
        _, b = self._blocks()
        bd = torch.block_diag(*b.unbind(0))  # (k·d, k·r)
        return self.lora_A, bd.new_zeros(self.fan_out, bd.shape[1]).index_copy(0, self.rows, bd)

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        a, b = self.full_width()
        return {"lora_A.weight": a, "lora_B.weight": b}

    @torch.no_grad()
    def load_peft_tensors(self, kind: BaseKind, tensors: dict[str, torch.Tensor]) -> None:
        a, full_b = tensors["lora_A.weight"], tensors["lora_B.weight"].to(self.lora_B.dtype)
        k, r = self.groups, self.r
        blocks = []
        for j, rows in enumerate(self.rows.view(k, -1).cpu()):
            blocks.append(full_b[rows, j * r:(j + 1) * r])
        expected = torch.block_diag(*blocks)
        rebuilt = full_b.new_zeros(full_b.shape).index_copy(0, self.rows.cpu(), expected)
        if not torch.equal(rebuilt, full_b):
            raise AdapterFileError(
                f"lora_B.weight of a fused_slices layer (enable {self.enable}) is not block-diagonal with zero "
                "rows for the disabled slices, so it is not a sliced adapter; load the file as plain LoRA "
                "(drop fused_slices from its adapter_config.json)."
            )
        self.lora_A.copy_(a.to(self.lora_A.dtype))
        self.lora_B.copy_(torch.cat(blocks, dim=0))

    def extra_repr(self) -> str:
        return (f"enable={self.enable}, heads={self.heads}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, dropout={self.dropout}")


def _spec_for(config: LoraConfig, path: str):
    for name, spec in config.fused_slices.items():
        if path == name or path.endswith("." + name):
            return spec
    return None


class SlicedKind(AdapterKind):
    """A ``LoraConfig`` with ``fused_slices``: the named fused projections get a :class:`SlicedAdapter`,
    every other target plain LoRA."""

    name = "lora_sliced"
    peft_type = "LORA"
    config_type = LoraConfig

    def accepts_config(self, config) -> bool:
        return type(config) is LoraConfig and bool(config.fused_slices)

    def accepts_file(self, raw: dict) -> bool:
        return raw.get("peft_type", "LORA") == "LORA" and bool(raw.get("fused_slices"))

    def create(self, base_kind, base, path, config: LoraConfig) -> Adapter:
        spec = _spec_for(config, path)
        if spec is None:
            return LORA.create(base_kind, base, path, config)
        if not base_kind.linear:
            raise ConfigError(f"fused_slices entry for {path!r}: a {type(base).__name__} is not a linear "
                              "projection; fused slices apply to Linear / GPT-2 Conv1D layers.")
        fan_in, fan_out = base_kind.dims(base)
        adapter = SlicedAdapter(fan_in, fan_out, spec.enable, config.rank_for(path), config.alpha_for(path),
                                config.scaling_for(path), float(config.lora_dropout), spec.heads,
                                where=f"fused_slices for {path!r}", device=base_device(base))
        adapter.reset(config.init_lora_weights)
        return adapter

    def file_config(self, model, adapter_name, config: LoraConfig) -> LoraConfig:
        """PEFT's view: each sliced layer is plain LoRA of rank k·r with α·k (√k under rsLoRA)."""
        ranks, alphas = {}, {}
        for path, _, ad in layer_adapters(model, adapter_name, SlicedAdapter):
            ranks[re.escape(path)] = ad.groups * ad.r
            alphas[re.escape(path)] = ad.alpha * (math.sqrt(ad.groups) if config.use_rslora else ad.groups)
        # the exact paths come first: _pattern_value (and PEFT) take the first matching key
        return dataclasses.replace(config, rank_pattern={**ranks, **config.rank_pattern},
                                   alpha_pattern={**alphas, **config.alpha_pattern})

    def config_from_file(self, raw: dict, source: str) -> LoraConfig:
        """Undo :meth:`file_config`: per-slice r and α for the sliced layers' exact-path patterns."""
        config = LoraConfig.from_peft_dict(raw, source=source)
        rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
        for key in list(rank_pattern):
            path = re.sub(r"\\(.)", r"\1", key)
            spec = _spec_for(config, path)
            if spec is None or re.escape(path) != key:
                continue
            k = sum(spec.enable)
            if rank_pattern[key] % k:
                raise AdapterFileError(f"{source}: rank_pattern[{key!r}] = {rank_pattern[key]} is not a multiple of "
                                       f"the {k} enabled slices of fused_slices; the file is not a sliced adapter.")
            rank_pattern[key] //= k
            if key in alpha_pattern:
                alpha_pattern[key] /= math.sqrt(k) if config.use_rslora else k
        return dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


SLICED = SlicedKind()

__all__ = ["SLICED", "SlicedAdapter", "SlicedKind", "slice_rows"]
