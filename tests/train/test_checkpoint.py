"""Checkpoints are atomic (a failed or killed save leaves the previous one intact) and safe to read."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lorakit.errors import CheckpointError
from lorakit.train import checkpoint as ckpt


def save(root, step, value=1.0, **kw):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return ckpt.save_checkpoint(root, step, trainable={"w": torch.full((2, 3), value)}, optimizer=opt.state_dict(),
                                schedule={"schedule": "linear"}, hooks=[{"t": torch.ones(2), "n": 3}],
                                rng=[ckpt.rng_state()], state={"history": [{"step": step, "loss": 1.0}]}, **kw)


def test_round_trip_pruning_and_resume_lookup(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(root, step, value=float(step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000003"]
    c = ckpt.load_checkpoint(root / "step-000003")
    assert c.step == 3 and torch.equal(c.trainable["w"], torch.full((2, 3), 3.0))
    assert c.hooks[0]["n"] == 3 and c.optimizer["state"][0]["step"] == 1
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-000003"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "other") == root / "step-000003"  # an output_dir
    assert ckpt.resolve_resume(str(root / "step-000002"), tmp_path) == root / "step-000002"


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == a


def test_a_failure_inside_the_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no step-2, no temp dir left
    assert ckpt.load_checkpoint(tmp_path / "step-000001").step == 1


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """A child process starts saving step 2 and is SIGKILLed while writing the optimizer file."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_checkpoint import save
        from lorakit.train import checkpoint as ckpt
        from pathlib import Path
        root = Path({str(tmp_path)!r})
        save(root, 1)
        real = torch.save
        def slow_save(obj, path, *a, **k):
            real(obj, path, *a, **k)
            if str(path).endswith("optimizer.pt"):
                (root.parent / "saving").write_text("now")
                time.sleep(60)
        torch.save = slow_save
        save(root, 2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    marker = tmp_path.parent / "saving"
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the middle of the save"
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    assert ckpt.load_checkpoint(tmp_path / "step-000001").step == 1
    assert any(p.name.startswith(".tmp-step-000002") for p in tmp_path.iterdir())  # the half-written one
    save(tmp_path, 3)  # the next save clears it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000003"]


def test_a_crash_between_the_renames_of_a_same_step_resave_is_recovered(tmp_path):
    save(tmp_path, 5)
    (tmp_path / "step-000005").rename(tmp_path / ".old-step-000005")  # as if killed right after rename 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000005"]


def test_pickled_objects_are_refused(tmp_path):
    path = save(tmp_path, 1)
    torch.save({"evil": Evil()}, path / "hooks.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        ckpt.load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_incomplete_or_mismatched_checkpoints_are_reported(tmp_path):
    path = save(tmp_path, 1)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing optimizer.pt"):
        ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        ckpt.resolve_resume("auto", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="r: checkpoint 8 vs now 16"):
        ckpt.check_fingerprint({"r": 8}, {"r": 16}, path)
