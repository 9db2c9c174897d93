"""Helpers and fixtures for the quantization tests (not a conftest.py: a second conftest module
would shadow tests/conftest.py for the `from conftest import ...` lines elsewhere)."""

from __future__ import annotations

import contextlib

import pytest
import torch


@pytest.fixture
def no_dynamo():
    """bitsandbytes' pure-PyTorch fallbacks (odd shapes, big blocksizes) wrap themselves in
    torch.compile; compiling per shape would dominate the test time. Run them eagerly."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def normal_weights(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one torch thread and restore the setting after (the machine is shared and
    OpenMP regions on tiny tensors only add contention)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def torch_threads(n: int):
    """Temporarily n torch threads (the CPU kernels use that many workers)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
