"""The forgetting probe's last measurement reaches metrics.json and the printed summary, so a
real-model run (which has no built-in tasks to score) still prints what it forgot."""

from __future__ import annotations

import csv
import json

from lorakit.train import train

from .train_helpers import quick_args, write_rows


def test_the_summary_prints_the_probe_last_kl_and_agreement(tiny_lm, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"capital of land{i}?"},
                          {"role": "assistant", "content": f"city{i}"}]} for i in range(16)]
    res = train(quick_args(tiny_lm, write_rows(tmp_path / "chat.jsonl", rows), tmp_path / "run", probe_every=2,
                           probe_rows=2, self_replay_prompts=3, max_steps=4))
    metrics = json.loads((res.output_dir / "metrics.json").read_text())
    log = [r for r in csv.DictReader((res.output_dir / "log.csv").open()) if r.get("probe_kl")]
    assert metrics["probe"]["step"] == int(log[-1]["step"]) == 4
    assert metrics["probe"]["probe_kl"] == float(log[-1]["probe_kl"])
    assert metrics["probe"]["probe_agree"] == float(log[-1]["probe_agree"])
    assert metrics["probe"]["rows"] == 2
    out = capsys.readouterr().out
    assert f"forgetting   probe at step 4: KL to the base {metrics['probe']['probe_kl']:.4f}" in out


def test_no_probe_no_probe_line(tiny_lm, tmp_path, capsys):
    rows = [{"instruction": f"capital of land{i}?", "output": f"city{i}"} for i in range(8)]
    res = train(quick_args(tiny_lm, write_rows(tmp_path / "d.jsonl", rows), tmp_path / "run", max_steps=1))
    assert "probe" not in json.loads((res.output_dir / "metrics.json").read_text())
    assert "forgetting   probe" not in capsys.readouterr().out
