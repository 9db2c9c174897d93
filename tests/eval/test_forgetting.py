"""Forgetting metrics against hand computations, method specs, the Pareto front, the report files,
and the harness / CLI end to end on a tiny random model (a few steps)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.eval.continual import (
    LoadAdapterHook,
    SequenceResult,
    matrix_table,
    run_multitask,
    run_sequence,
    summary_table,
)
from lorakit.eval.forgetting import (
    ForgettingRow,
    RunSettings,
    average_accuracy,
    backward_transfer,
    drops,
    mean_forgetting,
    measure_forgetting,
    pareto_front,
    parse_method,
    parse_methods,
    relative_forgetting,
    write_report,
)
from lorakit.tasks import build_tokenizer
from lorakit.train.hooks import HookContext

from conftest import tiny_llama

BEFORE = {"shift": 0.0, "copy": 0.80, "rev": 0.50, "add": 0.0}
AFTER = {"shift": 0.90, "copy": 0.60, "rev": 0.55, "add": 0.10}


def test_single_run_metrics_by_hand():
    keep = ["copy", "rev", "add"]
    assert drops(BEFORE, AFTER, keep) == pytest.approx({"copy": 0.20, "rev": -0.05, "add": -0.10})
    assert mean_forgetting(BEFORE, AFTER, keep) == pytest.approx((0.20 - 0.05 - 0.10) / 3)
    # Luo et al.: (R_o − R_f) / R_o averaged over kept tasks with R_o > 0 ("add" starts at 0: left out)
    assert relative_forgetting(BEFORE, AFTER, keep) == pytest.approx(100 * (0.20 / 0.80 + -0.05 / 0.50) / 2)
    assert math.isnan(relative_forgetting(BEFORE, AFTER, ["add"]))
    row = ForgettingRow("lora-r4", "shift", BEFORE, AFTER, ["copy", "rev"], trainable_params=10)
    assert row.learning == pytest.approx(0.90)
    assert row.forgetting == pytest.approx(0.075)
    d = row.as_dict()
    assert d["relative_forgetting_pct"] == pytest.approx(7.5) and d["keep_copy_after"] == 0.60
    with pytest.raises(ConfigError, match="no before/after score"):
        drops(BEFORE, AFTER, ["sort"])


def test_sequence_metrics_by_hand():
    acc = [[0.9, 0.0, 0.1],
           [0.5, 0.8, 0.0],
           [0.3, 0.6, 0.7]]
    assert average_accuracy(acc) == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert backward_transfer(acc) == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert backward_transfer([[0.5]]) == 0.0
    with pytest.raises(ConfigError, match="T×T"):
        average_accuracy([[0.1, 0.2]])
    tasks = ["a", "b", "c"]
    res = SequenceResult("m", tasks, ["k"], {"a": 0, "b": 0, "c": 0, "k": 0.5},
                         [dict(zip(tasks, row), k=0.25) for row in acc], 5, 60.0)
    assert res.acc == acc and res.backward_transfer == pytest.approx(-0.4)
    assert res.keep_relative_forgetting == pytest.approx(50.0)
    table = summary_table([res])
    assert "| m | 5 | 53.3 | -40.0 | 50.0 → 25.0 | 50.0 | 1.0 |" in table
    assert matrix_table(res).splitlines()[2] == "| (start) | 0 | 0 | 0 | 50 |"


def test_method_specs():
    assert parse_method("full").method == "full" and parse_method("full").dense
    s = parse_method("lora-r16")
    assert (s.method, s.r, s.distill, s.dense) == ("lora", 16, False, False)
    s = parse_method("expand-2")
    assert s.method == "expand" and dict(s.options) == {"n_new": 2} and not s.dense
    s = parse_method("expand-4-lora-r2")
    assert dict(s.options) == {"n_new": 4, "lora": True} and s.r == 2 and not s.dense
    s = parse_method("sdft-lora-r8")
    assert s.distill and s.method == "lora" and s.r == 8
    assert parse_method("sdft").method == "lora" and parse_method("olora-r4").r == 4
    for bad in ("lora-x", "lorra", "full-r4", "lora-r0", "expand-two"):
        with pytest.raises(ConfigError, match="not understood"):
            parse_method(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("full,full")
    with pytest.raises(ConfigError, match="no methods"):
        parse_methods(" , ")


def test_pareto_front():
    pts = [("full", 0.30, 0.95), ("lora-r4", 0.05, 0.60), ("lora-r16", 0.10, 0.80), ("bad", 0.20, 0.50),
           ("same", 0.05, 0.60)]
    assert set(pareto_front(pts)) == {"full", "lora-r4", "lora-r16", "same"}


def test_report_files(tmp_path):
    rows = [ForgettingRow("full", "shift", BEFORE, AFTER, ["copy", "rev"], 100, 1.0),
            ForgettingRow("lora-r4", "shift", BEFORE, {**AFTER, "copy": 0.8}, ["copy", "rev"], 10, 1.0)]
    files = write_report(rows, tmp_path, "t")
    md = files["markdown"].read_text()
    assert "| full | 100 | 0.0 → 90.0 | +90.0 | +7.5 | 7.5 | 60.0 | 55.0 |" in md
    assert files["csv"].read_text().splitlines()[0].startswith("method,target,trainable_params")
    assert json.loads(files["json"].read_text())[1]["method"] == "lora-r4"
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the embedded character tokenizer, saved like a checkpoint."""
    path = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_harness_end_to_end(model_dir, tmp_path):
    settings = RunSettings(model=str(model_dir), steps=2, builtin_rows=16, eval_rows=8, batch_size=8,
                           warmup_steps=0, threads=1)
    report = measure_forgetting("shift", ["copy", "rev"], "full,lora-r2", tmp_path, settings, say=lambda *a: None)
    assert [r.method for r in report.rows] == ["full", "lora-r2"]
    assert report.rows[0].trainable_params > report.rows[1].trainable_params > 0
    assert all(set(r.after) == {"shift", "copy", "rev"} for r in report.rows)
    assert (tmp_path / "runs" / "lora-r2" / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in report.files.values()} == {"forgetting.md", "forgetting.csv", "forgetting.json",
                                                       "pareto.png"}


def test_harness_bad_input(model_dir, tmp_path):
    settings = RunSettings(model=str(model_dir))
    with pytest.raises(ConfigError, match="unknown task"):
        measure_forgetting("shfit", ["copy"], "lora", tmp_path, settings)
    with pytest.raises(ConfigError, match="both the training task and a kept task"):
        measure_forgetting("shift", ["shift"], "lora", tmp_path, settings)
    with pytest.raises(ConfigError, match="no kept tasks"):
        measure_forgetting("shift", None, "lora", tmp_path, settings)  # this model has no manifest


def _parser():
    from lorakit.cli.forgetting import add_subcommands

    parser = argparse.ArgumentParser(prog="lorakit")
    add_subcommands(parser.add_subparsers(dest="command"))
    return parser


def test_cli_distill_data(model_dir, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    ns = _parser().parse_args(["distill-data", "--model", str(model_dir), "--data", "builtin:rev", "--rows", "5",
                               "--out", str(out), "--max-new-tokens", "4"])
    assert ns.run(ns) == 0
    assert len(out.read_text().splitlines()) == 5
    assert json.loads((tmp_path / "d.jsonl.counts.json").read_text())["rows"] == 5
    assert "5 rows" in capsys.readouterr().out
    ns = _parser().parse_args(["distill-data", "--data", "x.jsonl", "--out", "y", "--check", "nomodule"])
    with pytest.raises(LorakitError, match="module:function"):
        ns.run(ns)


@pytest.mark.parametrize("method", ["full", "lora-r2", "olora-r2", "expand-1", "sdft-lora-r2"])
def test_sequences_chain_their_stages(method, model_dir, tmp_path):
    settings = RunSettings(model=str(model_dir), steps=2, builtin_rows=16, eval_rows=8, batch_size=8,
                           warmup_steps=0, threads=1)
    res = run_sequence(method, ["shift", "max"], ["copy"], tmp_path, settings, say=lambda *a: None)
    assert len(res.stages) == 2 and set(res.stages[1]) == {"shift", "max", "copy"}
    assert res.backward_transfer is not None and 0 <= res.average_accuracy <= 1
    stage2 = json.loads((tmp_path / "stage-2-max" / "metrics.json").read_text())
    if method == "olora-r2":  # the second task trained against the first task's frozen factors
        cfg = json.loads((tmp_path / "stage-2-max" / "adapter" / "adapter_config.json").read_text())
        assert cfg["r"] == 4
        assert stage2["args"]["method_options"]["past"].endswith("stage-1-shift/adapter")
    if method == "expand-1":
        assert res.extra["new_blocks"] == [2]
        assert stage2["args"]["method_options"] == {"blocks": [2]}
        assert json.loads((tmp_path / "stage-2-max" / "model" / "config.json").read_text())["num_hidden_layers"] == 3
    if method == "full":
        assert stage2["run"]["model"].endswith("stage-1-shift/model")
    if method == "sdft-lora-r2":
        assert res.extra["sdft_rows"] == 16 and len(res.extra["sdft_replaced"]) == 2
    if method == "lora-r2":
        multi = run_multitask(method, ["shift", "max"], ["copy"], tmp_path / "mt", settings, say=lambda *a: None)
        assert len(multi.stages) == 1 and multi.backward_transfer is None
        assert len((tmp_path / "mt" / "multitask.jsonl").read_text().splitlines()) == 32


def test_seq_lora_hook_copies_the_previous_adapter_once(tmp_path, ids):
    src = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(src, tmp_path / "a")
    dst = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    hook = LoadAdapterHook(tmp_path / "a")
    ctx = HookContext(model=dst, optimizer=None, step=0, total_steps=1)
    hook.on_train_start(ctx)
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src(ids).logits)
    resumed = LoadAdapterHook(tmp_path / "a")
    resumed.load_state_dict(hook.state_dict())
    fresh = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    resumed.on_train_start(HookContext(model=fresh, optimizer=None, step=0, total_steps=1))
    assert all(not p.any() for n, p in fresh.named_parameters() if n.endswith("lora_B"))  # not overwritten
