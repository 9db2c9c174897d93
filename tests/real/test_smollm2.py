"""The real job on the real model (SmolLM2-135M-Instruct), offline: learn facts built from Python's
own Unicode tables, load the adapter in PEFT with identical logits, merge into a checkpoint that
from_pretrained loads, generate the learned answers; QLoRA, LoRA+, AdaLoRA and DoRA train on it too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lorakit.train import TrainArgs, train

from .facts import unicode_name_rows, write_rows

pytestmark = pytest.mark.slow
# One thread under pytest-xdist (two workers share the 2 cores; two OpenMP threads each spin-wait).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def _args(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=4, max_steps=3, lr=2e-3, r=16,
                lora_alpha=32, progress=False, max_length=48, eval_rows=4, threads=THREADS)
    base.update(kw)
    return TrainArgs(**base)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("facts") / "facts.jsonl", unicode_name_rows())


@pytest.fixture(scope="module")
def learned(smollm2_dir, facts, tmp_path_factory):
    """LoRA (r 16, all-linear) on the 12 facts: 36 steps of batch 4 (12 epochs)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    return train(_args(smollm2_dir, facts, out, max_steps=36))


def _cli(*argv):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=900)


def test_lora_learns_the_facts_and_generate_answers_them(learned, smollm2_dir):
    metrics = json.loads((learned.output_dir / "metrics.json").read_text())
    assert metrics["loss"]["last10_mean"] < 0.5 * metrics["loss"]["first"], metrics["loss"]
    row = unicode_name_rows()[0]
    res = _cli("generate", "--adapter", str(learned.output_dir / "adapter"), "--model", str(smollm2_dir), "--chat",
               "--max-new-tokens", "12", row["instruction"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert row["output"].lower() in res.stdout.lower(), res.stdout


def test_the_adapter_loads_in_peft_with_identical_logits(learned, smollm2_dir):
    import peft
    from transformers import AutoModelForCausalLM

    import lorakit

    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(),
                                learned.output_dir / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(),
                                            learned.output_dir / "adapter").eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-2  # the adapter changes the output ...
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # ... exactly as PEFT applies it


def test_merge_writes_a_checkpoint_from_pretrained_loads(learned, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorakit

    res = _cli("merge", "--adapter", str(learned.output_dir / "adapter"), "--model", str(smollm2_dir),
               "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr[-2000:]
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unmerged = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(),
                                    learned.output_dir / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kw", [
    dict(quant="nf4"),
    dict(method="loraplus"),
    dict(method="adalora"),
    dict(use_dora=True),
], ids=["qlora-nf4", "loraplus", "adalora", "dora"])
def test_other_methods_train_on_the_real_model(kw, smollm2_dir, facts, tmp_path):
    if "use_dora" in kw and "use_dora" not in TrainArgs.__dataclass_fields__:
        pytest.skip("DoRA is not a training option of this build")
    res = train(_args(smollm2_dir, facts, tmp_path / "run", **kw))
    metrics = json.loads((res.output_dir / "metrics.json").read_text())
    assert metrics["steps"]["done"] == 3
    assert all(torch.isfinite(torch.tensor(r)) for r in (metrics["loss"]["first"], metrics["loss"]["last"]))
    assert (res.output_dir / "adapter" / "adapter_model.safetensors").is_file()
