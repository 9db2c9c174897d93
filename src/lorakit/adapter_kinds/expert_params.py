"""LoRA on parameters instead of modules — mixture-of-experts weights stored as 3-D tensors
(PEFT's ``LoraConfig(target_parameters=[...])``).

transformers 5.x keeps each MoE block's experts in one module with stacked weights, e.g.

    Mixtral / Qwen3-MoE   experts.gate_up_proj (E, 2I, H)   experts.down_proj (E, H, I)   (E, out, in)
    GPT-OSS               experts.gate_up_proj (E, H, 2I)   experts.down_proj (E, I, H)   (E, in, out),
                          marked ``is_transposed = True`` on the experts module

and applies them inside its routing loop, so the update cannot be added to the module's output: it
has to be in the weight the module reads. :class:`ParamHost` (a ``LoraLayer`` whose forward runs the
wrapped module with W + ΔW through ``torch.func.functional_call`` — no parametrization left on the
model, the stored parameter never changes) does that; everything else (activation, merging, files,
freezing) is the host's and the protocol's as for every kind.

One rank-r pair per expert, in PEFT's flat layout (so the file needs no conversion)::

    lora_A (r·E, in)   rows e·r … e·r + r − 1 are expert e's A_e (r, in)
    lora_B (out, r·E)  column j·E + e is column j of expert e's B_e (out, r)
    ΔW[e] = s · B_e A_e          (E, out, in), or its transpose per expert for (E, in, out) layouts

Several parameters of one module nest one host per parameter, the first-registered parameter
innermost — PEFT's ``ParamWrapper`` nesting, so its keys (``experts.base_layer.lora_A.weight``,
``experts.lora_A.weight``) come out the same. No dropout (x cannot be factored out of W + ΔW; PEFT
refuses it too) and no DoRA.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..errors import AdapterStateError
from ..layers.host import LoraLayer
from ..layers.kinds import BaseKind, Geometry, init_factors
from ..layers.protocol import Adapter


def owner_of(module: nn.Module) -> nn.Module:
    """The module that really holds the parameters, under any ParamHosts."""
    while isinstance(module, LoraLayer):
        module = module.base_layer
    return module


class ExpertParamKind(BaseKind):
    """A 2-D or 3-D parameter ``name`` of a module, as a base kind (one instance per parameter)."""

    linear = False
    transposed = False  # (the Conv1D fact: PEFT's fan_in_fan_out; expert layouts are ``in_out`` below)

    def __init__(self, param_name: str, in_out: bool):
        self.param_name = param_name
        self.in_out = in_out  # (E, in, out) instead of (E, out, in): GPT-OSS's is_transposed
        self.name = f"param:{param_name}"

    def matches(self, module):
        return False  # never chosen by kind_of; built by the parameter targeting

    def param(self, module: nn.Module) -> nn.Parameter:
        return getattr(owner_of(module), self.param_name)

    def dims(self, module) -> tuple[int, int, int]:
        """(experts, fan_in, fan_out)."""
        shape = tuple(self.param(module).shape)
        e, d1, d2 = shape if len(shape) == 3 else (1, *shape)
        return (e, d1, d2) if self.in_out else (e, d2, d1)

    def geometry(self, module, r):
        e, fan_in, fan_out = self.dims(module)
        return Geometry((r * e, fan_in), (fan_out, r * e))

    def weight(self, module):
        return self.param(module)

    def weight_2d(self, module):
        return self.param(module)  # the layout of ExpertLoraAdapter.delta_2d (3-D for experts)

    def add_to_weight(self, module, delta):
        w = self.param(module)
        w.data.add_(delta.to(w.dtype))

    def bias(self, module):
        return None


class ExpertLoraAdapter(Adapter):
    """One LoRA pair per expert in PEFT's flat layout (see the module docstring)."""

    def __init__(self, kind: ExpertParamKind, module: nn.Module, r: int, alpha: float, scaling: float, init):
        super().__init__()
        e, _, _ = kind.dims(module)
        geometry = kind.geometry(module, r)
        device = kind.param(module).device
        self.lora_A = nn.Parameter(torch.empty(geometry.a_shape, device=device))
        self.lora_B = nn.Parameter(torch.empty(geometry.b_shape, device=device))
        self.r, self.alpha, self.scaling, self.experts = r, alpha, scaling, e
        self.in_out = kind.in_out
        self.two_d = kind.param(module).dim() == 2
        init_factors(self.lora_A, self.lora_B, True, init)

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the parameter's own layout: (E, out, in) = s·B_e A_e per expert, transposed per
        expert for (E, in, out); a plain (out, in) s·BA for a 2-D parameter."""
        e, r = self.experts, self.r
        a = self.lora_A.reshape(e, r, -1)  # (E, r, in)
        b = self.lora_B.reshape(self.lora_B.shape[0], r, e)  # (out, r, E)
        spec = "ore,eri->eio" if self.in_out else "ore,eri->eoi"
        delta = torch.einsum(spec, b, a) * self.scaling
        return delta[0] if self.two_d else delta

    def forward_into(self, kind, base, base_out, x, mask):  # pragma: no cover - ParamHost never calls it
        raise AdapterStateError("an expert-parameter adapter acts inside its module's weight (ParamHost).")

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"experts={self.experts}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


class ParamHost(LoraLayer):
    """Runs the wrapped module with ``param + Σ active ΔW`` (see the module docstring)."""

    def forward(self, *args, **kwargs):
        names = [] if self.disabled else [n for n in self.active if n not in self.merged and n in self.lora]
        if not names:
            return self.base_layer(*args, **kwargs)
        if self.row_adapters is not None:
            raise AdapterStateError(f"per-row adapters do not work on expert parameters "
                                    f"({self.kind.param_name}); use one adapter for the whole batch.")
        w = self.kind.param(self.base_layer)
        for name in names:
            w = w + self.lora[name].delta_2d().to(w.dtype)
        # the parameter's path relative to base_layer: one "base_layer." per nested host below
        path, module = self.kind.param_name, self.base_layer
        prefix = ""
        while isinstance(module, LoraLayer):
            prefix += "base_layer."
            module = module.base_layer
        return functional_call(self.base_layer, {prefix + path: w}, args, kwargs, strict=False)
