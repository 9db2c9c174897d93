"""``DiffusionLoraConfig``: one adapter over a pipeline's UNet (and text encoders), kohya's knobs.

The fields mirror kohya-ss/sd-scripts' ``--network_dim / --network_alpha`` and its
``conv_dim / conv_alpha`` network args (LoCon); ``kind`` picks LoRA, LoHa or LoKr (LyCORIS).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..config import LoraConfig
from ..errors import ConfigError
from ..validate import check_bool

Kind = Literal["lora", "loha", "lokr"]
KINDS = ("lora", "loha", "lokr")


@dataclass
class DiffusionLoraConfig:
    """Settings of one image-model adapter.

    Attributes:
        kind: "lora" (ΔW = α/r·B·A), "loha" (Hadamard product of two low-rank matrices) or "lokr"
            (Kronecker product) — see ``lorakit.diffusion.loha`` / ``lokr``.
        rank, alpha: rank and α of Linear / 1×1-conv modules (kohya's network_dim / network_alpha).
        conv_rank, conv_alpha: rank and α of the k×k convolutions of ResNet and sampler blocks
            (LoCon; kohya's conv_dim / conv_alpha). None: convolutions are not adapted.
        text_encoder: also adapt the CLIP text encoder(s).
        unet: adapt the UNet (False: text encoders only).
        dropout: dropout on the adapter branch input (LoRA only).
        lokr_factor: LoKr's dimension factor (-1: the most balanced split, LyCORIS' default).
        decompose_both: LoKr: also factor the small Kronecker factor W1 into w1_a·w1_b.
    """

    kind: str = "lora"
    rank: int = 4
    alpha: float = 4.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    text_encoder: bool = False
    unet: bool = True
    dropout: float = 0.0
    lokr_factor: int = -1
    decompose_both: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r}: use one of {', '.join(KINDS)}.")
        for name in ("rank",) + (("conv_rank",) if self.conv_rank is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be an integer ≥ 1.")
        for name in ("alpha",) + (("conv_alpha",) if self.conv_alpha is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}={v!r}: must be a positive number.")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ConfigError("conv_alpha is set but conv_rank is not; set conv_rank to adapt convolutions.")
        d = self.dropout  # float('x') was a bare ValueError, float(None) a TypeError
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ConfigError(f"dropout={d!r}: must be a number in [0, 1).")
        for name in ("text_encoder", "unet", "decompose_both"):
            check_bool(name, getattr(self, name))  # "no" would read as True
        if self.dropout and self.kind != "lora":
            raise ConfigError(f"dropout is only implemented for kind='lora', not {self.kind!r}; set dropout=0.")
        if not self.unet and not self.text_encoder:
            raise ConfigError("unet=False and text_encoder=False: nothing to adapt.")
        if isinstance(self.lokr_factor, bool) or not isinstance(self.lokr_factor, int) or (self.lokr_factor < 1 and self.lokr_factor != -1):
            raise ConfigError(f"lokr_factor={self.lokr_factor!r}: use -1 (balanced) or a positive integer.")

    @property
    def locon(self) -> bool:
        return self.conv_rank is not None

    def rank_alpha(self, kxk_conv: bool) -> tuple[int, float]:
        if kxk_conv and self.conv_rank is not None:
            return self.conv_rank, float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return self.rank, float(self.alpha)


def lora_config_for(per_module: Mapping[str, tuple[int, float]], dropout: float = 0.0,
                    init: bool | str = True) -> LoraConfig:
    """A ``LoraConfig`` that adapts exactly the paths of ``per_module`` ({path: (rank, alpha)}).

    The most common (rank, alpha) becomes r / lora_alpha; the others go into rank_pattern /
    alpha_pattern keyed by the escaped full path (PEFT's pattern rule, so the config also reads in PEFT).
    """
    r0, a0, rank_pattern, alpha_pattern = patterns_for(per_module)
    return LoraConfig(r=int(r0), lora_alpha=float(a0), lora_dropout=dropout, target_modules=list(per_module),
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=init)


def patterns_for(per_module: Mapping[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
    """(r, alpha, rank_pattern, alpha_pattern) reproducing ``{path: (rank, alpha)}`` under PEFT's rules."""
    if not per_module:
        raise ConfigError("no module to adapt.")
    r0 = Counter(r for r, _ in per_module.values()).most_common(1)[0][0]
    a0 = Counter(a for _, a in per_module.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(p): r for p, (r, _) in per_module.items() if r != r0}
    alpha_pattern = {re.escape(p): a for p, (_, a) in per_module.items() if a != a0}
    return int(r0), float(a0), rank_pattern, alpha_pattern
