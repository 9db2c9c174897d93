"""bench/gpu_suite.sh on a machine without CUDA: a clear message and exit status 0, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the suite would run for real")
@pytest.mark.parametrize("cmd", [["bash", "bench/gpu_suite.sh"], [sys.executable, "bench/gpu_suite.py"]])
def test_gpu_suite_without_cuda_says_so_and_exits_cleanly(cmd):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout and "nothing was run" in r.stdout
