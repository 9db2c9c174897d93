"""`lorakit train` with no --model/--data: the embedded tiny-base learns its default new task.

Shortened here (a few steps, few eval rows); the full default run is measured in docs/TRAINING.md.
"""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main


def _embedded_ready() -> bool:
    from lorakit.tasks import embedded_model_dir

    try:
        embedded_model_dir()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _embedded_ready(), reason="the embedded tiny-base checkpoint is not built yet")
def test_default_run_wires_the_embedded_model_task_and_summary(tmp_path, capsys):
    from lorakit.tasks import embedded_manifest

    out = tmp_path / "default"
    assert main(["train", "--output-dir", str(out), "--no-progress", "max_steps=4", "eval_rows=16",
                 "builtin_rows=64", "threads=1"]) == 0
    text = capsys.readouterr().out
    manifest = embedded_manifest()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["embedded"] and metrics["args"]["data"] == f"builtin:{manifest['default_task']}"
    assert metrics["args"]["lr"] == 3e-3 and metrics["args"]["batch_size"] == 32  # the embedded defaults
    assert metrics["tasks"]["new"] == [manifest["default_task"]]
    assert metrics["tasks"]["base"] == manifest["base_tasks"]
    for line in ("parameters", "learning", "forgetting", "memory", "steps"):
        assert f"\n{line}" in text
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
