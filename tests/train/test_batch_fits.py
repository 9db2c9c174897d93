"""A micro-batch estimated at more than twice the machine's available memory is refused before its
first forward (which the kernel's out-of-memory killer would end with no message and nothing saved)."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.train import estimate, train

from .train_helpers import quick_args, write_rows


def _args(model, data, out, **kw):
    return quick_args(model, data, out, **{**dict(max_steps=1, eval_rows=0, max_length=32), **kw})


@pytest.fixture
def rows(tmp_path):
    return write_rows(tmp_path / "rows.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)])


def test_available_memory_is_read():
    got = estimate.available_bytes()
    assert got is None or got > 0


def test_a_batch_far_beyond_memory_is_refused_before_it_runs(tiny_lm, rows, tmp_path, monkeypatch):
    # what one micro-batch of 4 would need, by the same formula the check uses, then a machine with
    # less than half of it available
    need = {}

    def spy(model, args, seq_len, activations):
        need["bytes"] = activations
        return real(model, args, seq_len, activations)

    real = estimate.check_fits
    monkeypatch.setattr(estimate, "check_fits", spy)
    train(_args(tiny_lm, rows, tmp_path / "fits"))  # fits: trains
    assert need["bytes"] > 0
    monkeypatch.setattr(estimate, "check_fits", real)
    monkeypatch.setattr(estimate, "available_bytes", lambda: int(need["bytes"] / 2.5))
    probes = []
    monkeypatch.setattr(estimate, "probe_step_seconds", lambda probe: probes.append(probe) or 0.0)
    with pytest.raises(ConfigError, match=r"batch_size=4 .*GiB available.*Lower batch_size \(grad_accum=N"):
        train(_args(tiny_lm, rows, tmp_path / "big"))
    assert not probes  # refused before the probe step ran
    assert not (tmp_path / "big").exists()  # and no run directory is left behind
    # at twice the need it is allowed (the factor leaves room for the formula's error)
    monkeypatch.setattr(estimate, "available_bytes", lambda: int(need["bytes"] / 1.9))
    train(_args(tiny_lm, rows, tmp_path / "edge"))
    assert probes
