"""A minimal, independent re-statement of loralib's maths and checkpoint layout (microsoft/LoRA
loralib/layers.py, utils.py), written for these tests. It does NOT import lorakit: it is the
reference lorakit.loralib is checked against.

    Linear:        y = x Wᵀ + b + (x Aᵀ Bᵀ)·α/r          A (r, in), B (out, r); W (in, out) if fan_in_fan_out
    MergedLinear:  out rows split in len(enable) equal blocks; enabled block j (in order) gets
                   ΔW_j = B[j·d:(j+1)·d] · A[j·r:(j+1)·r]; other blocks 0.  A (k·r, in), B (k·d, r)
    Embedding:     y = W[ids] + (Aᵀ[ids] Bᵀ)·α/r          A (r, num), B (dim, r)
"""

from __future__ import annotations

import torch
from torch import nn


class NaiveLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float,
                 fan_in_fan_out: bool = False, seed: int = 0):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
        g = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(torch.randn(r, in_f, generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(out_f, r, generator=g) * 0.3)  # nonzero: a trained state
        self.scaling = alpha / r

    def delta(self) -> torch.Tensor:  # (out, in)
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, x):
        w = self.weight.T if self.fan_in_fan_out else self.weight  # (out, in)
        y = x @ (w + self.delta()).T
        return y + self.bias if self.bias is not None else y


class NaiveMergedLinear(NaiveLinear):
    def __init__(self, weight, bias, r, alpha, enable, fan_in_fan_out=False, seed=0):
        super().__init__(weight, bias, r, alpha, fan_in_fan_out, seed)
        self.enable, self.r = list(enable), r
        out_f = self.lora_B.shape[0]
        k, d = sum(enable), out_f // len(enable)
        g = torch.Generator().manual_seed(seed + 1)
        self.lora_A = nn.Parameter(torch.randn(k * r, self.lora_A.shape[1], generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(k * d, r, generator=g) * 0.3)
        self.out_f, self.d = out_f, d

    def delta(self):
        out = torch.zeros(self.out_f, self.lora_A.shape[1])
        j = 0
        for t, on in enumerate(self.enable):
            if on:
                b = self.lora_B[j * self.d:(j + 1) * self.d]
                a = self.lora_A[j * self.r:(j + 1) * self.r]
                out[t * self.d:(t + 1) * self.d] = b @ a
                j += 1
        return out * self.scaling


class NaiveEmbedding(nn.Module):
    def __init__(self, weight, r, alpha, seed=0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        g = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(torch.randn(r, weight.shape[0], generator=g))
        self.lora_B = nn.Parameter(torch.randn(weight.shape[1], r, generator=g))
        self.scaling = alpha / r

    def forward(self, ids):
        w = self.weight + (self.lora_B @ self.lora_A).T * self.scaling
        return w[ids]


def naive_lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """loralib's rule: keys containing 'lora_' (+ 'bias' keys for bias='all')."""
    sd = model.state_dict()
    keep = {k: v for k, v in sd.items() if "lora_" in k}
    if bias == "all":
        keep.update({k: v for k, v in sd.items() if "bias" in k})
    elif bias == "lora_only":
        for k in list(keep):
            b = k.split("lora_")[0] + "bias"
            if b in sd:
                keep[b] = sd[b]
    return keep


def swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def hf_conv1d_to_naive(conv, r, alpha, enable=None, seed=0):
    """A transformers Conv1D (weight (in, out)) as a naive loralib layer with fan_in_fan_out=True."""
    if enable is None:
        return NaiveLinear(conv.weight, conv.bias, r, alpha, fan_in_fan_out=True, seed=seed)
    return NaiveMergedLinear(conv.weight, conv.bias, r, alpha, enable, fan_in_fan_out=True, seed=seed)
