"""lean_allocator: applied on glibc, a no-op (False) elsewhere; allocations still work after it."""

from __future__ import annotations

import platform
import sys

import torch

from lorakit.quant.malloc import lean_allocator


def test_lean_allocator_applies_on_glibc_and_memory_still_works():
    applied = lean_allocator()
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert applied is on_glibc
    x = torch.ones(1 << 20)  # 4 MB: its own mapping under the fixed threshold
    assert float(x.sum()) == float(1 << 20)
    del x
