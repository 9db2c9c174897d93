"""``Adam8bit``: AdamW with its two moments stored as blockwise 8-bit codes (Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization", §2).

Per step and parameter (fp32 arithmetic throughout):

    m, v   ← dequantize(codes, absmax)                       8 bits + 32/256 bits each
    p      ← p · (1 − lr·wd)                                 decoupled weight decay (AdamW)
    m      ← β1 m + (1 − β1) g ;   v ← β2 v + (1 − β2) g²
    p      ← p − lr · (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + eps)
    codes  ← quantize(m), quantize(v)                        blocks of 256, dynamic maps

m uses the signed dynamic map, v (≥ 0) the unsigned one, which spends the sign bit on precision.
State: 2 bytes + 8/256 bytes per parameter instead of AdamW's 8. Parameters smaller than
``min_8bit_size`` keep fp32 moments (as bitsandbytes does): their state is negligible and small
tensors quantize badly.

``offload_state=True`` keeps the moments in CPU memory while the parameters live on an accelerator;
each parameter's codes visit its device only for its own update (1 byte per moment and parameter
crosses the bus each way). On a CPU-only run it changes nothing and says so once.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from ..errors import ConfigError
from .blockwise8 import Blockwise8bit, quantize_blockwise8

log = logging.getLogger(__name__)
_MOMENTS = (("m", True), ("v", False))  # (name, signed map)


class Adam8bit(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, blocksize: int = 256, min_8bit_size: int = 4096,
                 offload_state: bool = False):
        def number(v) -> bool:  # a finite real (a str was a TypeError in the comparison, inf passed)
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        if not (number(lr) and lr >= 0):
            raise ConfigError(f"Adam8bit: lr={lr!r} must be a finite number ≥ 0.")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"Adam8bit: betas={betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999).")
        if not (number(eps) and eps >= 0 and number(weight_decay) and weight_decay >= 0):
            raise ConfigError(f"Adam8bit: eps={eps!r} and weight_decay={weight_decay!r} must be finite numbers ≥ 0.")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 16 or blocksize & (blocksize - 1):
            raise ConfigError(f"Adam8bit: blocksize={blocksize!r} must be a power of two ≥ 16 (bitsandbytes uses 256).")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if isinstance(params, torch.Tensor) or not hasattr(params, "__iter__"):
            raise ConfigError(f"Adam8bit: params must be an iterable of parameters or groups (model.parameters()), "
                              f"got a {type(params).__name__}.")
        params = list(params)
        if not params:  # torch's "optimizer got an empty parameter list" does not say what to do
            raise ConfigError("Adam8bit: no parameters to optimize; pass model.parameters() (or parameter groups) "
                              "after an adapter is injected.")
        super().__init__(params, defaults)
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        self.offload_state = offload_state
        self._said_noop = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise ConfigError("Adam8bit does not support sparse gradients; use dense embeddings or torch.optim.SparseAdam.")
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        t = state["step"]
        g = p.grad.float()
        m, v = (self._load(state, name, p) for name, _ in _MOMENTS)
        w = p.float()  # fp32 master copy for the arithmetic (p itself if p is fp32)
        if wd:
            w.mul_(1 - lr * wd)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        if w is not p:
            p.copy_(w)
        self._store(state, "m", m, signed=True)
        self._store(state, "v", v, signed=False)

    # -- state ---------------------------------------------------------------------------------
    def _state_device(self, p: torch.Tensor) -> torch.device:
        if not self.offload_state:
            return p.device
        if p.device.type == "cpu" and not self._said_noop:
            self._said_noop = True
            msg = "Adam8bit(offload_state=True): parameters are already on the CPU, so offloading changes nothing."
            log.warning(msg)
            warnings.warn(msg, stacklevel=4)
        return torch.device("cpu")

    def _load(self, state: dict, name: str, p: torch.Tensor) -> torch.Tensor:
        """The moment ``name`` as a dense fp32 tensor on p's device (zeros at the first step)."""
        if name + "_codes" in state and state[name + "_codes"].numel() != p.numel():
            # The parameter changed size under the optimizer (AdaLoRA's final rank cut slices P, Λ, Q):
            # blockwise codes cannot be sliced like a dense moment, so this parameter's state restarts.
            log.warning("Adam8bit: a parameter changed from %d to %d elements; its state restarts from zero.",
                        state[name + "_codes"].numel(), p.numel())
            for key in (name + "_codes", name + "_absmax"):
                del state[key]
            state["step"] = 1
        if name + "_codes" in state:
            q = Blockwise8bit(state[name + "_codes"].to(p.device), state[name + "_absmax"].to(p.device),
                              self.blocksize, signed=name == "m")
            return q.dequantize().view(p.shape)
        if name in state:
            return state[name].to(p.device)
        return torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _store(self, state: dict, name: str, value: torch.Tensor, signed: bool) -> None:
        dev = self._state_device(value)
        if value.numel() < self.min_8bit_size:
            state[name] = value.to(dev)
            return
        q = quantize_blockwise8(value.reshape(-1), self.blocksize, signed=signed)
        state[name + "_codes"] = q.codes.to(dev)
        state[name + "_absmax"] = q.absmax.to(dev)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (codes, absmax values, fp32 moments of small tensors)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim's, except that the state keeps its own dtypes (torch casts every state
        tensor to its parameter's dtype: uint8 codes would become floats, fp32 absmax bf16)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            where = torch.device("cpu") if self.offload_state else p.device
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(where)
