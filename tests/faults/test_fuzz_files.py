"""Fuzzing what lorakit reads from disk: adapter configs, safetensors headers, checkpoints, data files,
quantized-model indexes. Whatever the bytes, the only outcomes allowed are success or a
``LorakitError`` — and on an error the model is exactly as it was (state dict, tree, flags, adapters).

Each property counts the cases it ran and how many were refused (``COUNTS``, printed at the end with
``-s``), so the closing note of issue 11 can report them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import LorakitError

from fault_helpers import assert_same, picture, tiny_llama

COUNTS: Counter = Counter()
# LORAKIT_FUZZ_SCALE=10 runs ten times the cases with fresh random draws (the default is small, fixed
# and fast enough for every test run).
SCALE = int(os.environ.get("LORAKIT_FUZZ_SCALE", "1"))
FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=SCALE == 1, database=None)

# Any JSON value, small; plus the values the adversarial pass found harmful.
SPECIAL = st.sampled_from([2**31, 10**30, -1, 0, 1.5, "false", "true", 1e30, math.inf, math.nan, [], {}, None,
                           ["q_proj", 3], {"q_proj": "8"}, {"q_proj": 2**31}, "\udcff"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=6) | SPECIAL,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
          "modules_to_save", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern",
          "layers_to_transform", "layers_pattern", "peft_type", "use_dora", "task_type"]


def record(kind: str, outcome: str) -> None:
    COUNTS[f"{kind}: tried"] += 1
    COUNTS[f"{kind}: {outcome}"] += 1


@pytest.fixture(scope="module")
def proto():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "first")
    return model


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    src = tiny_llama(seed=1)
    lorakit.inject(src, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("good") / "adapter"
    lorakit.save_adapter(src, path)
    return path


def try_load(proto, adapter_dir: Path, kind: str) -> str:
    model = copy.deepcopy(proto)
    before = picture(model)
    try:
        lorakit.load_adapter(model, adapter_dir, "fuzzed")
    except LorakitError as exc:
        assert str(exc).strip()
        assert_same(before, picture(model))
        record(kind, "refused")
        return "refused"
    assert "fuzzed" in lorakit.list_adapters(model)
    record(kind, "loaded")
    return "loaded"


# -- adapter_config.json ---------------------------------------------------------------------------
@settings(FAST, max_examples=70 * SCALE)
@given(data=st.data())
def test_fuzz_adapter_config(proto, good_adapter, data):
    cfg = json.loads((good_adapter / "adapter_config.json").read_text())
    shape = data.draw(st.sampled_from(["fields", "fields", "fields", "top-level", "bytes"]))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        shutil.copytree(good_adapter, d)
        if shape == "fields":
            for key in data.draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
                cfg[key] = data.draw(JSON)
            text = json.dumps(cfg, allow_nan=True, ensure_ascii=False)
            (d / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        elif shape == "top-level":
            (d / "adapter_config.json").write_text(json.dumps(data.draw(JSON)))
        else:
            raw = json.dumps(cfg).encode()
            cut = data.draw(st.integers(0, len(raw)))
            junk = data.draw(st.binary(min_size=1, max_size=8))
            (d / "adapter_config.json").write_bytes(raw[:cut] + junk + raw[cut:])
        try_load(proto, d, "adapter config")


# -- adapter_model.safetensors headers -------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "XYZ"]


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@settings(FAST, max_examples=70 * SCALE)
@given(data=st.data())
def test_fuzz_safetensors_header(proto, good_adapter, data):
    raw = (good_adapter / "adapter_model.safetensors").read_bytes()
    header, body = _split(raw)
    keys = [k for k in header if k != "__metadata__"]
    mode = data.draw(st.sampled_from(["dtype", "dtype", "shape", "offsets", "values", "truncate", "header-json"]))
    key = data.draw(st.sampled_from(keys))
    if mode == "dtype":  # relabel without changing bytes (F32 → I32 reinterprets the bits)
        header[key]["dtype"] = data.draw(st.sampled_from(DTYPES))
    elif mode == "shape":
        header[key]["shape"] = data.draw(st.lists(st.integers(0, 2**33), max_size=3) | JSON)
    elif mode == "offsets":
        header[key]["data_offsets"] = data.draw(st.lists(st.integers(-2, len(body) + 64), min_size=0, max_size=3)
                                                | JSON)
    elif mode == "values":  # NaN / inf in the tensor bytes
        start, _ = header[key]["data_offsets"]
        bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        body = body[:start] + struct.pack("<f", bad) + body[start + 4:]
    blob = _join(header, body)
    if mode == "truncate":
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "header-json":
        h = json.dumps(header).encode()
        cut = data.draw(st.integers(0, len(h)))
        h = h[:cut] + data.draw(st.binary(min_size=1, max_size=6)) + h[cut:]
        blob = struct.pack("<Q", len(h)) + h + body
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        shutil.copytree(good_adapter, d)
        (d / "adapter_model.safetensors").write_bytes(blob)
        outcome = try_load(proto, d, f"safetensors {mode}")
    if mode == "values" or (mode == "dtype" and header[key]["dtype"] not in ("F32", "F16", "BF16", "F64")):
        assert outcome == "refused"  # NaN/inf and integer/bool tensors never load


def test_relabelled_integer_and_nan_tensors_are_refused_by_name(proto, good_adapter, tmp_path):
    """The two silent corruptions of the adversarial pass, pinned: I32-relabelled F32 and NaN values."""
    from lorakit.errors import AdapterFileError

    raw = (good_adapter / "adapter_model.safetensors").read_bytes()
    header, body = _split(raw)
    key = sorted(k for k in header if k != "__metadata__")[0]
    d = tmp_path / "a"
    shutil.copytree(good_adapter, d)
    header[key]["dtype"] = "I32"
    (d / "adapter_model.safetensors").write_bytes(_join(header, body))
    with pytest.raises(AdapterFileError, match=r"floating point.*" + key.split(".")[-3]):
        lorakit.load_adapter(copy.deepcopy(proto), d)
    header[key]["dtype"] = "F32"
    start, _ = header[key]["data_offsets"]
    body = body[:start] + struct.pack("<f", math.nan) + body[start + 4:]
    (d / "adapter_model.safetensors").write_bytes(_join(header, body))
    with pytest.raises(AdapterFileError, match="NaN or inf"):
        lorakit.load_adapter(copy.deepcopy(proto), d)


# -- training checkpoints --------------------------------------------------------------------------
def _trainable_model():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from lorakit.train import checkpoint as ckpt

    model = _trainable_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    model(torch.randint(0, 100, (1, 5))).logits.sum().backward()
    opt.step()
    root = tmp_path_factory.mktemp("ckpt")
    return ckpt.save_checkpoint(root, 3, trainable=params, optimizer=opt.state_dict(),
                                schedule={"schedule": "linear", "warmup_steps": 0, "total_steps": 10},
                                hooks=[], rng=[ckpt.rng_state()],
                                state={"history": [], "before": {}, "fingerprint": {"run": 1}})


TENSORS = st.one_of(st.builds(lambda s: torch.zeros(s, dtype=torch.uint8), st.lists(st.integers(0, 3), max_size=2)),
                    st.builds(lambda n: torch.arange(n), st.integers(0, 5)))
PT = st.recursive(JSON.filter(lambda v: not isinstance(v, str) or v.isascii()) | TENSORS,
                  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                      ["python", "numpy", "torch", "state", "param_groups", "params", 0, 1]), inner, max_size=3),
                  max_leaves=5)


@settings(FAST, max_examples=70 * SCALE)
@given(data=st.data())
def test_fuzz_checkpoint_files(checkpoint, data):
    from lorakit.train import checkpoint as ckpt
    from lorakit.train.args import TrainArgs
    from lorakit.train.resume_checks import resume_from

    target = data.draw(st.sampled_from(["trainer_state.json", "trainer_state.json", "rng.pt", "rng.pt",
                                        "optimizer.pt", "optimizer.pt", "hooks.pt", "schedule.json",
                                        "trainable.safetensors"]))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "step-000003"
        shutil.copytree(checkpoint, d)
        f = d / target
        how = data.draw(st.sampled_from(["replace", "truncate"]))
        if target == "trainer_state.json" and how == "replace":
            state = json.loads(f.read_text())
            if data.draw(st.booleans()):
                state = data.draw(JSON)
            else:
                state[data.draw(st.sampled_from(["step", "history", "before", "fingerprint"]))] = data.draw(
                    JSON | st.sampled_from([-5, 10**9, 11]))
            f.write_text(json.dumps(state))
        elif target == "optimizer.pt" and how == "replace" and data.draw(st.booleans()):
            other = tiny_llama(seed=2)  # an optimizer file from another run: other shapes
            lorakit.inject(other, lorakit.LoraConfig(r=3, target_modules=["q_proj"]))
            opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
            other(torch.randint(0, 100, (1, 4))).logits.sum().backward()
            opt.step()
            torch.save(opt.state_dict(), f)
        elif target.endswith(".pt") and how == "replace":
            torch.save(data.draw(PT), f)
        elif how == "replace":
            f.write_bytes(data.draw(st.binary(max_size=40)))
        else:
            raw = f.read_bytes()
            f.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))])
        model = _trainable_model()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        before, rng = picture(model), ckpt.rng_state()
        try:
            resume_from(d, model=model, optimizer=opt, hooks=[], total_steps=10, fingerprint={"run": 1},
                        args=TrainArgs())
        except LorakitError as exc:
            assert str(exc).strip()
            assert_same(before, picture(model))
            assert torch.equal(ckpt.rng_state()["torch"], rng["torch"])
            record(f"checkpoint {target}", "refused")
        else:
            record(f"checkpoint {target}", "resumed")


def test_unmodified_checkpoint_resumes(checkpoint):
    from lorakit.train.args import TrainArgs
    from lorakit.train.resume_checks import resume_from

    model = _trainable_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    state = resume_from(checkpoint, model=model, optimizer=opt, hooks=[], total_steps=10, fingerprint={"run": 1},
                        args=TrainArgs())
    assert state.step == 3


# -- training data files ---------------------------------------------------------------------------
ROWS = st.dictionaries(st.sampled_from(["text", "label", "instruction", "output", "input", "messages"]),
                       JSON | st.text(max_size=10), min_size=1, max_size=3)


@settings(FAST, max_examples=20 * SCALE)
@given(data=st.data())
def test_fuzz_data_files(data):
    from lorakit.data.files import read_data

    suffix = data.draw(st.sampled_from([".jsonl", ".jsonl", ".csv", ".json"]))
    kind = data.draw(st.sampled_from(["rows", "encoding", "bytes"]))
    if kind == "rows":
        rows = data.draw(st.lists(ROWS, min_size=0, max_size=4))
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif kind == "encoding":
        text = '{"text": "caf\u00e9 na\u00efve"}\n{"text": "ok"}\n'
        raw = text.encode(data.draw(st.sampled_from(["utf-16", "utf-16-le", "latin-1", "utf-32", "cp1252"])))
    else:
        raw = data.draw(st.binary(max_size=60))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / f"train{suffix}"
        f.write_bytes(raw)
        try:
            read_data(str(f))
        except LorakitError as exc:
            assert str(f) in str(exc) or "label" in str(exc)
            record(f"data {kind}", "refused")
        else:
            record(f"data {kind}", "read")


def test_utf16_jsonl_is_refused_by_name(tmp_path):
    from lorakit.data.files import read_data
    from lorakit.errors import DataError

    f = tmp_path / "train.jsonl"
    f.write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16.*UTF-8"):
        read_data(str(f))
    f.write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="line 2 is not UTF-8"):
        read_data(str(f))


# -- quantized-model directories -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    tiny_llama().save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@settings(FAST, max_examples=30 * SCALE)
@given(data=st.data())
def test_fuzz_quantized_index(sharded, data):
    from lorakit.quant import load_quantized

    target = data.draw(st.sampled_from(["index", "index", "index-value", "shard", "config"]))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "m"
        shutil.copytree(sharded, d)
        index = d / "model.safetensors.index.json"
        if target == "index":
            index.write_text(json.dumps(data.draw(JSON | st.just([]) | st.builds(lambda m: {"weight_map": m}, JSON))))
        elif target == "index-value":
            doc = json.loads(index.read_text())
            key = data.draw(st.sampled_from(sorted(doc["weight_map"])))
            doc["weight_map"][key] = data.draw(JSON | st.sampled_from(["../../etc/passwd", "/etc/passwd",
                                                                       "missing.safetensors", "."]))
            index.write_text(json.dumps(doc))
        elif target == "shard":
            shard = sorted(d.glob("model-*.safetensors"))[data.draw(st.integers(0, 1))]
            raw = shard.read_bytes()
            shard.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        else:
            raw = (d / "config.json").read_bytes()
            (d / "config.json").write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        try:
            load_quantized(d, compute_dtype=torch.float32)
        except LorakitError as exc:
            assert str(exc).strip()
            record(f"quantized {target}", "refused")
        else:
            record(f"quantized {target}", "loaded")


def test_weight_map_path_traversal_is_refused(sharded, tmp_path):
    from lorakit.errors import QuantizationError
    from lorakit.quant import load_quantized

    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    doc = json.loads((d / "model.safetensors.index.json").read_text())
    doc["weight_map"][sorted(doc["weight_map"])[0]] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(QuantizationError, match="outside"):
        load_quantized(d, compute_dtype=torch.float32)


def test_print_counts():
    """Runs last in this file: the tally for the report (visible with -s)."""
    for key in sorted(COUNTS):
        print(f"{key}: {COUNTS[key]}")
