"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al. 2023, arXiv 2310.08659, §3, Algorithm 1).

QLoRA quantizes W and starts the adapter at zero, so the model starts at Q(W) ≠ W. LoftQ instead
alternates T times between quantizing and a rank-r SVD so that Q + s·B·A ≈ W::

    res ← W
    for t = 1 … T:
        Q   ← NF4(res)                          # the base's new (quantized) weight
        L R ← rank-r SVD of W − deq(Q)          # L = U_r √S_r (fan_out, r), R = √S_r V_rᵀ (r, fan_in)
        res ← W − L R                           # (not needed after the last step)
    A0 = R / √s,  B0 = L / √s                    # so that s·B0·A0 = L R for any lora_alpha

**What it does to the base weights:** every targeted ``nn.Linear`` is replaced by a ``QuantLinear``
holding NF4(res) — not NF4(W). The result is a QLoRA model whose starting point is closer to the
full-precision one (``deq(Q) + s·B0A0`` vs ``deq(NF4(W))``). PEFT (``loftq_utils.loftq_init``) runs
the same loop with bitsandbytes' NF4 on a GPU (no statistics compression, blocksize 64) and uses
A0 = R, B0 = L, i.e. it assumes s = 1 (lora_alpha = r); for s = 1 the two agree.

This lives in ``quant/`` (above the core): the core's ``inject`` refuses ``init_lora_weights="loftq"``
and points here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._txn import all_or_nothing
from ..adapter_kinds.dora import DoraAdapter
from ..config import LoraConfig
from ..errors import ConfigError, UnsupportedModuleError
from ..inject import check_adapter_name, find_targets, inject
from ..layers.host import LoraLayer
from ..state import set_submodule
from .linear import QuantLinear, quantize_weight


@torch.no_grad()
def loftq_decompose(w: torch.Tensor, r: int, scaling: float, n_iter: int = 1, blocksize: int = 64,
                    double_quant: bool = False):
    """(NF4 quantized residual, A0 (r, fan_in), B0 (fan_out, r)) for W (fan_out, fan_in); see the module doc."""
    target = w.float()
    res = target
    for t in range(n_iter):
        q = quantize_weight(res.to(w.dtype), "nf4", double_quant, blocksize)
        u, s, vh = torch.linalg.svd(target - q.dequantize(torch.float32), full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root, root[:, None] * vh[:r]  # L (fan_out, r), R (r, fan_in)
        if t + 1 < n_iter:
            res = target - left @ right
    k = scaling ** -0.5
    return q, (right * k).contiguous(), (left * k).contiguous()


@all_or_nothing  # the swapped-in QuantLinear bases go back to nn.Linear if inject fails
def loftq_inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 compute_dtype: torch.dtype = torch.float32, double_quant: bool = False,
                 blocksize: int = 64) -> nn.Module:
    """Quantize the targets of ``config`` to NF4 with LoftQ and add the adapter with LoftQ's factors.

    ``config.init_lora_weights`` must be ``"loftq"``; ``config.loftq_config["loftq_iter"]`` is T. The
    model is changed only after every target's decomposition has been computed.
    """
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "loftq":
        raise ConfigError("loftq_inject needs a LoraConfig with init_lora_weights='loftq' "
                          "(and loftq_config={'loftq_bits': 4, 'loftq_iter': N}).")
    check_adapter_name(model, adapter_name)
    plan = []
    for path, module in find_targets(model, config):
        if type(module) is not nn.Linear:
            raise UnsupportedModuleError(
                f"module {path!r} is a {type(module).__name__}: LoftQ quantizes full-precision nn.Linear "
                "weights. Start from the unquantized model, or narrow target_modules to its Linear layers."
            )
        q, a, b = loftq_decompose(module.weight, config.rank_for(path), config.scaling_for(path),
                                  config.loftq_config["loftq_iter"], blocksize, double_quant)
        plan.append((path, QuantLinear(q, module.bias, compute_dtype), a, b))
    for path, qlinear, _, _ in plan:
        set_submodule(model, path, qlinear)
    inject(model, dataclasses.replace(config, init_lora_weights=True), adapter_name)
    with torch.no_grad():
        for path, _, a, b in plan:
            host = model.get_submodule(path)
            assert isinstance(host, LoraLayer)
            adapter = host.lora[adapter_name]
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
            if isinstance(adapter, DoraAdapter):  # m from the LoftQ start, deq(Q) + s·B0A0
                adapter.init_magnitude(host.kind.weight_2d(host.base_layer))
    return model
