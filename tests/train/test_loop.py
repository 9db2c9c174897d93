"""The training loop end to end on a tiny model: outputs, exact resume, interrupts, NaN, hooks."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError, TrainingError
from lorakit.train import BaseHook, train
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint

from .train_helpers import quick_args, write_rows


def losses(result_or_dir) -> list[float]:
    path = result_or_dir if not hasattr(result_or_dir, "output_dir") else result_or_dir.output_dir
    return [row["loss"] for row in load_checkpoint(list_checkpoints(path / "checkpoints")[-1]).state["history"]]


RESUME_KW = dict(max_steps=6, save_every=3, lora_dropout=0.1, warmup_steps=2, schedule="linear")


@pytest.fixture(scope="module")
def reference_run(tiny_lm, tmp_path_factory):
    """6 uninterrupted steps with dropout (so RNG state matters), checkpoints at 3 and 6."""
    from lorakit.tasks import write_jsonl

    tmp = tmp_path_factory.mktemp("ref")
    data = write_jsonl("rev", tmp / "train.jsonl", n=48, seed=0)
    return data, train(quick_args(tiny_lm, data, tmp / "run", **RESUME_KW))


def test_run_writes_adapter_metrics_plot_log_and_checkpoint(reference_run):
    _, result = reference_run
    out = result.output_dir
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == {"done": 6, "total": 6, "start": 0, "interrupted": False}
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert metrics["memory"]["peak_rss_mb"] > 0 and metrics["memory"]["estimate"]["total_mb"] > 0
    assert metrics["data"]["train"] == {"source": metrics["args"]["data"], "rows": 48, "examples": 48,
                                        "truncated": 0, "dropped": {}, "packed": False}
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,lr,grad_norm") and len(rows) == 7
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000003", "step-000006"]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())


def test_resume_reproduces_the_uninterrupted_run_exactly(reference_run, tiny_lm, tmp_path):
    data, ref = reference_run
    resumed = train(quick_args(tiny_lm, data, tmp_path / "b", resume=str(ref.output_dir / "checkpoints" / "step-000003"),
                               **RESUME_KW))
    assert resumed.metrics["steps"]["start"] == 3
    assert losses(resumed) == losses(ref)  # bit-identical on CPU: same RNG, data position, optimizer state
    a = load_file(ref.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class SendSignalAt(BaseHook):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def after_step(self, ctx):
        if ctx.step == self.step:
            os.kill(os.getpid(), self.signum)  # the real handler runs, as on Ctrl-C


def test_ctrl_c_saves_a_checkpoint_and_resume_auto_continues(reference_run, tiny_lm, tmp_path):
    data, ref = reference_run
    args = quick_args(tiny_lm, data, tmp_path / "c", **{**RESUME_KW, "save_every": 0})
    stopped = train(args, hooks=[SendSignalAt(1, signal.SIGINT)])
    assert stopped.interrupted and stopped.steps_done == 2 and stopped.signal == signal.SIGINT
    assert [p.name for p in list_checkpoints(tmp_path / "c" / "checkpoints")] == ["step-000002"]
    assert not (tmp_path / "c" / "metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    done = train(args.replace(resume="auto"))
    assert losses(done) == losses(ref)
    assert len((tmp_path / "c" / "log.csv").read_text().splitlines()) == 7  # no step logged twice


class NaNAt(BaseHook):
    def __init__(self, step: int):
        self.step = step

    def extra_loss(self, ctx):
        return torch.tensor(float("nan")) if ctx.step == self.step else None


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(reference_run, tiny_lm, tmp_path):
    data, _ = reference_run
    args = quick_args(tiny_lm, data, tmp_path / "n", max_steps=6, save_every=2)
    with pytest.raises(TrainingError, match=r"step 4: the loss is nan.*step-000002.*Lower lr") as exc:
        train(args, hooks=[NaNAt(3)])
    assert "diverged" in str(exc.value)
    kept = list_checkpoints(tmp_path / "n" / "checkpoints")
    assert [p.name for p in kept] == ["step-000002"]
    ckpt = load_checkpoint(kept[0])
    assert all(torch.isfinite(t).all() for t in ckpt.trainable.values())


class Recorder(BaseHook):
    def __init__(self):
        self.events = []

    def on_train_start(self, ctx):
        self.events.append(("start", ctx.step, ctx.total_steps))

    def extra_loss(self, ctx):
        self.events.append(("extra", ctx.step))
        p = next(p for p in ctx.model.parameters() if p.requires_grad)
        return 0.0 * p.sum()

    def after_backward(self, ctx):
        grads = [p.grad for p in ctx.model.parameters() if p.requires_grad]
        self.events.append(("after_backward", ctx.step, all(g is not None for g in grads)))

    def after_step(self, ctx):
        grads = [p.grad for p in ctx.model.parameters() if p.requires_grad]
        self.events.append(("after_step", ctx.step, all(g is None for g in grads)))
        ctx.log["hook_metric"] = float(ctx.step)

    def on_train_end(self, ctx):
        self.events.append(("end", ctx.step))
        (ctx.output_dir / "hook.txt").write_text("done")


def test_hooks_are_called_as_the_contract_says(reference_run, tiny_lm, tmp_path):
    data, _ = reference_run
    rec = Recorder()
    train(quick_args(tiny_lm, data, tmp_path / "h", max_steps=2, grad_accum=2, batch_size=2), hooks=[rec])
    assert rec.events == [
        ("start", 0, 2),
        ("extra", 0), ("extra", 0), ("after_backward", 0, True), ("after_step", 0, True),
        ("extra", 1), ("extra", 1), ("after_backward", 1, True), ("after_step", 1, True),
        ("end", 1),
    ]
    assert (tmp_path / "h" / "hook.txt").read_text() == "done"
    assert "hook_metric" in (tmp_path / "h" / "log.csv").read_text().splitlines()[0]


def test_gradient_accumulation_equals_one_big_batch(reference_run, tiny_lm, tmp_path):
    data, _ = reference_run
    big = train(quick_args(tiny_lm, data, tmp_path / "big", batch_size=4, grad_accum=1))
    acc = train(quick_args(tiny_lm, data, tmp_path / "acc", batch_size=2, grad_accum=2))
    assert losses(big) == pytest.approx(losses(acc), rel=1e-5)


def test_an_output_dir_holding_a_run_is_not_overwritten_silently(reference_run, tiny_lm):
    data, ref = reference_run
    with pytest.raises(ConfigError, match="already holds a run.*--resume auto.*--overwrite"):
        train(quick_args(tiny_lm, data, ref.output_dir))


def test_resume_with_other_settings_is_refused(reference_run, tiny_lm, tmp_path):
    from lorakit.errors import CheckpointError

    data, ref = reference_run
    with pytest.raises(CheckpointError, match="batch_size: checkpoint 4 vs now 2"):
        train(quick_args(tiny_lm, data, tmp_path / "x", resume=str(ref.output_dir), **{**RESUME_KW, "batch_size": 2}))


def test_loraplus_gives_b_a_larger_learning_rate(reference_run, tiny_lm, tmp_path):
    data, _ = reference_run
    seen = {}

    class Peek(BaseHook):
        def on_train_start(self, ctx):
            seen.update({g["name"]: g["base_lr"] for g in ctx.optimizer.param_groups})

    train(quick_args(tiny_lm, data, tmp_path / "lp", method="loraplus", loraplus_ratio=8, max_steps=1), hooks=[Peek()])
    assert seen == {"lora_A": 1e-2, "lora_B": 8e-2}


def test_full_fine_tuning_saves_a_loadable_model(reference_run, tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    data, _ = reference_run
    result = train(quick_args(tiny_lm, data, tmp_path / "full", method="full", max_steps=2))
    assert result.metrics["parameters"]["trainable"] == result.metrics["parameters"]["total"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_sequence_classification_trains_head_and_adapter(tiny_cls, cls_file, tmp_path):
    result = train(quick_args(tiny_cls, cls_file, tmp_path / "cls", eval_data=str(cls_file), max_steps=3))
    assert result.metrics["run"]["task"] == "seq-cls"
    assert result.metrics["args"]["modules_to_save"] == ["score"]
    assert result.metrics["eval"]["after"]["perplexity"] is None
    weights = load_file(tmp_path / "cls" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in weights
    assert json.loads((tmp_path / "cls" / "adapter" / "lorakit_labels.json").read_text()) == {"neg": 0, "pos": 1}


def test_classification_rows_on_a_causal_lm_pick_the_classifier_head(tiny_lm, cls_file, tmp_path):
    result = train(quick_args(tiny_lm, cls_file, tmp_path / "auto", max_steps=1))
    assert result.metrics["run"]["task"] == "seq-cls"
    with pytest.raises(ConfigError, match="need a sequence classifier"):
        train(quick_args(tiny_lm, cls_file, tmp_path / "no", max_steps=1, task="causal-lm"))


def test_text_with_packing_and_chat_rows_train(tiny_lm, tmp_path):
    text = write_rows(tmp_path / "t.jsonl", [{"text": "the quick brown fox " * k} for k in range(1, 9)])
    r = train(quick_args(tiny_lm, text, tmp_path / "t", packing=True, max_length=32, max_steps=2))
    # padding-free packing packs whole rows: rows 2..8 (≥ 40 characters) are cut to max_length, as unpacked
    assert r.metrics["data"]["train"]["packed"] and r.metrics["data"]["train"]["truncated"] == 7
    chat = write_rows(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                           {"role": "assistant", "content": f"a{i}"}]} for i in range(8)])
    r = train(quick_args(tiny_lm, chat, tmp_path / "c", eval_data=str(chat), max_steps=2))
    assert r.metrics["eval"]["before"]["targets"] == 8 * 4  # per row the answer "a", "N", "\n" and "</s>"


def test_builtin_task_data_scores_the_task_before_and_after(tiny_lm, tmp_path):
    r = train(quick_args(tiny_lm, "builtin:rev", tmp_path / "b", max_steps=2))
    assert r.metrics["tasks"]["new"] == ["rev"] and set(r.metrics["tasks"]["after"]) == {"rev"}
    assert r.metrics["eval"]["after"]["perplexity"] is not None  # the task's eval split as eval data


def test_bf16_autocast_and_gradient_checkpointing_train(reference_run, tiny_lm, tmp_path):
    data, _ = reference_run
    r = train(quick_args(tiny_lm, data, tmp_path / "bf", bf16=True, gradient_checkpointing=True, max_steps=2))
    assert all(torch.isfinite(torch.tensor(v)) for v in (r.metrics["loss"]["first"], r.metrics["loss"]["last"]))
    a = load_file(tmp_path / "bf" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in a.values())  # factors train in fp32 under autocast


def test_qlora_trains_on_a_quantized_base(reference_run, tiny_lm, tmp_path):
    """QLoRA learns as much as LoRA on the unquantized base (same data, seed and steps): the eval loss
    falls by a real margin, and by at least 80 % of what the fp32 run achieves. (The tiny base's head
    is frozen behind an RMSNorm, so its loss moves little in absolute terms; about 0.09 here.)"""
    data, _ = reference_run
    kw = dict(max_steps=10, target_modules=["q_proj", "v_proj"], eval_data=str(data))
    q = train(quick_args(tiny_lm, data, tmp_path / "q", quant="nf4", **kw)).metrics["eval"]
    f = train(quick_args(tiny_lm, data, tmp_path / "f", **kw)).metrics["eval"]
    q_drop = q["before"]["loss"] - q["after"]["loss"]
    f_drop = f["before"]["loss"] - f["after"]["loss"]
    assert f_drop > 0.05 and q_drop > 0.8 * f_drop, (q_drop, f_drop)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(
        tmp_path / "q" / "adapter" / "adapter_model.safetensors")


def test_chunked_cross_entropy_trains_exactly_like_the_full_logits(reference_run, tiny_lm, tmp_path):
    # Same data, seed and dropout: the chunked loss (the default) and the plain loss over full logits
    # must give the same per-step losses and the same adapter.
    data, _ = reference_run
    plain = train(quick_args(tiny_lm, data, tmp_path / "plain", chunked_ce=False, lora_dropout=0.1))
    chunk = train(quick_args(tiny_lm, data, tmp_path / "chunk", chunked_ce=True, lora_dropout=0.1))
    assert losses(chunk) == pytest.approx(losses(plain), rel=1e-5)
    a = load_file(plain.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(chunk.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)  # Adam amplifies fp32 summation order
