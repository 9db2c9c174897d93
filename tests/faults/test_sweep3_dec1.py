"""Bad-input sweep 3 (Dec 1): the public API, the CLI's subcommands and the typed configs, as a user hits
them. Each case was a raw traceback, a silent acceptance, a late refusal or a destroyed file before; now it
is a LorakitError naming the bad value, raised before anything changed (model, files, output dirs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from lorakit.errors import AdapterStateError, ConfigError, QuantizationError

from fault_helpers import assert_same, picture, tiny_llama


def with_adapter(name="a", targets=("q_proj", "v_proj")):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False), name)
    return model


def tree(path):
    """Every file under ``path`` with its bytes (directories included as None)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# -- the three known leftovers ------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(lambda_orth=float("nan")), "lambda_orth=nan"), (dict(lambda_orth=-0.5), "lambda_orth=-0.5"),
    (dict(lambda_l2=float("inf")), "lambda_l2=inf"), (dict(lambda_l2=-1), "lambda_l2=-1"),
    (dict(lambda_orth="0.5"), "lambda_orth='0.5'"), (dict(mode="cube"), "overlap='cube'"),
    (dict(l2="l1"), "l2='l1'"), (dict(adapter_name=3), "adapter_name=3"),
])
def test_olora_loss_refuses_bad_lambdas_and_modes(kw, msg):
    from lorakit.variants.olora import add_olora, olora_loss

    model = tiny_llama()
    add_olora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=rf"olora_loss {msg}|olora_loss: {msg}"):  # a NaN loss / a reward before
        olora_loss(model, **kw)
    with pytest.raises(ConfigError, match="olora_loss: model must be a torch.nn.Module"):
        olora_loss(None)


def test_forgetting_refuses_expand_that_does_not_divide_the_blocks_before_any_run(tmp_path):
    from lorakit.cli import main

    out = tmp_path / "out"
    # was refused only after lora-r4 trained and the model was loaded for expand-3 (runs/ left behind)
    assert main(["forgetting", "--train", "shift", "--methods", "lora-r4,expand-3", "--steps", "1",
                 "--output-dir", str(out)]) == 2
    assert not out.exists()


def test_forgetting_expand_check_names_the_flag(capsys):
    from lorakit.eval.forgetting import check_expansions, parse_methods

    with pytest.raises(ConfigError, match=r"--methods 'expand-3': n_new=3 does not divide the model's 4 blocks"):
        check_expansions(parse_methods("full,expand-3"), None)  # the embedded model: 4 blocks
    check_expansions(parse_methods("expand-2,expand-4-lora"), None)


def test_trainargs_refuses_an_unknown_method_on_construction():
    from lorakit.train import TrainArgs
    from lorakit.train.args import METHOD_NAMES
    from lorakit.train.methods import METHODS, OPTION_CHECKS

    assert METHOD_NAMES == tuple(METHODS) and set(OPTION_CHECKS) == set(METHODS)  # one table: METHODS
    for bad in ("zzz", "", "LoRA"):
        with pytest.raises(ConfigError, match=rf"method={bad!r}: not a lorakit method; choose one of lora, "
                                              "loraplus, full, adalora, olora, expand"):
            TrainArgs(method=bad)
    for bad in (None, 3):
        with pytest.raises(ConfigError, match=rf"method={bad!r}: must be a string"):
            TrainArgs(method=bad)


# -- the public API -----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [lorakit.unmerge, lorakit.unload, lambda m: lorakit.disabled(m).__enter__(),
                                  lambda m: lorakit.load_adapter(m, "nowhere", "a")],
                         ids=["unmerge", "unload", "disabled", "load_adapter"])
@pytest.mark.parametrize("model", [None, "gpt2"])
def test_non_module_models_are_config_errors(call, model):
    with pytest.raises(ConfigError, match="model must be a torch.nn.Module"):  # AttributeError before
        call(model)


def test_inject_kind_of_the_wrong_type():
    model = tiny_llama()
    before = picture(model)
    with pytest.raises(ConfigError, match="kind='lora': must be an adapter kind"):  # AttributeError before
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), "x", kind="lora")
    assert_same(before, picture(model))


def test_quantize_model_unknown_option_is_named():
    model = tiny_llama()
    before = picture(model)
    with pytest.raises(QuantizationError, match="unknown option 'blocksiz' \\(did you mean 'blocksize'\\?\\)"):
        lorakit.quantize_model(model, "nf4", blocksiz=64)  # a bare TypeError before
    assert_same(before, picture(model))


def test_set_trainable_on_a_merged_adapter_is_refused():
    model = with_adapter()
    lorakit.set_trainable(model, "a", False)
    lorakit.merge(model)
    before = picture(model)
    # before: accepted; the factors required grad but never ran, and backward failed in torch
    with pytest.raises(AdapterStateError, match="adapter 'a' is merged .* lorakit.unmerge"):
        lorakit.set_trainable(model, "a", True)
    assert_same(before, picture(model))
    lorakit.set_trainable(model, "a", False)  # freezing a merged adapter is fine


def test_combine_adapters_takes_one_name_as_a_string():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "ab")
    lorakit.combine_adapters(model, "ab", [1.0], "c")  # was read as ['a', 'b']: "no adapter named 'a'"
    host = model.model.layers[0].self_attn.q_proj
    assert torch.allclose(host.lora["c"].delta_2d(), host.lora["ab"].delta_2d(), atol=1e-6)


# -- typed configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kw,msg", [
    (lorakit.LoraConfig, dict(target_modules=""), "target_modules='': give module names"),
    (lorakit.LoraConfig, dict(target_modules=" "), "target_modules=' '"),
    (lorakit.LoraConfig, dict(exclude_modules=""), "exclude_modules=''"),
    (lorakit.LoraConfig, dict(task_type="ZZZ"), "task_type='ZZZ': use one of CAUSAL_LM, SEQ_CLS"),
    (lorakit.LoraConfig, dict(task_type=3), "task_type=3"),
    (lorakit.LoraConfig, dict(init_lora_weights="loftq", loftq_config="x"), "loftq_config='x': must be a mapping"),
    (lorakit.LoKrConfig, dict(decompose_both="yes"), "decompose_both='yes': must be true or false"),
    (lorakit.LoKrConfig, dict(rank_dropout_scale=1), "rank_dropout_scale=1"),
    (lorakit.LoHaConfig, dict(use_effective_conv2d="no"), "use_effective_conv2d='no': must be true or false"),
    (lorakit.LoHaConfig, dict(init_weights=1), r"init_weights=1: use one of \(True, False\)"),
    (lorakit.LoKrConfig, dict(init_weights=0.0), "init_weights=0.0"),
    (lorakit.LoHaConfig, dict(rank_pattern=[1]), r"rank_pattern=\[1\]: must be a mapping"),
    (lorakit.LoKrConfig, dict(rank_pattern={"q_proj": "2"}), r"rank_pattern\['q_proj'\]='2': must be an integer"),
    (lorakit.LoHaConfig, dict(alpha_pattern={"q_proj": None}), r"alpha_pattern\['q_proj'\]=None"),
    (lorakit.LoHaConfig, dict(base_model_name_or_path=3), "base_model_name_or_path=3"),
    (lorakit.LoHaConfig, dict(rank_dropout=[]), r"rank_dropout=\[\]: must be a number"),  # read as 0 before
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_fields_checked_on_construction(make, kw, msg):
    with pytest.raises(ConfigError, match=msg):  # accepted (or ValueError/TypeError from dict()) before
        make(**{"target_modules": ["q_proj"], **kw})


@pytest.mark.parametrize("kw,msg", [
    (dict(fan_in_fan_out="no"), "fan_in_fan_out='no'"), (dict(base_model_name_or_path=3), "base_model_name_or_path=3"),
    (dict(lora_alpha=-1), "lora_alpha=-1"), (dict(task_type="ZZ"), "task_type='ZZ'"),
    (dict(target_modules=""), "target_modules=''"), (dict(lora_alpha=1e300), "lora_alpha=1e\\+300"),
])
def test_adalora_config_fields(kw, msg):
    from lorakit.variants.adalora import AdaLoraConfig

    with pytest.raises(ConfigError, match=msg):
        AdaLoraConfig(**{"init_r": 4, "target_r": 2, "total_step": 100, "target_modules": ["q_proj"], **kw})


def test_a_file_with_an_unknown_task_type_is_refused_before_the_model_changes(tmp_path):
    src = with_adapter()
    lorakit.save_adapter(src, tmp_path / "ad", "a")
    cfg = tmp_path / "ad" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "task_type": "CASUAL_LM"}))
    files = tree(tmp_path)
    model = tiny_llama()
    before = picture(model)
    with pytest.raises(ConfigError, match=r"adapter_config\.json: task_type='CASUAL_LM': use one of CAUSAL_LM"):
        lorakit.load_adapter(model, tmp_path / "ad", "a")
    assert_same(before, picture(model))
    assert tree(tmp_path) == files


# -- TrainArgs and method_options: refused before a run makes its output directory ------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(target_modules=""), "target_modules=''"), (dict(target_modules=3), "target_modules=3"),
    (dict(exclude_modules=[1]), r"exclude_modules=\[1\]"), (dict(modules_to_save=5), "modules_to_save=5"),
])
def test_trainargs_checks_the_lora_targets_on_construction(kw, msg):
    from lorakit.train import TrainArgs

    with pytest.raises(ConfigError, match=msg):
        TrainArgs(**kw)
    TrainArgs(method="full", target_modules="")  # full fine-tuning has no targets


@pytest.mark.parametrize("method,options,msg", [
    ("adalora", {"target_r": "zz"}, "method_options.target_r='zz'"),  # ValueError from int() before
    ("adalora", {"init_r": 2.5}, "init_r=2.5"),                        # truncated to 2 before
    ("expand", {"n_new": "x"}, "method_options.n_new='x'"),
    ("expand", {"n_new": 0}, "method_options.n_new=0"),
    ("expand", {"blocks": "1"}, "method_options.blocks='1'"),
    ("expand", {"lora": "false"}, "method_options.lora='false': must be true or false"),  # read as True before
    ("olora", {"lambda_orth": "nan"}, "lambda_orth='nan'"),
    ("olora", {"past": 3}, "method_options.past=3"),
    ("lora", {"zz": 1}, "takes no method_options"),
])
def test_method_options_are_checked_before_the_output_dir_exists(tmp_path, method, options, msg):
    from lorakit.train import TrainArgs
    from lorakit.train.loop import train

    out = tmp_path / "deep" / "run"
    with pytest.raises(ConfigError, match=msg):
        train(TrainArgs(data="builtin:shift", output_dir=str(out), method=method, method_options=options,
                        max_steps=1, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_before_writing_leaves_no_output_dir(tmp_path):
    from lorakit.train.loop import train

    from fault_helpers import quick_args, tiny_lm_dir, write_rows

    model = tiny_lm_dir(tmp_path / "m")
    data = write_rows(tmp_path / "rows.jsonl", [{"text": "hello"}] * 4)
    out = tmp_path / "runs" / "r1"
    with pytest.raises(lorakit.LorakitError, match="zzz"):  # the targets are known only once the model loads
        train(quick_args(model, data, out, target_modules="zzz"))
    assert not (tmp_path / "runs").exists()  # an empty runs/r1 was left before
    existing = tmp_path / "keep"
    existing.mkdir()
    with pytest.raises(lorakit.LorakitError, match="nope.jsonl"):
        train(quick_args(model, tmp_path / "nope.jsonl", existing))
    assert existing.is_dir()  # a directory the user made stays


# -- the CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_adapter(tmp_path_factory):
    """An adapter on the embedded tiny-base (what `lorakit merge/eval/info` load without --model)."""
    from transformers import AutoModelForCausalLM

    from lorakit.tasks import embedded_model_dir

    net = AutoModelForCausalLM.from_pretrained(embedded_model_dir())
    lorakit.inject(net, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("emb") / "ad"
    lorakit.save_adapter(net, path)
    return path


def _cli(args, capsys):
    from lorakit.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_merge_out_never_replaces_the_adapter(tmp_path, embedded_adapter, capsys, where):
    import shutil

    ad = tmp_path / "work" / "ad"
    shutil.copytree(embedded_adapter, ad)
    out = {"same": ad, "inside": ad / "merged", "parent": tmp_path / "work"}[where]
    files = tree(tmp_path)
    code, err = _cli(["merge", "--adapter", ad, "--out", out], capsys)
    # before: `--out ad` replaced the adapter directory by the merged model (the adapter was deleted)
    assert code == 2 and "overlaps --adapter" in err
    assert tree(tmp_path) == files


def test_merge_out_refuses_a_directory_of_other_files(tmp_path, embedded_adapter, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    code, err = _cli(["merge", "--adapter", embedded_adapter, "--out", out], capsys)
    assert code == 2 and "not a model checkpoint" in err  # was deleted and replaced by the model before
    assert (out / "todo.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("field,value,msg", [
    ("base_model_name_or_path", 3, "base_model_name_or_path=3 must be a path string"),  # TypeError before
])
def test_merge_adapter_config_base_of_the_wrong_type(tmp_path, embedded_adapter, capsys, field, value, msg):
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(embedded_adapter, ad)
    cfg = ad / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), field: value}))
    code, err = _cli(["merge", "--adapter", ad, "--out", tmp_path / "out"], capsys)
    assert code == 2 and msg in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,msg", [("r", "8", "r='8': must be an integer"),
                                             ("target_modules", 3, "target_modules=3")])
def test_info_names_a_broken_config_field(tmp_path, embedded_adapter, capsys, field, value, msg):
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(embedded_adapter, ad)
    cfg = ad / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), field: value}))
    code, err = _cli(["info", ad], capsys)  # printed the broken value as if fine before
    assert code == 2 and msg in err


def test_eval_eval_rows_zero(capsys):
    code, err = _cli(["eval", "--data", "builtin:shift", "--eval-rows", "0"], capsys)
    assert code == 2 and "eval_rows=0 (--eval-rows)" in err  # ValueError: not enough values to unpack


@pytest.mark.parametrize("temperature", [math.inf, "x", True])
def test_generator_temperature_must_be_finite(temperature):
    from lorakit.train.generation import Generator

    with pytest.raises(ConfigError, match="temperature="):  # inf sampled noise; 'x' was a TypeError
        Generator(None, None, 4, temperature)
    with pytest.raises(ConfigError, match="max_new_tokens='4'"):
        Generator(None, None, "4", 0.0)


def test_generate_file_that_is_a_directory_or_binary(tmp_path):
    from lorakit.train.generation import read_prompts

    with pytest.raises(ConfigError, match="is a directory"):  # said "does not exist"
        read_prompts(str(tmp_path))
    f = tmp_path / "p.bin"
    f.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):  # UnicodeDecodeError before
        read_prompts(str(f))


def test_train_recipe_that_is_a_directory_or_binary(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_bytes(b"\xff\xfe\x00lr: 1")
    code, err = _cli(["train", "--config", f, "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "is not UTF-8 text" in err  # UnicodeDecodeError traceback before
    code, err = _cli(["train", "--config", tmp_path, "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "is a directory" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--rows", "--batch-size", "--max-new-tokens"])
def test_distill_data_bad_counts_write_nothing(tmp_path, capsys, flag):
    out = tmp_path / "d.jsonl"
    code, err = _cli(["distill-data", "--data", "builtin:shift", "--out", out, flag, "0"], capsys)
    assert code == 2 and f"{flag} 0: must be ≥ 1" in err
    assert list(tmp_path.iterdir()) == []  # d.source.jsonl was written before


def test_forgetting_lambda_orth_nan_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "f"
    code, err = _cli(["forgetting", "--train", "shift", "--methods", "lora", "--lambda-orth", "nan",
                      "--output-dir", out], capsys)
    assert code == 2 and "--lambda-orth nan" in err and not out.exists()  # was ignored (lora) or refused late


# -- variants and quant helpers -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(lr=math.inf), "lr=inf"), (dict(ratio=math.inf), "ratio=inf"),
    (dict(embedding_lr="x"), "embedding_lr='x'"), (dict(embedding_lr=float("nan")), "embedding_lr=nan"),
    (dict(weight_decay=-1), "weight_decay=-1"), (dict(weight_decay="0.1"), "weight_decay='0.1'"),
])
def test_loraplus_groups_refuse_non_finite_or_negative_settings(kw, msg):
    from lorakit.variants.loraplus import loraplus_param_groups

    with pytest.raises(ConfigError, match=f"loraplus {msg}"):  # accepted before (inf / NaN learning rates)
        loraplus_param_groups(with_adapter(), **{"lr": 1e-3, **kw})


def test_create_loraplus_optimizer_names_a_bad_class_or_option():
    from lorakit.variants.loraplus import create_loraplus_optimizer

    model = with_adapter()
    with pytest.raises(ConfigError, match="optimizer_cls='adam': give a torch.optim.Optimizer class"):
        create_loraplus_optimizer(model, "adam", lr=1e-3)  # 'str' object is not callable before
    with pytest.raises(ConfigError, match=r"AdamW takes no option\(s\) \['betaz'\]"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, betaz=(0.9, 0.99))


def test_expand_arguments_of_the_wrong_shape():
    from lorakit.variants.expand import expand_blocks, expansion_plan, lora_config_for_new_blocks

    model = tiny_llama()
    before = picture(model)
    with pytest.raises(ConfigError, match="blocks=3, outputs=None: give both blocks="):
        expand_blocks(model, 1, blocks=3)
    assert_same(before, picture(model))
    with pytest.raises(ConfigError, match="n_blocks='4': the model's block count"):  # TypeError before
        expansion_plan("4", 1)
    with pytest.raises(ConfigError, match=r"new_layers=\[\]: give the non-empty list"):
        lora_config_for_new_blocks([])  # was a config that adapts every block
    # one output projection given as a string is that projection, not its characters
    new = expand_blocks(model, 1, blocks="model.layers", outputs="mlp.down_proj")
    assert new == [2]


def test_adam8bit_and_kbit_preparation_arguments():
    from lorakit.quant import Adam8bit, load_quantized, prepare_for_kbit_training

    model = tiny_llama()
    for kw, msg in [(dict(lr="1e-3"), "lr='1e-3'"), (dict(lr=math.inf), "lr=inf"), (dict(betas=0.9), "betas=0.9"),
                    (dict(weight_decay=float("nan")), "weight_decay=nan"), (dict(blocksize="256"), "blocksize='256'")]:
        with pytest.raises(ConfigError, match=f"Adam8bit: .*{msg}"):  # TypeError / accepted before
            Adam8bit(model.parameters(), **kw)
    with pytest.raises(ConfigError, match="Adam8bit: no parameters to optimize"):  # torch's ValueError before
        Adam8bit([])
    with pytest.raises(QuantizationError, match="model must be a torch.nn.Module"):  # AttributeError before
        prepare_for_kbit_training(None)
    before = picture(model)
    with pytest.raises(QuantizationError, match="gradient_checkpointing='no'"):
        prepare_for_kbit_training(model, gradient_checkpointing="no")
    assert_same(before, picture(model))
    with pytest.raises(QuantizationError, match="model_dir=None"):  # TypeError before
        load_quantized(None)


# -- image-model configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(dropout="x"), "dropout='x'"), (dict(dropout=None), "dropout=None"),  # ValueError / TypeError before
    (dict(text_encoder="no"), "text_encoder='no': must be true or false"),  # read as True before
    (dict(unet="yes"), "unet='yes'"), (dict(kind="lokr", decompose_both="yes"), "decompose_both='yes'"),
    (dict(kind="lokr", lokr_factor=True), "lokr_factor=True"), (dict(kind=["lora"]), r"kind=\['lora'\]"),
])
def test_diffusion_lora_config_fields(kw, msg):
    from lorakit.diffusion import DiffusionLoraConfig

    with pytest.raises(ConfigError, match=msg):
        DiffusionLoraConfig(**kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(conv_rank="2"), "conv_rank='2'"), (dict(save_every=None), "save_every=None"),  # TypeError before
    (dict(lr="1e-3"), "lr='1e-3'"), (dict(text_encoder_lr=float("nan")), "text_encoder_lr=nan"),
    (dict(text_encoder_lr=-1.0), "text_encoder_lr=-1.0"), (dict(guidance=math.inf), "guidance=inf"),
    (dict(missing_caption="ignore"), "missing_caption='ignore': use error, skip or folder"),
    (dict(buckets="no"), "buckets='no'"), (dict(seed=-1), "seed=-1"), (dict(preview_seeds=["a"]), "preview_seeds"),
])
def test_image_train_args_fields(kw, msg):
    from lorakit.diffusion.train import ImageTrainArgs

    with pytest.raises(ConfigError, match=msg):
        ImageTrainArgs(data="folder", **kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(lora_dropout="0.1"), "lora_dropout='0.1': must be a number"),  # TypeError in `0 <= x` before
    (dict(weight_decay=None), "weight_decay=None: must be a number"),   # TypeError in math.isfinite
    (dict(metric_for_best=[]), r"metric_for_best=\[\]: must be one of 'eval_loss', 'eval_score'"),  # unhashable
    (dict(report_to=3), "report_to=3"),                                   # 'int' object is not iterable
    (dict(use_dora="no"), "use_dora='no': must be true or false"),         # read as True before
    (dict(task="zzz"), "task='zzz': must be one of 'auto', 'causal-lm', 'seq-cls'"),  # accepted before
    (dict(quant="nf3"), "quant='nf3'"), (dict(eval_tasks="copy"), "eval_tasks='copy'"),
    (dict(columns={"instruction": 3}), "columns="), (dict(max_steps=10.0), "max_steps=10.0: must be an integer"),
])
def test_trainargs_field_types_are_checked_on_construction(kw, msg):
    from lorakit.train import TrainArgs

    with pytest.raises(ConfigError, match=f"TrainArgs {msg}"):
        TrainArgs(**kw)


def test_trainargs_keeps_its_documented_conveniences(tmp_path):
    from lorakit.train import TrainArgs

    assert TrainArgs(report_to="csv, tensorboard").report_to == ["csv", "tensorboard"]
    assert TrainArgs(data=tmp_path / "rows.jsonl", lr=1).lr == 1  # a Path and an int where str/float


def test_a_model_directory_without_a_tokenizer(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "m")  # config + weights, no tokenizer files
    (tmp_path / "rows.jsonl").write_text('{"text": "hello"}\n')
    code, err = _cli(["eval", "--data", tmp_path / "rows.jsonl", "--model", tmp_path / "m"], capsys)
    assert code == 2 and "no tokenizer could be loaded" in err  # transformers' ValueError traceback before
    code, err = _cli(["train", "--data", tmp_path / "rows.jsonl", "--model", tmp_path / "m", "--output-dir",
                      tmp_path / "run", "max_steps=1"], capsys)
    assert code == 2 and "no tokenizer could be loaded" in err and not (tmp_path / "run").exists()


def test_forgetting_api_arguments_of_the_wrong_type(tmp_path):
    from lorakit.eval.forgetting import measure_forgetting, parse_method, parse_methods

    for bad in (None, 3):  # AttributeError: no attribute 'strip' before
        with pytest.raises(ConfigError, match=f"method {bad!r}: a method label is a string"):
            parse_method(bad)
    with pytest.raises(ConfigError, match="methods=None"):  # TypeError: not iterable
        parse_methods(None)
    with pytest.raises(ConfigError, match="settings must be a lorakit.eval.forgetting.RunSettings, got dict"):
        measure_forgetting("shift", methods="lora", output_dir=tmp_path / "o", settings={"steps": 1})
    with pytest.raises(ConfigError, match="unknown task 'nope'"):  # keep='nope' was read as ['n', 'o', 'p', 'e']
        measure_forgetting("shift", keep="copy,nope", methods="lora", output_dir=tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method,kw", [("adalora", dict(use_dora=True)), ("adalora", dict(use_rslora=True)),
                                       ("olora", dict(use_dora=True))])
def test_settings_a_method_cannot_use_are_refused_not_ignored(tmp_path, method, kw):
    from lorakit.train import TrainArgs
    from lorakit.train.methods import check_options

    with pytest.raises(ConfigError, match="do not apply|does not apply"):  # DoRA was silently dropped
        check_options(TrainArgs(data="builtin:shift", method=method, output_dir=str(tmp_path / "o"), **kw))
    from lorakit.variants.olora import add_olora

    model = tiny_llama()
    before = picture(model)
    with pytest.raises(ConfigError, match="O-LoRA adapters are plain LoRA factors"):
        add_olora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert_same(before, picture(model))


@pytest.mark.parametrize("kw,msg", [(dict(quantize_head="no"), "quantize_head='no': must be True or False"),
                                    (dict(blocksize=64.0), "blocksize=64.0 is not supported")])
def test_quantize_model_flag_and_blocksize_types(kw, msg):
    model = tiny_llama()
    before = picture(model)
    with pytest.raises(QuantizationError, match=msg):  # the head was quantized / torch's TypeError before
        lorakit.quantize_model(model, "nf4", compute_dtype=torch.float32, **kw)
    assert_same(before, picture(model))


@pytest.mark.parametrize("kw,msg", [(dict(batch_size="8"), "batch_size='8'"), (dict(max_length=None), "max_length=None"),
                                    (dict(generate_rows=1.5), "generate_rows=1.5"), (dict(eval_rows=True), "eval_rows=True")])
def test_evaluate_arguments_of_the_wrong_type(kw, msg):
    from lorakit.cli.commands import evaluate

    with pytest.raises(ConfigError, match=msg):  # TypeError in a comparison before
        evaluate("builtin:shift", **kw)
