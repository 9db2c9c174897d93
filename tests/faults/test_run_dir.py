"""One run per output directory, a clean --overwrite, checkpoints that only touch their own files,
and resumes that continue the same run or refuse by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lorakit.errors import CheckpointError, ConfigError, DataError, OutputError
from lorakit.train import TrainArgs, train
from lorakit.train import checkpoint as ckpt
from lorakit.train.lock import LOCK_NAME, RunLock, RunLockedError

from fault_helpers import quick_args, tiny_lm_dir, write_rows

SRC = str(Path(__file__).resolve().parents[2] / "src")
ROWS = [{"instruction": f"say {w}", "output": w} for w in ("abc", "hello", "cat", "dog", "sun", "moon", "x", "yz")]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("lm"))


@pytest.fixture
def data(tmp_path):
    return write_rows(tmp_path / "train.jsonl", ROWS)


def _holder(out: Path) -> subprocess.Popen:
    """Another process that holds ``out`` the way a running `lorakit train` does."""
    code = textwrap.dedent(f"""
        import sys, time
        from lorakit.train.lock import RunLock
        RunLock({str(out)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_runs_one_directory(lm, data, tmp_path):
    out = tmp_path / "run"
    first = _holder(out)
    try:
        # the second run, through the real CLI: one line naming the directory and the holder, exit 2
        cli = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", str(lm), "--data", str(data),
                              "--output-dir", str(out), "max_steps=2", "--no-progress"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
        assert cli.returncode == 2, cli.stderr
        lines = cli.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in cli.stderr
        assert str(out) in lines[0] and f"process {first.pid}" in lines[0]
        # in-process too, and nothing was written by the refused run
        with pytest.raises(RunLockedError, match=str(first.pid)):
            train(quick_args(lm, data, out))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        first.kill()  # like kill -9: the lock file stays, the lock does not
        first.wait()
    assert (out / LOCK_NAME).exists()
    result = train(quick_args(lm, data, out, max_steps=2))  # the stale lock is taken over
    assert result.steps_done == 2 and not (out / LOCK_NAME).exists()  # released on exit


def test_lock_released_when_the_run_fails(lm, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes('{"text": "hi"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        train(quick_args(lm, bad, out))
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):  # free again
        pass


def test_output_dir_that_is_a_file_is_refused_by_name(lm, data, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(OutputError, match="notes.txt.*is a file, not a directory"):
        train(quick_args(lm, data, out))
    assert out.read_text() == "mine"  # untouched, nothing written beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "train.jsonl"]


def test_empty_output_dir_and_negative_seed_are_refused():
    with pytest.raises(ConfigError, match="output_dir"):
        TrainArgs(output_dir="")
    with pytest.raises(ConfigError, match="output_dir"):
        TrainArgs(output_dir="  ")
    with pytest.raises(ConfigError, match="seed=-1"):
        TrainArgs(seed=-1)


def test_overwrite_removes_every_artifact_of_the_previous_run(lm, data, tmp_path):
    out = tmp_path / "run"
    train(quick_args(lm, data, out, max_steps=2))
    # what other methods and variants leave behind
    (out / "adapter" / "lorakit_labels.json").write_text('{"a": 0}')
    (out / "adalora_ranks.json").write_text("{}")
    (out / "tensorboard").mkdir(exist_ok=True)
    (out / "tensorboard" / "events.out.tfevents.1").write_text("x")
    (out / "notes.txt").write_text("mine")  # not lorakit's: stays
    with pytest.raises(ConfigError, match="already holds a run"):
        train(quick_args(lm, data, out, max_steps=2))
    train(quick_args(lm, data, out, max_steps=2, overwrite=True))
    assert not (out / "adapter" / "lorakit_labels.json").exists()
    assert not (out / "adalora_ranks.json").exists()
    assert not list((out / "tensorboard").glob("events.out.tfevents.1"))
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".trash-*"))


def _save(root: Path, step: int, keep=None):
    import torch

    return ckpt.save_checkpoint(root, step, trainable={"w": torch.zeros(2)}, optimizer={"state": {}, "param_groups": []},
                                schedule={}, hooks=[], rng=[ckpt.rng_state()], state={"history": []}, keep=keep)


def test_pruning_is_atomic_and_saves_touch_only_their_own_temporaries(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    live = root / f".tmp-step-000009-p{os.getppid()}-abc"  # a live process's save in progress
    dead = root / ".tmp-step-000008-p999999999-abc"
    live.mkdir()
    dead.mkdir()
    _save(root, 2)
    assert live.is_dir() and not dead.exists()

    # a kill while the oldest checkpoint is deleted: it was renamed aside first, so it is never listed
    import shutil

    real = shutil.rmtree

    def killed(path, *a, **k):
        if Path(path).name.startswith(".del-") and Path(path).exists():
            (Path(path) / "rng.pt").unlink()  # half-deleted …
            raise KeyboardInterrupt  # … when the kill arrives
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 3, keep=2)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000003"]
    # a checkpoint half-deleted by hand (or by an older lorakit) is not a checkpoint either
    (root / "step-000002" / "optimizer.pt").unlink()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000003"]


def test_full_disk_is_an_output_error(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    import lorakit

    from fault_helpers import tiny_llama

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setattr(lorakit.io, "save_file", full)
    with pytest.raises(OutputError, match="No space left"):
        lorakit.save_adapter(model, tmp_path / "a")
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OutputError, match="No space left"):
        _save(tmp_path / "checkpoints", 1)
    assert not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_an_output_error(lm, data, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=str(out)):
            train(quick_args(lm, data, out))
    finally:
        out.chmod(0o755)


def test_resume_refuses_edited_data_and_contradicting_flags(lm, data, tmp_path):
    out = tmp_path / "run"
    train(quick_args(lm, data, out, max_steps=4, save_every=2, lr=5e-3))
    # a resume without the original --lr/--max-steps continues the same run: the checkpoint's values
    res = train(quick_args(lm, data, out, max_steps=None, lr=2e-4, resume=str(out / "checkpoints" / "step-000002")))
    assert res.metrics["args"]["lr"] == 5e-3 and res.metrics["args"]["max_steps"] == 4
    # a flag that contradicts the checkpoint names both values …
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.005, now 0\.02"):
        train(quick_args(lm, data, out, lr=2e-2, resume="auto"))
    # … unless the change is asked for explicitly
    res = train(quick_args(lm, data, out, lr=2e-2, max_steps=6, resume="auto", resume_override=["lr", "max_steps"]))
    assert res.steps_done == 6 and res.metrics["args"]["lr"] == 2e-2
    # edited data (same size!) is refused by name
    data.write_text(data.read_text().replace("hello", "jello"))
    with pytest.raises(CheckpointError, match=r"train\.jsonl has changed"):
        train(quick_args(lm, data, out, max_steps=6, lr=2e-2, resume="auto"))


def test_checkpoint_step_out_of_bounds_is_refused(lm, data, tmp_path):
    out = tmp_path / "run"
    train(quick_args(lm, data, out, max_steps=4, save_every=2))
    state_file = out / "checkpoints" / "step-000004" / "trainer_state.json"
    for step in (-5, 10**9):
        state = json.loads(state_file.read_text())
        state["step"] = step
        state_file.write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match=f"step {step}"):
            train(quick_args(lm, data, out, max_steps=4, resume="auto"))


def test_sigterm_outside_the_loop_exits_143_with_a_message(monkeypatch, capsys):
    from lorakit.cli import app as cli

    def startup(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "train_command", startup)
    assert cli.main(["train"]) == 143
    assert "SIGTERM" in capsys.readouterr().err


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from lorakit import cli
    from lorakit.errors import AdapterFileError

    bad = tmp_path / "a"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes(b"\xff\xfe[1, 2]")
    assert cli.main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "UTF-8" in err
    with pytest.raises(AdapterFileError):
        cli.main(["--debug", "info", str(bad)])
