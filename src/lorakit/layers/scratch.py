"""One reusable buffer per thread and dtype for the branch's short-lived (N, in) temporaries.

The seeded-dropout branch needs x ⊙ m twice (forward, for x Aᵀ; backward, for ∂A), each time only
until the GEMM that reads it returns. Allocated fresh, each is a multi-MB block that glibc serves by
mmap or from a trimmed heap top, so every step pays its page faults and zeroing again: measured, the
fresh temporaries made up half or more of what dropout costs a 576-wide projection
(``bench/bench_dropout_kernel.py``, docs/PERFORMANCE.md). Reusing one buffer removes that. It only
grows (to the widest (N, in) seen on the thread), is never handed out twice at once (each use ends
before the branch returns), and is per thread, so concurrent forwards do not share it.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()
_state = {"enabled": True}


def set_enabled(on: bool) -> bool:
    """Reuse buffers (True) or allocate every temporary fresh (False, benches' A/B); returns the old value."""
    was, _state["enabled"] = _state["enabled"], bool(on)
    return was


def scratch(like: torch.Tensor) -> torch.Tensor | None:
    """A contiguous CPU buffer of ``like``'s shape and dtype, valid until the next call on this thread;
    None when disabled or for non-CPU tensors (the caller then allocates)."""
    if not _state["enabled"] or like.device.type != "cpu":
        return None
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(like.dtype)
    n = like.numel()
    if buf is None or buf.numel() < n:
        buf = bufs[like.dtype] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(like.shape)
