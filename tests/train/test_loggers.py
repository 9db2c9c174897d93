"""Issue 17 item 6 · MLflow and W&B (offline) loggers, read back with the libraries' own readers and
compared with what ``train()`` returned."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.train import TrainArgs, train
from lorakit.train.hooks import BaseHook

from .train_helpers import quick_args, write_rows

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is not installed (pip install mlflow-skinny)")
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install wandb)")

ROWS = [{"instruction": f"rev {w}", "output": w[::-1]} for w in ("abc", "hello", "lorakit", "xyz", "train", "qq")]


@pytest.fixture
def data(tmp_path):
    return write_rows(tmp_path / "train.jsonl", ROWS), write_rows(tmp_path / "dev.jsonl", ROWS[:3])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def _mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    return client, run


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# -- the .wandb transaction log: LevelDB log framing around wandb's own protobuf `Record`s ---------------
def _wandb_records(path: Path):
    """wandb ≥ 0.2x ships no Python reader for its run file; the framing is LevelDB's log format (a
    7-byte ':W&B' header, 32 KiB blocks, records = crc32 · length · type · data, split FIRST/MIDDLE/LAST
    across blocks), the payload wandb's ``wandb_internal_pb2.Record`` which parses it."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += data
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_read(out: Path) -> dict:
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary, config, exit_code = [], {}, {}, None
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return {"history": history, "summary": summary, "config": config, "exit_code": exit_code}


# -- tests ------------------------------------------------------------------------------------------------
def test_report_to_is_validated():
    with pytest.raises(ConfigError, match="report_to='neptune'.*mlflow"):
        TrainArgs(report_to=["csv", "neptune"])
    assert TrainArgs(report_to="csv, mlflow").report_to == ["csv", "mlflow"]


@pytest.mark.parametrize("name,pip", [("mlflow", "pip install mlflow-skinny"), ("wandb", "pip install wandb")])
def test_missing_library_fails_before_training(tiny_lm, data, tmp_path, monkeypatch, name, pip):
    monkeypatch.setitem(sys.modules, name, None)  # import mlflow → ImportError, find_spec → None
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"report_to={name}.*{pip}"):
        train(quick_args(tiny_lm, data[0], out, report_to=["csv", name]))
    assert not (out / "log.csv").exists() and not (out / "adapter").exists()


@pytest.mark.slow
@needs_mlflow
@needs_wandb
def test_mlflow_and_wandb_hold_what_train_returned(tiny_lm, data, tmp_path):
    out = tmp_path / "run"
    args = quick_args(tiny_lm, data[0], out, eval_data=str(data[1]), max_steps=3, eval_every=2,
                      report_to=["csv", "mlflow", "wandb"], method_options={})
    m = train(args).metrics
    losses = [m["loss"]["first"], m["loss"]["last"], m["loss"]["min"]]

    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["lr"] == str(args.lr) and params["r"] == "4" and params["report_to"] == "csv,mlflow,wandb"
    loss = _history(client, run.info.run_id, "loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [loss[0][1], loss[-1][1], min(v for _, v in loss)] == pytest.approx(losses, rel=1e-12)
    ev = _history(client, run.info.run_id, "eval_loss")
    assert ev[0] == (0, pytest.approx(m["eval"]["before"]["loss"], rel=1e-12))
    assert ev[-1] == (3, pytest.approx(m["eval"]["after"]["loss"], rel=1e-12))
    assert 2 in [s for s, _ in ev]  # eval_every=2
    assert run.data.metrics["summary.time.train_seconds"] == pytest.approx(m["time"]["train_seconds"])
    assert run.data.metrics["summary.parameters.trainable"] == m["parameters"]["trainable"]
    artifacts = [f.path for f in client.list_artifacts(run.info.run_id)]
    assert "metrics.json" in artifacts

    wb = _wandb_read(out)
    assert wb["exit_code"] == 0
    assert wb["config"]["lr"] == args.lr and wb["config"]["report_to"] == ["csv", "mlflow", "wandb"]
    steps = {row["_step"]: row for row in wb["history"]}
    assert [steps[s]["loss"] for s in (1, 3)] == pytest.approx([losses[0], losses[1]], rel=1e-12)
    assert steps[0]["eval_loss"] == pytest.approx(m["eval"]["before"]["loss"], rel=1e-12)
    assert steps[3]["eval_loss"] == pytest.approx(m["eval"]["after"]["loss"], rel=1e-12)
    assert wb["summary"]["summary.loss.min"] == pytest.approx(losses[2], rel=1e-12)
    assert wb["summary"]["summary.eval.after.accuracy"] == pytest.approx(m["eval"]["after"]["accuracy"])


class _Boom(BaseHook):
    def after_step(self, ctx):
        if ctx.step == 1:
            raise RuntimeError("boom in step 2, before it is logged")


@pytest.mark.slow
@needs_mlflow
@needs_wandb
def test_a_failed_run_is_closed_as_failed(tiny_lm, data, tmp_path):
    import os

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        train(quick_args(tiny_lm, data[0], out, max_steps=4, report_to=["mlflow", "wandb"]), hooks=[_Boom()])
    client, run = _mlflow_run(out)
    assert run.info.status == "FAILED"
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [1]
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the opt-in lasted as long as the run
    wb = _wandb_read(out)
    assert wb["exit_code"] == 1
    assert [r["_step"] for r in wb["history"] if "loss" in r] == [1]
    # TensorBoard was not asked for
    assert not (out / "tensorboard").exists()


class _Term(BaseHook):
    def after_step(self, ctx):
        if ctx.step == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops after this step, saves, and returns


@needs_mlflow
def test_an_interrupted_run_is_closed_as_killed(tiny_lm, data, tmp_path):
    out = tmp_path / "run"
    result = train(quick_args(tiny_lm, data[0], out, max_steps=4, report_to=["mlflow"]), hooks=[_Term()])
    assert result.interrupted and result.steps_done == 1
    client, run = _mlflow_run(out)
    assert run.info.status == "KILLED"
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [1]
