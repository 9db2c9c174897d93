"""loralib's layers (``lora.Linear``, ``lora.Embedding``, ``lora.MergedLinear``, ``lora.Conv1d/2d/3d``)
as thin shells over lorakit's own ``LoraLayer`` host and adapters.

Each shell builds the plain base module (``nn.Linear``, ...) and a ``LoraLayer`` around it, then
registers the *same* parameter objects under loralib's names, so its state dict is loralib's::

    weight, bias            the base layer's (weight (in, out) with fan_in_fan_out=True, as loralib)
    lora_A  (r, in)         lora_B  (out, r)                      Linear, Embedding (A (r, num), B (dim, r))
    lora_A  (k·r, in)       lora_B  (k·out/len(enable_lora), r)   MergedLinear (grouped, see layers/sliced.py)
    lora_A  (r, in, *k)     lora_B  (out, r, 1…)                  Conv: PEFT's factors, NOT loralib's

The host is held outside the module tree (in ``__dict__``), so nothing is registered twice; the
forward, the delta formula and merging are the host's. Differences from loralib are listed in
docs/LORALIB.md: no merge on ``.eval()`` (call :meth:`LoRALayer.merge`), factors kept in fp32,
conv factors in PEFT's layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_kinds.lora import new_lora_adapter
from ..adapter_kinds.sliced import SlicedAdapter
from ..errors import ConfigError
from ..layers.host import LoraLayer
from ..layers.kinds import BaseKind, Conv1DKind, ConvKind, EmbeddingKind, LinearKind
from ..layers.protocol import Adapter

ADAPTER = "default"  # the one adapter a loralib layer carries


class LoRALayer(nn.Module):
    """What every loralib layer has: ``r``, ``lora_alpha``, ``scaling``, ``merged``, ``merge_weights``,
    ``lora_A``/``lora_B`` (when r > 0), explicit :meth:`merge` / :meth:`unmerge`, and the attributes of
    the wrapped base layer (``in_features``, ``kernel_size``, ...)."""

    def _build(self, base: nn.Module, kind: BaseKind, r: int, lora_alpha: float, lora_dropout: float,
               merge_weights: bool, adapter: Adapter | None = None) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"r={r!r}: loralib layers take an integer rank ≥ 0 (0 = no LoRA).")
        if not (0.0 <= float(lora_dropout) < 1.0):
            raise ConfigError(f"lora_dropout={lora_dropout!r}: must be in [0, 1).")
        if r > 0 and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0):
            raise ConfigError(f"lora_alpha={lora_alpha!r}: must be a positive number (loralib's default is 1).")
        host = LoraLayer(base, kind)
        self.__dict__["_host"] = host  # not a submodule: its tensors are registered below under loralib's names
        self.r, self.lora_alpha, self.merge_weights = r, lora_alpha, merge_weights
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", getattr(base, "bias", None))
        if r > 0:
            if adapter is None:  # lorakit's LoRA adapter; init as loralib: B = 0 (Embedding: A = 0)
                adapter = new_lora_adapter(kind, base, r, lora_alpha, lora_alpha / r, float(lora_dropout))
            else:
                adapter.reset()
            host.add(ADAPTER, adapter)
            host.active = (ADAPTER,)
            self.register_parameter("lora_A", adapter.lora_A)
            self.register_parameter("lora_B", adapter.lora_B)
            self.weight.requires_grad_(False)  # loralib freezes the pretrained weight of a LoRA layer
        host.train(self.training)
        self.__dict__["_built"] = True

    # -- loralib's attributes ---------------------------------------------------------------------
    @property
    def host(self) -> LoraLayer:
        """The lorakit ``LoraLayer`` doing the work (base layer + adapter ``"default"``)."""
        return self.__dict__["_host"]

    @property
    def scaling(self) -> float:
        return self.host.lora[ADAPTER].scaling if self.r > 0 else 0.0

    @scaling.setter
    def scaling(self, value: float) -> None:
        if self.r > 0:
            if self.merged:
                raise ConfigError("cannot change scaling while the update is merged; call unmerge() first.")
            self.host.lora[ADAPTER].scaling = float(value)

    @property
    def merged(self) -> bool:
        return ADAPTER in self.host.merged

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            host = self.__dict__.get("_host")
            if host is None or not self.__dict__.get("_built") or name.startswith("_"):
                raise
            return getattr(host.base_layer, name)  # in_features, padding_idx, kernel_size, ...

    # -- behaviour --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)

    def train(self, mode: bool = True):
        """Switch train/eval mode (LoRA dropout on/off). Unlike loralib this never merges: merging is
        :meth:`merge`, explicit, so ``.eval()`` cannot change the weights a state dict saves."""
        super().train(mode)
        self.host.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half()/.cuda(): our registered parameters are converted by nn.Module; the host
        # must then point at the converted tensors (torch may have made new Parameter objects),
        # and its own buffers (MergedLinear's row index) are converted here.
        super()._apply(fn, recurse)
        host = self.host
        host.base_layer._parameters["weight"] = self._parameters["weight"]
        if "bias" in host.base_layer._parameters:
            host.base_layer._parameters["bias"] = self._parameters["bias"]
        if self.r > 0:
            adapter = host.lora[ADAPTER]
            adapter._parameters["lora_A"] = self._parameters["lora_A"]
            adapter._parameters["lora_B"] = self._parameters["lora_B"]
        for module in host.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = fn(buf)
        return self

    def merge(self) -> None:
        """W ← W + s·ΔW in place (idempotent). The forward then skips the LoRA branch."""
        self.host.merge([ADAPTER] if self.r > 0 else [])

    def unmerge(self) -> None:
        """Subtract the merged update again (restores W up to rounding)."""
        self.host.unmerge()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in the layout of ``weight`` (zeros when r = 0)."""
        if self.r == 0:
            return torch.zeros_like(self.weight)
        return self.host.delta(ADAPTER)

    def extra_repr(self) -> str:
        return f"{self.host.base_layer!r}, r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"


class _FanInFanOutLinear(nn.Module):
    """A linear layer whose weight is stored (in, out), like GPT-2's Conv1D: y = x W + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)  # nn.Linear's init
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(lin.weight.detach().T.contiguous())
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.T, self.bias)


def _linear_base(in_features: int, out_features: int, fan_in_fan_out: bool, kwargs) -> tuple[nn.Module, BaseKind]:
    if fan_in_fan_out:
        return _FanInFanOutLinear(in_features, out_features, **kwargs), Conv1DKind()
    return nn.Linear(in_features, out_features, **kwargs), LinearKind()


class Linear(LoRALayer):
    """``nn.Linear`` with LoRA: y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ, s = lora_alpha / r (Hu et al. §4.1).

    ``fan_in_fan_out=True`` stores ``weight`` as (in, out), as a GPT-2 Conv1D does (loralib's flag).
    ``merge_weights`` is kept for signature compatibility; merging happens only through :meth:`merge`.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs):
        super().__init__()
        base, kind = _linear_base(in_features, out_features, fan_in_fan_out, kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._build(base, kind, r, lora_alpha, lora_dropout, merge_weights)


class MergedLinear(LoRALayer):
    """A fused projection (e.g. GPT-2's qkv ``c_attn``) with LoRA on the slices ``enable_lora`` marks:
    ``enable_lora=[True, False, True]`` adapts q and v, not k (layout: ``lorakit/layers/sliced.py``)."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        super().__init__()
        enable = [bool(e) for e in enable_lora]
        base, kind = _linear_base(in_features, out_features, fan_in_fan_out, kwargs)
        adapter = None
        if r > 0 and any(enable):
            adapter = SlicedAdapter(in_features, out_features, enable, r, lora_alpha, lora_alpha / r,
                                    float(lora_dropout), where=f"MergedLinear({in_features}, {out_features})",
                                    device=base.weight.device)
        elif len(enable) == 0 or out_features % len(enable) != 0:
            raise ConfigError(f"MergedLinear({in_features}, {out_features}): enable_lora has {len(enable)} "
                              f"entries, which does not divide out_features={out_features}.")
        self.enable_lora, self.fan_in_fan_out = enable, fan_in_fan_out
        self._build(base, kind, r if adapter is not None else 0, lora_alpha, lora_dropout, merge_weights, adapter)


class Embedding(LoRALayer):
    """``nn.Embedding`` with LoRA: rows of Aᵀ (r wide) projected by B; A starts at 0, B ~ N(0, 1)
    (what loralib's code does — its comment says the opposite)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs):
        super().__init__()
        base = nn.Embedding(num_embeddings, embedding_dim, **kwargs)
        self._build(base, EmbeddingKind(), r, lora_alpha, 0.0, merge_weights)


class _ConvLoRA(LoRALayer):
    """Convolution with LoRA in PEFT's factorization: A is a conv with the base's kernel (in → r),
    B a 1×…×1 conv (r → out); ΔW = s·B·A over the flattened kernel. (loralib's own conv factors are
    (r·k, in·k) and (out·k, r·k) reshaped into the kernel; those checkpoints do not load here.)"""

    _conv: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        super().__init__()
        base = self._conv(in_channels, out_channels, kernel_size, **kwargs)
        self._build(base, ConvKind(), r, lora_alpha, lora_dropout, merge_weights)

    @property
    def conv(self) -> nn.Module:
        """The wrapped convolution (loralib's ``ConvLoRA.conv``)."""
        return self.host.base_layer


class Conv1d(_ConvLoRA):
    _conv = nn.Conv1d


class Conv2d(_ConvLoRA):
    _conv = nn.Conv2d


class Conv3d(_ConvLoRA):
    _conv = nn.Conv3d
