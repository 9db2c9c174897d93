"""AdaLoRA inside a training loop through the hook contract: automatic allocation, the final budget,
the cut with the optimizer following, the rank report, and checkpoint/resume across the cut."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train.hooks import HookContext
from lorakit.train.methods import METHODS
from lorakit.variants.adalora import (
    AdaLoraConfig,
    AdaLoraHook,
    current_ranks,
    format_rank_table,
    inject_adalora,
    orth_regularizer,
    rank_grid,
    svd_adapters,
)
from lorakit.variants.adalora.method import adalora_config

from conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 100, (4, 12), generator=g)


def run(model, hook, steps, start=0, stop=None, optimizer=None, out=None):
    """A loop with lorakit's hook order: extra_loss → backward → after_backward → step → after_step."""
    torch.manual_seed(0)
    opt = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ctx = HookContext(model=model, optimizer=opt, step=start, total_steps=steps, output_dir=out)
    hook.on_train_start(ctx)
    for step in range(start, stop or steps):
        ctx.step, ctx.log = step, {}
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        extra = hook.extra_loss(ctx)
        (loss + extra if extra is not None else loss).backward()
        hook.after_backward(ctx)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        hook.after_step(ctx)
    if stop is None:
        hook.on_train_end(ctx)
    return ctx


def config(**kw):
    base = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, lora_alpha=12, target_modules=TARGETS)
    base.update(kw)
    return AdaLoraConfig(**base)


def test_loop_reaches_target_budget_and_reports(tmp_path, capsys):
    model = inject_adalora(tiny_llama(), config())  # no total_step: the hook takes the run's length
    hook = AdaLoraHook()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ctx = run(model, hook, 12, optimizer=opt, out=tmp_path)
    cfg = model._lorakit.adapters["default"].config
    assert cfg.total_step == 12
    n = 2 * len(TARGETS)
    ranks = current_ranks(model)
    assert len(ranks) == n and sum(ranks.values()) == 3 * n  # total kept rank = b(T) = target_r × matrices
    assert sum(ad.r for ad in svd_adapters(model, "default").values()) == 3 * n  # physically cut
    assert ctx.optimizer is opt  # patched in place
    live = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in live}
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in live)
    assert ctx.log["adalora/rank"] == 3 * n and "adalora/orth_reg" in ctx.log
    report = json.loads((tmp_path / "adalora_ranks.json").read_text())
    assert report["ranks"] == ranks and report["total_rank"] == report["target_budget"] == 3 * n
    png = (tmp_path / "adalora_ranks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    printed = capsys.readouterr().out
    assert "AdaLoRA final ranks" in printed and "q_proj" in printed


def test_extra_loss_is_weighted_regularizer():
    model = inject_adalora(tiny_llama(), config(total_step=10, orth_reg_weight=0.3, orth_reg_form="paper"))
    hook = AdaLoraHook(report=False, verbose=False)
    ctx = HookContext(model=model, optimizer=None, step=0, total_steps=10)
    hook.on_train_start(ctx)
    want = 0.3 * orth_regularizer(svd_adapters(model, "default").values(), "paper")
    torch.testing.assert_close(hook.extra_loss(ctx), want)
    model2 = inject_adalora(tiny_llama(), config(total_step=10, orth_reg_weight=0.0))
    hook2 = AdaLoraHook()
    hook2.on_train_start(HookContext(model=model2, optimizer=None, step=0, total_steps=10))
    assert hook2.extra_loss(ctx) is None


def test_resume_across_the_cut_matches_an_uninterrupted_run(ids):
    def fresh():
        torch.manual_seed(5)
        return inject_adalora(tiny_llama(), config(total_step=12))

    full = fresh()
    run(full, AdaLoraHook(report=False, verbose=False), 12)
    want = full(input_ids=ids).logits

    first = fresh()
    hook = AdaLoraHook(report=False, verbose=False)
    ctx = run(first, hook, 12, stop=10)  # the final allocation (t = 9) is behind us
    state = hook.state_dict()
    trainable = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}
    opt_state = ctx.optimizer.state_dict()

    second = fresh()  # a new process: full-size adapters, optimizer built before the checkpoint loads
    opt = torch.optim.AdamW([p for p in second.parameters() if p.requires_grad], lr=2e-2)
    hook2 = AdaLoraHook(model=second, report=False, verbose=False)
    hook2.load_state_dict(state)  # reshapes the adapters first (as lorakit's loop expects)
    params = dict(second.named_parameters())
    assert {n: tuple(params[n].shape) for n in trainable} == {n: tuple(t.shape) for n, t in trainable.items()}
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t)
    opt.load_state_dict(opt_state)
    run(second, hook2, 12, start=10, optimizer=opt)
    torch.testing.assert_close(second(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert current_ranks(second) == current_ranks(full)


def test_method_builder_maps_train_args():
    args = SimpleNamespace(r=4, lora_alpha=16.0, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           exclude_modules=None, modules_to_save=None, task="causal-lm", use_rslora=False,
                           method_options={"deltaT": 5})
    cfg, auto = adalora_config(args)
    assert (cfg.target_r, cfg.init_r, cfg.deltaT, cfg.total_step, auto) == (4, 6, 5, None, True)
    setup = METHODS["adalora"](tiny_llama(), args)
    hook = setup.hooks[0]
    hook.on_train_start(HookContext(model=setup.model, optimizer=None, step=0, total_steps=50))
    c = hook.allocator.config
    assert (c.total_step, c.tinit, c.tfinal) == (50, 5, 15)
    with pytest.raises(ConfigError, match="not AdaLoRA options"):
        adalora_config(SimpleNamespace(**{**vars(args), "method_options": {"rank": 3}}))


def test_rank_grid_layout():
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.down_proj": 0,
             "model.layers.1.self_attn.q_proj": 2, "model.layers.10.self_attn.q_proj": 1}
    rows, cols, grid = rank_grid(ranks)
    assert rows == ["0", "1", "10"] and cols == ["down_proj", "q_proj"]
    assert grid == [[0, 4], [None, 2], [None, 1]]
    assert "total 7 over 4 matrices" in format_rank_table(ranks)


def test_lorakit_train_method_adalora_end_to_end(tmp_path):
    """`lorakit train --method adalora` through the real loop: allocation, report, checkpoint/resume
    across the cut (same adapter as an uninterrupted run), and a file PEFT reads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.tasks import DEFAULT_TASK, build_tokenizer
    from lorakit.train import loop
    from lorakit.train.args import TrainArgs

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    common = dict(model=str(tmp_path / "base"), data=f"builtin:{DEFAULT_TASK}", method="adalora", r=2, max_steps=20,
                  batch_size=8, builtin_rows=64, eval_rows=8, lr=1e-2, threads=1, progress=False, eval_tasks=[])
    full = loop.train(TrainArgs(output_dir=str(tmp_path / "full"), **common))
    report = json.loads((tmp_path / "full" / "adalora_ranks.json").read_text())
    assert report["total_rank"] == report["target_budget"] == 2 * 14  # r=2 over 14 linear matrices
    assert (report["total_step"], report["tinit"], report["tfinal"]) == (20, 2, 6)
    assert (tmp_path / "full" / "adalora_ranks.png").is_file() and full.steps_done == 20
    # checkpoint at 16 (after the final allocation at t = 14), resume from it in a new run
    loop.train(TrainArgs(output_dir=str(tmp_path / "res"), save_every=16, keep_checkpoints=3, **common))
    loop.train(TrainArgs(output_dir=str(tmp_path / "res"), resume=str(tmp_path / "res/checkpoints/step-000016"),
                         **common))
    ids = torch.randint(0, 100, (2, 10))
    logits = []
    for run in ("full", "res"):
        model = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                     tmp_path / run / "adapter")
        logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "full" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, logits[0], rtol=1e-5, atol=1e-5)
