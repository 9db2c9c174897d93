"""Rehearsal against forgetting: replayed rows mixed into the training data."""

from __future__ import annotations

import collections

import pytest

from lorakit import tasks
from lorakit.errors import ConfigError
from lorakit.train.args import TrainArgs
from lorakit.train.setup import load_data, resolve_defaults


def test_replay_mixes_the_embedded_base_tasks_in_equal_parts():
    args = resolve_defaults(TrainArgs(replay=0.25, builtin_rows=60))
    train, _ = load_data(args)
    assert len(train.rows) == 60 + 20  # 20 / 80 = 0.25
    by_instruction = collections.Counter(r["instruction"] for r in train.rows)
    base = tasks.embedded_manifest()["base_tasks"]
    assert {tasks.get(t).instruction: by_instruction[tasks.get(t).instruction] for t in base} == {
        tasks.get(t).instruction: 5 for t in base}
    assert "replayed" in train.source
    again, _ = load_data(args)
    assert again.rows == train.rows  # seeded


def test_replay_from_a_file(tmp_path):
    path = tasks.write_jsonl(tasks.get("copy"), tmp_path / "keep.jsonl", n=10)
    train, _ = load_data(resolve_defaults(TrainArgs(replay=0.5, builtin_rows=30, replay_data=str(path))))
    assert len(train.rows) == 60
    assert sum(r["instruction"] == tasks.get("copy").instruction for r in train.rows) == 30  # drawn with repeats


@pytest.mark.parametrize("value", [1.0, -0.1, True])
def test_bad_replay_fraction(value):
    with pytest.raises(ConfigError, match="replay="):
        TrainArgs(replay=value)


def test_replay_with_another_model_needs_replay_data(tmp_path):
    path = tasks.write_jsonl(tasks.get("shift"), tmp_path / "t.jsonl", n=10)
    with pytest.raises(ConfigError, match="replay_data=FILE"):
        load_data(TrainArgs(model="some/model", data=str(path), replay=0.2))
