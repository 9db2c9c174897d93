"""Two CPU processes (torchrun + gloo, through accelerate) train like one process with the same global batch."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import train

from .train_helpers import quick_args

_RENDEZVOUS_FAILURE = re.compile(r"EADDRINUSE|Address already in use|RendezvousError|DistNetworkError|"
                                 r"RendezvousConnectionError|Connection reset by peer")


def test_two_processes_match_one_process(tiny_lm, instr_file, tmp_path):
    common = ["--model", str(tiny_lm), "--data", str(instr_file), "--eval-data", str(instr_file), "--no-progress",
              "max_steps=4", "lr=0.01", "r=4", "lora_alpha=8", "threads=1", "max_length=64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lorakit.cli", "train", *common, "--output-dir", str(tmp_path / "ddp"), "batch_size=2",
           "--overwrite"]
    for _attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        # Retry once only when the process group could not form (a port taken between torchrun's
        # choice and its bind); any other failure — a wrong number, a crash in lorakit — fails at once.
        if proc.returncode == 0 or not _RENDEZVOUS_FAILURE.search(proc.stderr):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("── summary") == 1  # only the main process reports (and saves)
    assert "2 processes" in proc.stdout

    single = train(quick_args(tiny_lm, instr_file, tmp_path / "one", batch_size=4, max_steps=4, lr=0.01,
                              eval_data=str(instr_file)))

    def log(path):
        return [float(r["loss"]) for r in csv.DictReader(open(path / "log.csv"))]

    assert log(tmp_path / "ddp") == pytest.approx(log(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    import json

    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["run"]["world_size"] == 2
    assert ddp_metrics["eval"]["after"]["loss"] == pytest.approx(single.metrics["eval"]["after"]["loss"], rel=1e-5)
