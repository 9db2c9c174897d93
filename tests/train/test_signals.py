"""SIGTERM (e.g. a scheduler's preemption) stops `lorakit train` cleanly with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lorakit.train.checkpoint import list_checkpoints, load_checkpoint


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_lm, instr_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli", "train", "--model", str(tiny_lm), "--data", str(instr_file),
         "--output-dir", str(out), "--no-progress", "max_steps=100000", "batch_size=2", "r=2", "threads=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout and "--resume auto" in stdout
    (saved,) = list_checkpoints(out / "checkpoints")
    state = load_checkpoint(saved)
    assert state.step >= 2 and len(state.state["history"]) == state.step
