"""The command line's parsing: flags, YAML recipes and key=value overrides all come from TrainArgs."""

from __future__ import annotations

import pytest

from lorakit.cli import build_parser, main
from lorakit.cli.options import build, coerce, load_yaml, parse_overrides
from lorakit.errors import ConfigError
from lorakit.train.args import EMBEDDED_DEFAULTS, TrainArgs


def test_every_trainargs_field_is_a_flag():
    import dataclasses

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {opt for a in train._actions for opt in a.option_strings}
    for f in dataclasses.fields(TrainArgs):
        assert "--" + f.name.replace("_", "-") in flags


def test_precedence_defaults_recipe_flags_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e-3\nr: 4\nbatch_size: 2\ntarget_modules: [q_proj, v_proj]\n")
    args = build(TrainArgs, ("demo", EMBEDDED_DEFAULTS), ("recipe", load_yaml(recipe)),
                 ("flags", {"r": "16"}), ("overrides", parse_overrides(["r=32", "lora_dropout=0.1"])))
    assert args.lr == 1e-3 and args.batch_size == 2  # recipe over the embedded defaults
    assert args.r == 32  # key=value over the flag over the recipe
    assert args.lora_dropout == 0.1
    assert args.target_modules == ["q_proj", "v_proj"]
    assert args.max_steps == EMBEDDED_DEFAULTS["max_steps"]


def test_values_are_coerced_from_strings():
    args = build(TrainArgs, ("cli", {"lr": "1e-4", "bf16": "true", "max_steps": "none", "target_modules": "q_proj,v_proj",
                                     "exclude_modules": "o_proj", "schedule": "cosine"}))
    assert args.lr == 1e-4 and args.bf16 is True and args.max_steps is None
    assert args.target_modules == ["q_proj", "v_proj"] and args.exclude_modules == ["o_proj"]
    assert build(TrainArgs, ("cli", {"target_modules": "all-linear"})).target_modules == "all-linear"


def test_method_options_take_dotted_keys():
    args = build(TrainArgs, ("cli", parse_overrides(["method_options.target_r=4", "method_options.tinit=10"])))
    assert args.method_options == {"target_r": 4, "tinit": 10}


def test_unknown_key_names_the_closest_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*recipe") as exc:
        build(TrainArgs, ("recipe x.yaml", {"learning_rat": 1}))
    with pytest.raises(ConfigError, match=r"'lora_alpha'"):
        build(TrainArgs, ("key=value arguments", {"lora_alfa": "3"}))
    assert "Valid keys" in str(exc.value)


@pytest.mark.parametrize("key,value,msg", [
    ("lr", "fast", "must be a number"),
    ("r", "0", "must be an integer ≥ 1"),
    ("schedule", "cosin", "Did you mean 'cosine'"),
    ("bf16", "maybe", "true or false"),
    ("lora_dropout", "1.5", r"\[0, 1\)"),
])
def test_bad_values_are_config_errors(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        build(TrainArgs, ("cli", {key: value}))


def test_coerce_rejects_fractional_ints():
    with pytest.raises(ConfigError):
        coerce("1.5", int, "r")


def test_bad_recipe_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "must be a mapping" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_cli_errors_exit_2_with_one_message(capsys):
    assert main(["train", "lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error: lr=-1.0") and "Traceback" not in err
    assert main(["train", "notakeyvalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unknown_method_is_reported(tmp_path, capsys):
    from lorakit.train import methods

    with pytest.raises(ConfigError, match="method 'dora' is not available.*lora, loraplus"):
        methods.get("dora")
    assert {"lora", "loraplus", "full", "adalora", "olora"} <= set(methods.available())


def test_flags_and_key_values_interleave(monkeypatch):
    import lorakit.cli.app as cli

    seen = {}
    monkeypatch.setattr(cli, "train_command", lambda config, flags, overrides: seen.update(
        config=config, flags=flags, overrides=overrides) or 0)
    assert cli.main(["train", "lr=1e-3", "--r", "4", "seed=3", "--no-progress"]) == 0
    assert seen["flags"] == {"r": "4", "progress": False} and seen["overrides"] == ["lr=1e-3", "seed=3"]


def test_every_shipped_recipe_builds(tmp_path):
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        args = build(TrainArgs, (str(recipe), load_yaml(recipe)))
        assert args.output_dir.startswith("runs/")


def test_default_recipe_is_the_no_argument_run():
    from pathlib import Path

    recipe = load_yaml(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml")
    for key, value in EMBEDDED_DEFAULTS.items():
        assert recipe[key] == value, key
