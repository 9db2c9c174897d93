"""Bad-input sweep (Dec 1): each case was a raw traceback, a silent misreading or a destroyed file before.
Every failure must be a LorakitError naming the bad value and leave the model / files as they were."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError, AdapterStateError, ConfigError, OutputError

from fault_helpers import assert_same, picture, tiny_llama


def with_adapter(name="a", targets=("q_proj", "v_proj")):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False), name)
    return model


@pytest.mark.parametrize("model", [None, "gpt2", 3])
def test_a_non_module_model_is_a_config_error(model):
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        lorakit.list_adapters(model)


@pytest.mark.parametrize("call", [
    lambda m: lorakit.set_adapter(m, None),
    lambda m: lorakit.set_adapter(m, 3),
    lambda m: lorakit.set_adapter(m, [["a"]]),
    lambda m: lorakit.merge(m, 3),
    lambda m: lorakit.delete_adapter(m, ["a"]),
    lambda m: lorakit.set_trainable(m, "a", "no"),  # a non-empty string used to read as True
    lambda m: lorakit.merge(m, safe_merge="yes"),
], ids=["set-None", "set-int", "set-nested-list", "merge-int", "delete-list", "trainable-str", "safe_merge-str"])
def test_wrong_argument_types_are_config_errors_and_change_nothing(call):
    model = with_adapter()
    before = picture(model)
    with pytest.raises(ConfigError, match=r"adapter name|trainable|safe_merge"):
        call(model)
    assert_same(before, picture(model))


@pytest.mark.parametrize("weight,msg", [(float("nan"), "finite"), (float("inf"), "finite"), ("x", "number"),
                                        (None, "number")])
def test_combine_refuses_non_finite_or_non_numeric_weights(weight, msg):
    model = with_adapter()
    before = picture(model)
    with pytest.raises(ConfigError, match=rf"weights\[0\].*{msg}"):
        lorakit.combine_adapters(model, ["a"], [weight], "c")
    assert_same(before, picture(model))  # before: a 'c' with NaN factors was added
    with pytest.raises(ConfigError, match="list of adapter names"):
        lorakit.combine_adapters(model, ["a"], None, "c")


def test_float8_adapter_file_loads_instead_of_crashing_in_isfinite(tmp_path):
    src = with_adapter()
    lorakit.save_adapter(src, tmp_path / "ad", "a")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    ref = load_file(f)
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in ref.items()}, f)
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "ad", "a")  # was NotImplementedError: "isfinite" ... Float8_e4m3fn
    got = model.model.layers[0].self_attn.q_proj.lora["a"].lora_A
    want = ref["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].to(torch.float8_e4m3fn).float()
    assert torch.equal(got.detach(), want)
    # a NaN in float8 is still refused by name
    save_file({k: torch.full_like(v, float("nan")).to(torch.float8_e4m3fn) for k, v in ref.items()}, f)
    other = tiny_llama()
    before = picture(other)
    with pytest.raises(AdapterFileError, match="NaN or inf"):
        lorakit.load_adapter(other, tmp_path / "ad", "a")
    assert_same(before, picture(other))


def test_adapter_paths_of_the_wrong_type_or_blocked_by_a_file(tmp_path):
    model = with_adapter()
    before = picture(model)
    with pytest.raises(ConfigError, match="adapter directory None"):
        lorakit.load_adapter(model, None, "b")
    with pytest.raises(ConfigError, match="trainable"):
        lorakit.load_adapter(model, tmp_path, "b", trainable="yes")
    with pytest.raises(ConfigError, match="adapter directory None"):
        lorakit.save_adapter(model, None, "a")
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):  # FileExistsError / NotADirectoryError before
        with pytest.raises(OutputError, match="afile"):
            lorakit.save_adapter(model, out, "a")
    assert blocker.read_text() == "keep me"
    assert_same(before, picture(model))


def test_atomic_dir_never_replaces_a_file_and_keeps_the_usual_mode(tmp_path):
    import os

    from lorakit._fs import atomic_dir

    blocker = tmp_path / "merged"
    blocker.write_text("keep me")
    with pytest.raises(OutputError, match="is a file"):
        with atomic_dir(blocker) as tmp:
            (tmp / "model.safetensors").write_text("x")
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask  # mkdtemp's 0700 before


def test_cli_eval_batch_size_zero_and_generate_nan_temperature(capsys):
    from lorakit.cli import main
    from lorakit.train.generation import Generator

    assert main(["eval", "--data", "builtin:shift", "--batch-size", "0"]) == 2  # ZeroDivisionError before
    assert "batch_size=0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="temperature=nan"):
        Generator(None, None, 4, float("nan"))


def test_an_adapter_named_twice_is_refused_not_applied_twice():
    model = with_adapter()
    x = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        ref = model(x).logits
    before = picture(model)
    with pytest.raises(ConfigError, match=r"\['a'\] listed more than once"):
        lorakit.set_adapter(model, ["a", "a"])  # before: a's update was added twice in every forward
    assert_same(before, picture(model))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("names", [None, "a", 3])
def test_per_row_adapters_needs_a_list(names):
    model = with_adapter()
    before = picture(model)
    with pytest.raises(ConfigError, match="adapter_names"):
        with lorakit.per_row_adapters(model, names):
            pass
    assert_same(before, picture(model))


def test_trainable_parameters_of_a_non_module():
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        lorakit.trainable_parameters(None)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("case,msg", [
    ("none", "checkpoint=None"), ("int", "floating point"), ("nan", "NaN or inf"), ("enable-typo", "enable_lora 'c_atn'"),
])
def test_loralib_checkpoints_bad_in_memory_inputs(case, msg):
    from lorakit.loralib import load_lora_state_dict

    good = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 32),
            "transformer.h.0.attn.c_attn.lora_B": torch.randn(96, 4)}
    ckpt, kw = good, {}
    if case == "none":
        ckpt = None
    elif case == "int":
        ckpt = {k: v.long() for k, v in good.items()}  # was silently cast to float
    elif case == "nan":
        ckpt = {**good, "transformer.h.0.attn.c_attn.lora_B": torch.full((96, 4), float("nan"))}  # was loaded
    else:
        kw = {"enable_lora": {"c_atn": [True, False, True]}}  # was ignored: c_attn loaded as a plain Linear
    model = tiny_gpt2()
    before = picture(model)
    with pytest.raises(AdapterFileError, match=msg):
        load_lora_state_dict(model, ckpt, 8, **kw)
    assert_same(before, picture(model))


def test_safe_merge_refused_at_a_later_layer_leaves_earlier_layers_unmerged():
    model = tiny_llama().half()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    last = model.model.layers[1].self_attn.v_proj  # the last host: every other layer was merged first before
    with torch.no_grad():
        last.base_layer.weight.fill_(60000.0)  # near fp16's max; ΔW = (8/2)·2·60·60 = 28800 overflows
        last.lora["a"].lora_A.fill_(60.0)
        last.lora["a"].lora_B.fill_(60.0)
    before = picture(model)
    for call in (lambda: lorakit.merge(model, safe_merge=True), lambda: lorakit.merge_and_unload(model, safe_merge=True)):
        with pytest.raises(AdapterStateError, match="inf/NaN.*no adapter was merged"):
            call()
        assert_same(before, picture(model))  # bit-exact: nothing was added and subtracted again


def test_merge_refused_by_a_quantized_layer_leaves_the_dense_layers_unmerged():
    from lorakit.quant import quantize_model

    model = tiny_llama()
    # only the last layer's v_proj is quantized: it comes after every dense host in module order
    quantize_model(model, "nf4", compute_dtype=torch.float32,
                   skip=[p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                         and p != "model.layers.1.self_attn.v_proj"])
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    before = picture(model)
    with pytest.raises(AdapterStateError, match="QuantLinear"):
        lorakit.merge(model)
    assert_same(before, picture(model))


@pytest.mark.parametrize("make", [lorakit.LoraConfig, lorakit.LoHaConfig])
def test_layers_pattern_that_is_not_a_regex_is_a_config_error(make):
    with pytest.raises(ConfigError, match=r"layers_pattern '\(\['"):  # re.error at inject before
        make(target_modules=["q_proj"], layers_pattern="([", layers_to_transform=[0])


@pytest.mark.parametrize("fail_at", [1, 2])
def test_save_adapter_writes_weights_and_config_together(tmp_path, monkeypatch, fail_at):
    import errno
    import os

    first = with_adapter()
    lorakit.save_adapter(first, tmp_path / "ad", "a")
    files = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    second = tiny_llama(seed=1)
    lorakit.inject(second, lorakit.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False), "a")
    calls = {"n": 0}
    real = os.fsync

    def full_disk(fd):
        calls["n"] += 1
        if calls["n"] == fail_at:  # 1: the weights' write, 2: the config's (after the weights were in place)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        lorakit.save_adapter(second, tmp_path / "ad", "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == files  # no temporaries, no mix


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.csv", "")])
def test_an_empty_data_file_says_it_is_empty(tmp_path, name, text):
    from lorakit.data.files import read_data
    from lorakit.errors import DataError

    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name}: the file is empty"):  # "(StopIteration: )" before
        read_data(str(tmp_path / name), "auto", "train", 10, 0)


@pytest.mark.parametrize("kw,msg", [(dict(skip=5), "skip="), (dict(skip=["lm_head", 3]), "skip="),
                                    (dict(double_quant="no"), "double_quant='no'")])
def test_quantize_model_wrong_argument_types(kw, msg):
    from lorakit.errors import QuantizationError

    model = tiny_llama()
    before = picture(model)
    with pytest.raises(QuantizationError, match=msg):
        lorakit.quantize_model(model, "nf4", compute_dtype=torch.float32, **kw)
    assert_same(before, picture(model))
    with pytest.raises(QuantizationError, match="torch.nn.Module"):
        lorakit.quantize_model(None, "nf4")


def test_quantize_model_skip_may_be_one_name():
    model = tiny_llama()
    lorakit.quantize_model(model, "nf4", compute_dtype=torch.float32, skip="down_proj")  # was 9 one-letter names
    assert all(isinstance(layer.mlp.down_proj, torch.nn.Linear) for layer in model.model.layers)


@pytest.mark.parametrize("dtype", ["fp32", torch.int8])
def test_dequantize_and_merge_refuses_a_non_float_dtype(dtype):
    from lorakit.errors import QuantizationError
    from lorakit.quant import quantize_model
    from lorakit.quant.merge import dequantize_and_merge

    model = tiny_llama()
    quantize_model(model, "nf4", compute_dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = picture(model)
    with pytest.raises(QuantizationError, match=rf"dtype={dtype!r}"):  # TypeError / RuntimeError from torch
        dequantize_and_merge(model, dtype=dtype)
    assert_same(before, picture(model))


@pytest.mark.parametrize("make,kw,msg", [
    (lorakit.LoraConfig, {"lora_aplha": 16}, r"LoraConfig: unknown field\(s\) 'lora_aplha' \(did you mean 'lora_alpha'\?\)"),
    (lorakit.LoraConfig, {"lora_bias": True}, r"unknown field\(s\) 'lora_bias'.*PEFT_FIELDS"),
    (lorakit.LoKrConfig, {"decompose_factr": 2}, r"LoKrConfig: .*did you mean 'decompose_factor'"),
    (lorakit.LoHaConfig, {"rank_droput": 0.1}, r"LoHaConfig: .*did you mean 'rank_dropout'"),
])
def test_an_unknown_config_field_is_a_config_error_with_the_closest_name(make, kw, msg):
    with pytest.raises(ConfigError, match=msg):  # a bare TypeError before
        make(target_modules=["q_proj"], **kw)


def test_unknown_adalora_and_trainargs_fields():
    from lorakit.adapter_kinds.adalora_config import AdaLoraConfig
    from lorakit.train import TrainArgs

    with pytest.raises(ConfigError, match="AdaLoraConfig: .*did you mean 'target_r'"):
        AdaLoraConfig(target_modules=["q_proj"], total_step=10, targt_r=4)
    with pytest.raises(ConfigError, match="TrainArgs: .*'learning_rate'"):
        TrainArgs(learning_rate=1e-3)
