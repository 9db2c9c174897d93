"""``nn.Module._apply`` that lets chosen buffers move between devices but never changes their dtype.

``model.half()`` / ``model.to(torch.bfloat16)`` cast every floating buffer. Packed codes, their fp32
statistics and a 16-bit frozen head must keep the dtype they were stored in; only ``.to(device)``
may move them. QuantLinear, the packed GGUF embedding and the 16-bit frozen head share this rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def apply_keeping_dtype(module: nn.Module, names: Iterable[str], fn: Callable[[torch.Tensor], torch.Tensor],
                        apply_rest: Callable[[], object]) -> None:
    """Run ``apply_rest()`` (the base ``_apply``) without the buffers ``names``, then give each of them
    ``fn``'s device: ``fn(t)`` when it keeps the dtype, else ``t.to(fn(t).device)``. The buffers are put
    back even when ``apply_rest`` raises, so a failed ``.to()`` leaves the module whole."""
    kept = {n: module._buffers.pop(n) for n in names}
    try:
        apply_rest()
    finally:
        for n, t in kept.items():
            moved = fn(t)
            module._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
