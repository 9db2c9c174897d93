"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353): an adapter kind on
the adapter protocol (``lorakit.layers.protocol``), selected by ``LoraConfig(use_dora=True)``.

DoRA splits the adapted weight into a magnitude and a direction (§3, eq. 2 and 5)::

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c        m: (fan_out,) trainable, ‖·‖_c: the norm of each
                                                    output channel's row of the (fan_out, fan_in) matrix

and treats the norm as a constant in backward (§4.3: "‖V + ΔV‖_c … won't receive any gradient"), so
the gradient reaches m, A and B only. With g = m / ‖W0 + sBA‖_c (fan_out,) the layer computes

    y = g ⊙ (W0 x + s·B A x̃) + bias           x̃ = dropout(x) on the low-rank path only

reusing the base output (W0 x = base(x) − bias): no second base matmul. PEFT (``dora.py``) also
applies the dropout to the base path while training, which costs it a second full matmul with W0;
in eval, and whenever dropout is 0, the two are the same function.

The cost of the norm. PEFT builds the dense ``B·A`` (through an identity matrix) and ``W0 + s·BA``
(fan_out × fan_in each) every step. Here nothing of that size is built: per output row o,

    ‖W0 + sBA‖²_o = ‖W0‖²_o + 2s·⟨W0 Aᵀ, B⟩_o + s²·⟨B (A Aᵀ), B⟩_o

— ``W0 Aᵀ`` is (fan_out, r), ``A Aᵀ`` is (r, r): one thin GEMM of fan_out·fan_in·r multiply-adds
(r/N of the base layer's, N = tokens per step) and a reduction over W0 (`‖W0‖²_o`), all under
``no_grad``. The forward then adds a rescale of the (N, fan_out) output, and backward two
elementwise products of that size (g·grad for the base/branch, Σ grad ⊙ z for m).

Merging is additive like every kind's (``W ← W + ΔW_dora``) with, against the current weight W,

    ΔW_dora = g ⊙ (W + s·BA) − W             (THE delta formula of DoRA, :meth:`DoraAdapter.delta_2d`)

and unmerging recovers W from the merged W' with the g cached at merge time (PEFT does the same):
W = W' / g − s·BA.

File tensors (PEFT's ``use_dora`` files): ``lora_A.weight``, ``lora_B.weight`` (``lora_embedding_*``
on an embedding) and ``lora_magnitude_vector`` of shape (fan_out,) — (1, out, 1, …) on a convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterStateError
from ..layers.kinds import BaseKind, Geometry
from ..layers.protocol import AdapterKind, base_device
from .lora import LoraAdapter
from .weight_inits import init_from_weight


@torch.no_grad()
def row_norms(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W0 + s·B·A‖ per output row, (fan_out,) fp32, without building B·A or W0 + s·BA.

    w0: (fan_out, fan_in), a: (r, fan_in), b: (fan_out, r) — any float dtype, computed in fp32.
    """
    w0, a, b = w0.float(), a.float(), b.float()
    sq = torch.linalg.vector_norm(w0, dim=1).square()  # ‖W0‖²_o            (fan_out,)
    cross = ((w0 @ a.T) * b).sum(1)  # ⟨W0 Aᵀ, B⟩_o = Σ_j (W0 Aᵀ)_oj B_oj  (fan_out, r) -> (fan_out,)
    lr = ((b @ (a @ a.T)) * b).sum(1)  # ‖(BA)_o‖² = B_o (A Aᵀ) B_oᵀ        (fan_out,)
    return (sq + (2.0 * scaling) * cross + (scaling * scaling) * lr).clamp_min_(0.0).sqrt_()


class DoraAdapter(LoraAdapter):
    """A LoRA pair (A, B) plus the magnitude ``lora_magnitude_vector`` (PEFT's name and shape)."""

    needs_base_weight = True

    def __init__(self, geometry: Geometry, r: int, alpha: float, scaling: float, dropout: float,
                 device: torch.device | str | None = None):
        super().__init__(geometry, r, alpha, scaling, dropout, dtype=torch.float32, device=device)
        # PEFT's shape: (fan_out,), or (1, out, 1, …) for a conv whose B is (out, r, 1, …), so that it
        # broadcasts over the base's output channels directly.
        fan_out, nd = geometry.b_shape[0], len(geometry.b_shape)
        shape = (fan_out,) if nd == 2 else (1, fan_out) + (1,) * (nd - 2)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self._merge_scale: torch.Tensor | None = None  # g at merge time (fan_out,), for unmerge

    @torch.no_grad()
    def init_magnitude(self, w0: torch.Tensor) -> None:
        """m ← ‖W0 + sBA‖_c (§4.1: the pretrained weight's own magnitude), so g = 1 at the start and
        the layer computes plain LoRA's W0 + sBA (= W0 when B = 0). w0: (fan_out, fan_in)."""
        norms = row_norms(w0, self.lora_A.flatten(1), self.lora_B.flatten(1), self.scaling)
        self.lora_magnitude_vector.copy_(norms.view(self.lora_magnitude_vector.shape))

    # -- the formula -------------------------------------------------------------------------------
    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        """g = m / ‖W + sBA‖_c as (fan_out,) fp32, the norm detached (§4.3); grad flows to m only."""
        a, b = self.lora_A.detach().flatten(1), self.lora_B.detach().flatten(1)
        return self.lora_magnitude_vector.flatten().float() / row_norms(w, a, b, self.scaling)

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW_dora = g ⊙ (W + s·BA) − W as a (fan_out, fan_in) matrix; W = ``base_weight`` (fan_out, fan_in)."""
        if base_weight is None:
            raise AdapterStateError(
                "a DoRA adapter's update depends on the base weight (its magnitude rescales W0 + ΔW); "
                "it cannot be taken alone — merge it into its layer (lorakit.merge) instead of combining "
                "or exporting ΔW by itself."
            )
        w = base_weight.float()
        lora = super().delta_2d().float()  # s·BA (fan_out, fan_in)
        g = self._scale(w).detach().unsqueeze(1)  # (fan_out, 1)
        self._merge_scale = g.squeeze(1).clone()
        return (w + lora).mul_(g).sub_(w)

    def unmerge_delta_2d(self, merged_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W' − W with W = W'/g − s·BA, g cached when the adapter was merged (as PEFT does)."""
        if self._merge_scale is None or merged_weight is None:
            raise AdapterStateError("this DoRA adapter was not merged by lorakit.merge; nothing to unmerge.")
        g = self._merge_scale.unsqueeze(1)
        w_merged = merged_weight.float()
        w = w_merged / g - super().delta_2d().float()
        self._merge_scale = None
        return w_merged - w

    # -- forward -----------------------------------------------------------------------------------
    def forward_into(self, kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """y = g ⊙ (base(x) − bias + s·B A x̃) + bias; g broadcasts along the output channel dim
        (last dim for linear/embedding outputs, dim 1 for convolutions — the magnitude's shape)."""
        mag = self.lora_magnitude_vector
        g = self._scale(kind.weight_2d(base).detach()).view(mag.shape)  # norm fp32, detached
        bias = kind.bias(base)
        if bias is not None:
            bias = bias.view(mag.shape).to(base_out.dtype)
            z = base_out - bias  # W0 x (a new tensor the branch may add into)
        else:
            z = base_out
        z = kind.branch(base, z, x, self.lora_A, self.lora_B, self.scaling, mask)  # W0 x + s·B A x̃
        y = z * g.to(z.dtype)
        return y if bias is None else y.add_(bias)

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(kind), "lora_magnitude_vector": self.lora_magnitude_vector}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoraKind(AdapterKind):
    """DoRA: a ``LoraConfig`` with ``use_dora=True``; files with ``peft_type: "LORA"`` and ``use_dora``."""

    name = "dora"
    peft_type = "LORA"
    config_type = LoraConfig

    def accepts_config(self, config) -> bool:
        return type(config) is LoraConfig and bool(config.use_dora)

    def accepts_file(self, raw: dict) -> bool:
        return raw.get("peft_type", "LORA") == "LORA" and bool(raw.get("use_dora"))

    def refuses(self, base_kind: BaseKind, base: nn.Module) -> str | None:
        if base_kind.grouped:
            # LoRA's update on a grouped conv is a dense conv across groups (GroupedConvKind), so W0 + s·BA
            # has no (out, in/groups·k) form to normalise per output channel; PEFT 0.21 runs DoRA there but
            # views its grouped B (out, r/groups) as an (out/groups, r) matrix for the norm, a different
            # formula than the paper's, so neither its outputs nor a correct DoRA would match the other's.
            return (f"DoRA is not supported on grouped convolutions (groups={base.groups}). Use plain LoRA "
                    "(use_dora=False) for this module, or remove it from target_modules")
        return None

    def create(self, base_kind: BaseKind, base: nn.Module, path: str, config: LoraConfig) -> DoraAdapter:
        r = config.rank_for(path)
        adapter = DoraAdapter(base_kind.geometry(base, r), r, config.alpha_for(path), config.scaling_for(path),
                              0.0 if base_kind.embedding else float(config.lora_dropout), device=base_device(base))
        init = config.init_lora_weights
        adapter.reset(base_kind.zero_b, True if isinstance(init, str) and init != "gaussian" else init)
        init_from_weight(adapter, base_kind, base, path, init)  # PiSSA / OLoRA (base changed on attach)
        w0 = base_kind.weight_2d(base).detach().float()
        pending = adapter.__dict__.get("pending_base_delta")
        adapter.init_magnitude(w0 if pending is None else w0 + pending)  # ‖W_res + s·B0A0‖ = ‖W‖
        return adapter


DORA = DoraKind()
