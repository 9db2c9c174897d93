"""`lorakit train` with PEFT's adapter start and shape options: init_lora_weights (gaussian, PiSSA,
OLoRA), layers_to_transform / layers_pattern, rank_pattern / alpha_pattern — and their refusals.

References: the trained model itself, as the run holds it in memory (a hook takes its logits at the end
of training), and PEFT, which reads the artifact onto the untouched base. A PiSSA / OLoRA run trains
against the residual base W − s·B0·A0, so its artifact must be the rank-2r LoRA of the original weights
(PEFT's path_initial_model_for_weight_conversion): PEFT on the original base must give the trained
model's logits. For the shape options PEFT builds its own model from the same LoraConfig fields and
the file's keys and shapes must be PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import CheckpointError, ConfigError, TargetNotFoundError
from lorakit.hooks import BaseHook
from lorakit.train import TrainArgs, train

from .train_helpers import quick_args

peft = pytest.importorskip("peft", reason="PEFT reads the adapters these runs write")
IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 11, 2]])


class LogitsAtEnd(BaseHook):
    """The in-memory trained model's logits on IDS, after the last step."""

    def on_train_end(self, ctx) -> None:
        model = ctx.model
        was = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=IDS).logits.float()
        model.train(was)


def _peft_logits(base_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _base_logits(base_dir):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=IDS).logits.float()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_weight_init_artifact_is_a_lora_of_the_original_weights(tiny_lm, instr_file, tmp_path, init, rslora):
    hook = LogitsAtEnd()
    result = train(quick_args(tiny_lm, instr_file, tmp_path / "run", init_lora_weights=init, use_rslora=rslora,
                              max_steps=2, eval_rows=0), hooks=[hook])
    art = result.output_dir / "adapter"
    cfg = json.loads((art / "adapter_config.json").read_text())
    # rank 2r; alpha scaled so that alpha/r (alpha/sqrt(r) under rsLoRA) is the run's
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    got = _peft_logits(tiny_lm, art)
    assert not torch.allclose(got, _base_logits(tiny_lm), atol=1e-3)  # it trained: the check can fail
    torch.testing.assert_close(got, hook.logits, atol=1e-4, rtol=1e-4)
    tensors = load_file(art / "adapter_model.safetensors")
    a = [t for k, t in tensors.items() if k.endswith("lora_A.weight")]
    assert a and all(t.shape[0] == 8 for t in a)


def test_weight_init_artifact_also_serves_lorakit_eval(tiny_lm, instr_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit import load_adapter

    hook = LogitsAtEnd()
    result = train(quick_args(tiny_lm, instr_file, tmp_path / "run", init_lora_weights="olora", max_steps=2,
                              eval_rows=0), hooks=[hook])
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), result.output_dir / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits.float(), hook.logits, atol=1e-4, rtol=1e-4)


def test_weight_init_resume_is_exact(tiny_lm, instr_file, tmp_path):
    kw = dict(init_lora_weights="pissa", max_steps=4, save_every=2, eval_rows=0, lora_dropout=0.1)
    ref = train(quick_args(tiny_lm, instr_file, tmp_path / "ref", **kw))
    resumed = train(quick_args(tiny_lm, instr_file, tmp_path / "b", **kw,
                               resume=str(ref.output_dir / "checkpoints" / "step-000002")))
    assert resumed.metrics["steps"]["start"] == 2
    a = load_file(ref.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_init_resume_refuses_other_starting_factors(tiny_lm, instr_file, tmp_path):
    ref = train(quick_args(tiny_lm, instr_file, tmp_path / "ref", init_lora_weights="pissa", max_steps=2,
                           save_every=2, eval_rows=0))
    state = ref.output_dir / "checkpoints" / "step-000002" / "trainer_state.json"
    data = json.loads(state.read_text())
    assert len(data["fingerprint"]["initial_factors_sha256"]) == 64
    data["fingerprint"]["initial_factors_sha256"] = "0" * 64  # as if the SVD had come out otherwise
    state.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="initial_factors_sha256"):
        train(quick_args(tiny_lm, instr_file, tmp_path / "b", init_lora_weights="pissa", max_steps=2, eval_rows=0,
                         resume=str(state.parent)))


def test_gaussian_init_writes_a_plain_adapter(tiny_lm, instr_file, tmp_path):
    hook = LogitsAtEnd()
    result = train(quick_args(tiny_lm, instr_file, tmp_path / "run", init_lora_weights="gaussian", max_steps=2,
                              eval_rows=0), hooks=[hook])
    cfg = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    torch.testing.assert_close(_peft_logits(tiny_lm, result.output_dir / "adapter"), hook.logits, atol=1e-4,
                               rtol=1e-4)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = [
    dict(layers_to_transform=[1]),
    dict(layers_to_transform=[0], layers_pattern=["layers"]),
    dict(rank_pattern={"q_proj": 2, "mlp": 6}),
    dict(rank_pattern={"model.layers.0.self_attn.v_proj": 2}, alpha_pattern={"o_proj": 3.0}),
    dict(layers_to_transform=[0, 1], rank_pattern={"down_proj": 1}, alpha_pattern={"up_proj": 32.0}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(s))
def test_shape_options_give_peft_adapter(tiny_lm, instr_file, tmp_path, shape):
    from transformers import AutoModelForCausalLM

    hook = LogitsAtEnd()
    result = train(quick_args(tiny_lm, instr_file, tmp_path / "run", max_steps=2, eval_rows=0, **shape),
                   hooks=[hook])
    art = result.output_dir / "adapter"
    ours = {k: tuple(t.shape) for k, t in load_file(art / "adapter_model.safetensors").items()}
    # PEFT builds its own adapter from the same fields: the same modules, the same shapes. (PEFT refuses
    # layers_to_transform with a string target_modules, all-linear included: the list it stands for.)
    peft_model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL_LINEAR, **shape))
    theirs = {k.replace(".default", ""): tuple(p.shape) for k, p in peft_model.named_parameters() if "lora_" in k}
    assert ours == theirs
    torch.testing.assert_close(_peft_logits(tiny_lm, art), hook.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(init_lora_weights="loftq"), "loftq_inject"),
    (dict(init_lora_weights="pissa", quant="nf4"), "quantized base"),
    (dict(init_lora_weights="olora", quant="int8"), "quantized base"),
    (dict(init_lora_weights="pissa", use_dora=True), "DoRA"),
    (dict(init_lora_weights="pissa", method="adalora"), "method=adalora"),
    (dict(rank_pattern={"q_proj": 4}, method="olora"), "method=olora"),
    (dict(layers_to_transform=[0], method="full"), "method=full"),
    (dict(init_lora_weights="bogus"), "init_lora_weights='bogus'"),
    (dict(init_lora_weights="pissa_niter_x"), "pissa_niter_N"),
    (dict(init_lora_weights=1), "init_lora_weights"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern"),
    (dict(init_lora_weights="pissa", fused_slices={"q_proj": [True]}), "fused_slices"),
])
def test_refused_on_construction(tiny_lm, instr_file, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        quick_args(tiny_lm, instr_file, tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()


def test_layers_that_match_nothing_are_refused_before_a_run_dir(tiny_lm, instr_file, tmp_path):
    with pytest.raises(TargetNotFoundError, match=r"layers_to_transform=\[7\]"):
        train(quick_args(tiny_lm, instr_file, tmp_path / "run", layers_to_transform=[7]))
    assert not (tmp_path / "run").exists()


def test_flag_forms(tiny_lm, instr_file, tmp_path):
    from lorakit.cli.options import build

    args = build(TrainArgs, ("the arguments", {"init_lora_weights": "False", "layers_to_transform": "0,1",
                                               "rank_pattern.q_proj": "2", "alpha_pattern.mlp": "4.5",
                                               "output_dir": str(tmp_path / "x")}))
    assert args.init_lora_weights is False and args.layers_to_transform == [0, 1]
    assert args.rank_pattern == {"q_proj": 2} and args.alpha_pattern == {"mlp": 4.5}
    assert build(TrainArgs, ("yaml", {"init_lora_weights": "pissa_niter_4"})).init_lora_weights == "pissa_niter_4"


# -- LoHa / LoKr as methods ----------------------------------------------------------------------------
@pytest.mark.parametrize("method, kw", [
    ("loha", {}),
    ("loha", dict(rank_pattern={"q_proj": 2}, layers_to_transform=[1])),
    ("lokr", {}),
    ("lokr", dict(method_options={"decompose_both": True}, r=2)),
    ("lokr", dict(method_options={"decompose_factor": 4}, alpha_pattern={"down_proj": 2.0})),
])
def test_lycoris_methods_write_peft_adapters(tiny_lm, instr_file, tmp_path, method, kw):
    hook = LogitsAtEnd()
    result = train(quick_args(tiny_lm, instr_file, tmp_path / "run", method=method, max_steps=2, eval_rows=0,
                              **kw), hooks=[hook])
    art = result.output_dir / "adapter"
    cfg = json.loads((art / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper() and cfg["r"] == kw.get("r", 4) and cfg["alpha"] == 8
    got = _peft_logits(tiny_lm, art)  # PEFT's own LoHa / LoKr layers on the untouched base
    assert not torch.allclose(got, _base_logits(tiny_lm), atol=1e-4)  # it trained
    torch.testing.assert_close(got, hook.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(method="loha", use_dora=True), "use_dora: LoRA options that method=loha"),
    (dict(method="lokr", lora_dropout=0.1), "lora_dropout"),
    (dict(method="loha", use_rslora=True), "use_rslora"),
    (dict(method="lokr", init_lora_weights="pissa"), "init_lora_weights"),
    (dict(method="loha", quant="nf4"), "quantized"),
    (dict(method="loha", method_options={"decompose_both": True}), "takes no method_options"),
    (dict(method="lokr", method_options={"factor": 2}), "unknown method_options"),
])
def test_lycoris_methods_refuse_lora_only_settings(tiny_lm, instr_file, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(quick_args(tiny_lm, instr_file, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()
