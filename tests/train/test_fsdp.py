"""FSDP (torch FSDP2 ``fully_shard`` over gloo, ``distributed=fsdp``): sharded runs train like one process,
save one gathered adapter that PEFT loads, checkpoint, and resume exactly.

Two kinds of runs:
* in this process, a process group of ONE (``RANK=0 WORLD_SIZE=1``): every parameter is still a
  ``DTensor`` and every checkpoint/adapter still goes through the gather/shard code, in seconds;
* ``torchrun --nproc_per_node 2`` subprocesses (slow): parameters really split in halves.

References are independent of the FSDP code: a one-process run without FSDP (the ordinary loop,
compared file by file) and PEFT loading the adapter files.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.train import train
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint

from .train_helpers import quick_args

_RENDEZVOUS_FAILURE = re.compile(r"EADDRINUSE|Address already in use|RendezvousError|DistNetworkError|"
                                 r"RendezvousConnectionError|Connection reset by peer")
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- helpers -----------------------------------------------------------------------------------------
def losses(out):
    return [float(r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def group_of_one(monkeypatch):
    """This process as a launched group of one (what `torchrun --nproc_per_node 1` sets); the process
    group and accelerate's process-wide state are torn down afterwards, so later tests see a plain process."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    # an earlier in-process train() leaves accelerate's process-wide state of a plain process behind
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


def torchrun(out, *extra, nproc=2, signal_after_steps=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lorakit.cli", "train", "--no-progress", "--output-dir", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    for _attempt in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if signal_after_steps is not None:  # like a scheduler's preemption, once the run is under way
            deadline = time.time() + 400
            log = out / "log.csv"
            while time.time() < deadline and proc.poll() is None:
                if log.is_file() and len(log.read_text().splitlines()) > signal_after_steps:
                    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every process
                    break
                time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=600)
        # Retry once only when the process group could not form (a port taken between torchrun's
        # choice and its bind); any other failure fails at once.
        if proc.returncode == 0 or signal_after_steps is not None or not _RENDEZVOUS_FAILURE.search(stderr):
            break
    return proc.returncode, stdout, stderr


# -- refusals (fast) ------------------------------------------------------------------------------------
def test_fsdp_without_a_launcher_is_refused_naming_torchrun(tiny_lm, instr_file, tmp_path, monkeypatch):
    for k in _LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"distributed=fsdp.*torchrun --nproc_per_node"):
        train(quick_args(tiny_lm, instr_file, out, distributed="fsdp"))
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"distributed='zero3'.*'auto', 'ddp', 'fsdp'"):
        quick_args(tiny_lm, instr_file, out, distributed="zero3")


@pytest.mark.parametrize("setting, named", [
    (dict(method="adalora"), "method=adalora"),
    (dict(optim="adamw8bit"), "optim=adamw8bit"),
    (dict(probe_every=2), "probe_every"),
    (dict(sample_every=1), "sample_every"),
    (dict(metric_for_best="eval_score", save_best=True, eval_every=1), "metric_for_best=eval_score"),
])
def test_fsdp_refuses_what_it_cannot_shard_and_names_ddp(tiny_lm, instr_file, tmp_path, group_of_one, setting,
                                                         named):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"distributed=fsdp does not support {re.escape(named)}.*distributed=ddp"):
        train(quick_args(tiny_lm, instr_file, out, distributed="fsdp", **setting))
    assert not out.exists()


# -- a group of one, in this process (fast) ---------------------------------------------------------------
def _leave_the_group(monkeypatch):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    for k in _LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)


def test_fsdp_checkpoint_and_adapter_are_the_files_of_a_plain_run(tiny_lm, instr_file, tmp_path, group_of_one,
                                                                  monkeypatch):
    """Gathered from DTensors, the checkpoint and adapter equal a run without FSDP: same names, whole
    shapes, same values (one process: the same arithmetic, so to float rounding). Two micro-batches per
    step: FSDP accumulates into the sharded gradients."""
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=5, batch_size=2, grad_accum=2)
    sharded = train(quick_args(tiny_lm, instr_file, tmp_path / "fsdp", distributed="fsdp", **kw))
    assert sharded.metrics["run"]["model_name"].endswith("(LlamaForCausalLM)")  # not FSDP's class name
    _leave_the_group(monkeypatch)  # the reference: an ordinary process, no process group, no DTensor
    # FSDP computes the plain (unchunked) loss; so does the reference, for the same arithmetic.
    train(quick_args(tiny_lm, instr_file, tmp_path / "plain", chunked_ce=False, **kw))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "plain")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    c, d = (load_checkpoint(tmp_path / run / "checkpoints" / "step-000002") for run in ("fsdp", "plain"))
    assert c.trainable.keys() == d.trainable.keys()
    assert all(torch.allclose(c.trainable[k], d.trainable[k], atol=1e-6) for k in c.trainable)
    assert c.optimizer["param_groups"] == d.optimizer["param_groups"]
    assert c.optimizer["state"].keys() == d.optimizer["state"].keys()
    for i, entry in d.optimizer["state"].items():
        for key, value in entry.items():  # plain tensors of the parameter's whole shape, not DTensors
            assert type(c.optimizer["state"][i][key]) is torch.Tensor
            assert torch.allclose(c.optimizer["state"][i][key], value, atol=1e-7, rtol=1e-5), (i, key)
    assert c.state["epoch"] == d.state["epoch"] and c.state["step_in_epoch"] == d.state["step_in_epoch"]


@pytest.mark.parametrize("quant", ["none", "nf4"])  # nf4: the packed base stays in (unsharded) buffers
def test_fsdp_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny_lm, instr_file, tmp_path, group_of_one,
                                                                    quant):
    kw = dict(max_steps=5, save_every=2, keep_checkpoints=5, lora_dropout=0.1, distributed="fsdp", quant=quant)
    train(quick_args(tiny_lm, instr_file, tmp_path / "full", **kw))
    # Stopped after step 2: only that checkpoint survives; the resume recomputes steps 3-5.
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", tmp_path / "cut" / "checkpoints" / "step-000002")
    resumed = train(quick_args(tiny_lm, instr_file, tmp_path / "cut", resume="auto", **kw))
    assert resumed.metrics["steps"]["start"] == 2
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # dropout RNG, data position, Adam moments: exact
    a, b = adapter(tmp_path / "cut"), adapter(tmp_path / "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- two processes (torchrun, slow) ------------------------------------------------------------------------
COMMON = ["max_steps=4", "lr=0.01", "r=4", "lora_alpha=8", "threads=1", "max_length=64", "eval_rows=8"]


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process_save_one_adapter_peft_loads_and_resume(tiny_lm, instr_file, tmp_path):
    data = ["--model", str(tiny_lm), "--data", str(instr_file), "--eval-data", str(instr_file)]
    out = tmp_path / "fsdp"
    code, stdout, stderr = torchrun(out, *data, *COMMON, "batch_size=2", "distributed=fsdp", "save_every=2")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.count("── summary") == 1 and "2 processes" in stdout  # one report, one writer
    single = train(quick_args(tiny_lm, instr_file, tmp_path / "one", batch_size=4, max_steps=4, lr=0.01,
                              eval_data=str(instr_file), save_every=2))

    # Same global batch (2 × 2 vs 1 × 4): the same losses up to summation order (~1e-7 seen).
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    # One adapter, written once, gathered: every tensor at its whole shape (a shard has half the rows).
    assert [p.name for p in out.iterdir() if p.name.startswith((".tmp", "adapter"))] == ["adapter"]
    a, b = adapter(out), adapter(tmp_path / "one")
    assert a and a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert all(float(a[k].abs().sum()) > 0 for k in a)
    ckpt = load_checkpoint(out / "checkpoints" / "step-000002")
    assert len(ckpt.rng) == 2  # both processes' RNG states
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "step-000002")
    assert all(torch.allclose(ckpt.optimizer["state"][i]["exp_avg"], one.optimizer["state"][i]["exp_avg"],
                              atol=1e-6, rtol=1e-4) for i in one.optimizer["state"])
    import json

    assert json.loads((out / "metrics.json").read_text())["eval"]["after"]["loss"] == pytest.approx(
        single.metrics["eval"]["after"]["loss"], rel=1e-5)

    # PEFT loads the FSDP adapter; its model gives the same logits as with the one-process adapter.
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, path in (("fsdp", out / "adapter"), ("one", tmp_path / "one" / "adapter")):
        base = LlamaForCausalLM.from_pretrained(tiny_lm)
        with torch.no_grad():
            plain = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, path).eval()
        loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(a)  # nothing left at its initial value for want of a tensor
        with torch.no_grad():
            logits[name] = peft_model(ids).logits
        assert not torch.allclose(logits[name], plain, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(logits["fsdp"], logits["one"], atol=1e-5, rtol=1e-5)

    # Stopped after the step-2 checkpoint, resumed by two processes: the uninterrupted run, exactly.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-000002", cut / "checkpoints" / "step-000002")
    code, stdout, stderr = torchrun(cut, *data, *COMMON, "batch_size=2", "distributed=fsdp", "save_every=2",
                                    "--resume", "auto")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert losses(cut) == losses(out)
    assert all(torch.equal(adapter(cut)[k], a[k]) for k in a)


@pytest.mark.slow
def test_qlora_nf4_under_fsdp_killed_by_sigterm_resumes_to_the_one_process_result(tiny_lm, instr_file, tmp_path):
    """nf4 base (replicated: its packed weights are buffers) + sharded LoRA factors; SIGTERM to torchrun
    mid-run saves a checkpoint; the resumed run ends where one uninterrupted process ends."""
    data = ["--model", str(tiny_lm), "--data", str(instr_file)]
    q = ["quant=nf4", "r=4", "lora_alpha=8", "lr=0.01", "threads=1", "max_length=64", "schedule=constant",
         "batch_size=2", "distributed=fsdp", "eval_rows=8"]
    out = tmp_path / "q"
    code, stdout, stderr = torchrun(out, *data, *q, "max_steps=100000", signal_after_steps=1)
    # Every process stopped after its step and the main one saved; torchrun itself then reports the
    # signal it received (its own traceback, exit 1) — no worker raised.
    assert "interrupted at step" in stdout and "--resume auto" in stdout, stdout[-3000:] + stderr[-3000:]
    assert not re.search(r"\[rank\d\]:.*Traceback", stderr), stderr[-3000:]
    (saved,) = list_checkpoints(out / "checkpoints")
    stopped = load_checkpoint(saved).step
    assert 1 <= stopped < 12
    code, stdout, stderr = torchrun(out, *data, *q, "max_steps=12", "resume_override=max_steps", "--resume", "auto")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert (out / "adapter" / "lorakit_quant.json").is_file()

    one = tmp_path / "one"
    # Under FSDP the frozen head stays in the compute dtype (train/loop.py), so the reference does too.
    train(quick_args(tiny_lm, instr_file, one, quant="nf4", quant_head="compute", schedule="constant", max_steps=12,
                     lr=0.01))
    assert losses(out) == pytest.approx(losses(one), rel=1e-5)
    a, b = adapter(out), adapter(one)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_fsdp_full_fine_tuning_saves_the_whole_gathered_model(tiny_lm, instr_file, tmp_path, group_of_one,
                                                              monkeypatch):
    kw = dict(method="full", max_steps=2, lr=1e-3, chunked_ce=False)
    train(quick_args(tiny_lm, instr_file, tmp_path / "fsdp", distributed="fsdp", **kw))
    _leave_the_group(monkeypatch)
    train(quick_args(tiny_lm, instr_file, tmp_path / "plain", **kw))
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("fsdp", "plain"))
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-6) for k in a)
