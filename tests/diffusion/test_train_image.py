"""``lorakit train-image`` on a synthetic shapes set with the tiny random-init model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.cli import main
from lorakit.diffusion import load_kohya
from lorakit.diffusion.data import scan
from lorakit.diffusion.models import tiny_model
from lorakit.diffusion.synthetic import write_shapes
from lorakit.diffusion.train import ImageTrainArgs, train_image
from lorakit.errors import ConfigError, DataError

pytest.importorskip("diffusers")


def _args(data, out, **kw):
    base = dict(data=str(data), output_dir=str(out), steps=25, lr=5e-3, batch_size=2, preview_steps=2,
                preview_seeds=[1], rank=4, alpha=4.0)
    base.update(kw)
    return ImageTrainArgs(**base)


@pytest.mark.slow  # ~25 training steps with previews: tens of seconds on 2 shared cores
def test_lora_lowers_denoising_loss_and_changes_previews(tmp_path):
    data = write_shapes(tmp_path / "data", count=4, colours=("red",))
    res = train_image(_args(data, tmp_path / "run", text_encoder=True, conv_rank=2), log=lambda *_: None)
    assert res.eval_adapted < 0.9 * res.eval_base, (res.eval_base, res.eval_adapted)
    first, last = (np.asarray(Image.open(p), dtype=np.int16) for p in (res.previews[0], res.previews[-1]))
    assert first.shape == last.shape == (2 * 32, 32, 3)  # 2 prompts × 1 seed
    assert np.abs(first - last).mean() > 1.0
    for name in ("loss.png", "loss.csv", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    # the kohya file gives a fresh tiny model the trained behaviour
    fresh = tiny_model(0)
    load_kohya(fresh.components(), res.output, "x")
    from safetensors import safe_open

    with safe_open(str(res.output), "pt") as f:
        meta = f.metadata()
        assert any(k.startswith("lora_te_text_model_encoder") for k in f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "25"


@pytest.mark.slow
def test_resume_gives_the_same_adapter(tmp_path):
    data = write_shapes(tmp_path / "data", count=3)
    quiet = dict(log=lambda *_: None)
    full = train_image(_args(data, tmp_path / "a", steps=6), **quiet)
    train_image(_args(data, tmp_path / "b", steps=3), **quiet)
    resumed = train_image(_args(data, tmp_path / "b", steps=6, resume=True), **quiet)
    from safetensors.torch import load_file

    a, b = load_file(full.output), load_file(resumed.output)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert full.losses == pytest.approx(resumed.losses, abs=1e-6)


def test_bad_images_and_captions(tmp_path):
    data = write_shapes(tmp_path / "data", count=2)
    folder = data / "2_shapes"
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("a broken image")
    with pytest.raises(DataError, match=r"broken\.png: cannot be read as an image"):
        train_image(_args(data, tmp_path / "r", steps=1), log=lambda *_: None)
    (folder / "broken.png").unlink()
    Image.new("RGB", (40, 30), "red").save(folder / "nocap.png")
    with pytest.raises(DataError, match=r"nocap\.png: no caption file nocap\.txt"):
        scan(data)
    ds = scan(data, missing_caption="skip")
    assert [p.name for p in ds.skipped] == ["nocap.png"] and len(ds.items) == 2
    assert [it.caption for it in scan(data, missing_caption="folder").items if it.image.name == "nocap.png"] == ["shapes"]
    (data / "notrepeats").mkdir()
    with pytest.raises(DataError, match=r"notrepeats: subfolders must be named N_name"):
        scan(data)
    with pytest.raises(ConfigError, match="kind='lorax'"):
        ImageTrainArgs(data=str(data), kind="lorax")


def test_cli_train_image_with_buckets(tmp_path, capsys):
    data = write_shapes(tmp_path / "data", count=2)
    Image.new("RGB", (48, 24), "blue").save(data / "wide.png")
    (data / "wide.txt").write_text("a blue band")
    out = tmp_path / "cli"
    rc = main(["train-image", "--data", str(data), "--output-dir", str(out), "steps=2", "preview_steps=1",
               "--buckets", "--format", "diffusers"])
    assert rc == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "denoising loss" in capsys.readouterr().out
    rc = main(["train-image", "--data", str(tmp_path / "nope"), "--output-dir", str(out)])
    assert rc == 2 and "nope: not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("kind,prefix", [("loha", "hada_w1_a"), ("lokr", "lokr_w")])
def test_train_lycoris_kinds_write_lycoris_keys(tmp_path, kind, prefix):
    data = write_shapes(tmp_path / "data", count=2)
    res = train_image(_args(data, tmp_path / kind, steps=2, kind=kind, conv_rank=2, preview_steps=1),
                      log=lambda *_: None)
    from safetensors import safe_open

    with safe_open(str(res.output), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(f".{prefix}" in k for k in keys) and meta["ss_network_module"] == "lycoris.kohya"
    assert kind in meta["ss_network_args"]
    fresh = tiny_model(0)
    load_kohya(fresh.components(), res.output, "x")
