"""Strict types and bounds: the silent misreadings of the adversarial pass, pinned one by one."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import AdapterStateError, ConfigError, DataError, OutputError

from fault_helpers import tiny_llama


@pytest.mark.parametrize("field,value", [
    ("use_rslora", "false"), ("use_rslora", 1.5), ("use_rslora", 1), ("fan_in_fan_out", "true"),
    ("r", 2**31), ("r", 10**30), ("r", 1e30), ("r", 8.0), ("r", True), ("lora_alpha", float("nan")),
    ("lora_alpha", "16"), ("lora_dropout", "0.1"), ("lora_dropout", [0.1]), ("rank_pattern", {"q_proj": "8"}),
    ("rank_pattern", {"q_proj": 2**31}), ("rank_pattern", [1, 2]), ("alpha_pattern", {3: 8}),
    ("modules_to_save", 5), ("modules_to_save", ["lm_head", 3]), ("layers_to_transform", [0, "1"]),
    ("layers_to_transform", 1.5), ("layers_pattern", [3]), ("init_lora_weights", 1), ("init_lora_weights", 1.5),
    ("target_modules", {"q_proj": 1}), ("target_modules", 7), ("bias", ["none"]), ("task_type", 3),
])
def test_wrong_types_and_bounds_are_config_errors_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field.split("_pattern")[0]):
        lorakit.LoraConfig(**{"target_modules": ["q_proj"], field: value})


def test_from_peft_dict_refuses_non_objects_and_names_the_file():
    for data in ([], None, "x", 3):
        with pytest.raises(ConfigError, match="adapter_config.json"):
            lorakit.LoraConfig.from_peft_dict(data)
    with pytest.raises(ConfigError, match=r"adapter_config\.json.*use_rslora"):
        lorakit.LoraConfig.from_peft_dict({"target_modules": ["q_proj"], "use_rslora": "false"})


def test_huge_rank_in_a_file_is_refused_before_allocation(tmp_path):
    import json

    from lorakit.errors import AdapterFileError

    src = tiny_llama()
    lorakit.inject(src, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["r"] = 60000  # within the bound, but not the file's rank: refused before 60000-row factors exist
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="config rank 60000, file rank 4"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "a")


def test_safe_merge_checks_in_the_base_dtype():
    model = tiny_llama().half()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    host = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        host.base_layer.weight.fill_(60000.0)  # near fp16's max (65504)
        host.lora["default"].lora_A.fill_(60.0)
        host.lora["default"].lora_B.fill_(60.0)  # ΔW = (8/2)·2·60·60 = 28800: 88800 overflows fp16, not fp32
    before = host.base_layer.weight.clone()
    assert torch.isfinite(before.float() + host.delta("default")).all()  # fp32 would let it through
    with pytest.raises(AdapterStateError, match="inf/NaN"):
        lorakit.merge(model, safe_merge=True)
    assert torch.equal(host.base_layer.weight, before)


def test_label_ids_are_bounded_before_allocation():
    from lorakit.data.encode import label_mapping

    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 10**9}]
    with pytest.raises(DataError, match=r"row 2: label 1000000000"):
        label_mapping(rows)


def test_atomic_dir_keeps_the_previous_directory_on_failure(tmp_path):
    from lorakit._fs import atomic_dir

    out = tmp_path / "merged"
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise KeyboardInterrupt
    assert (out / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    with pytest.raises(OutputError, match="No space left"):
        with atomic_dir(out) as tmp:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                               "data/0: No space left on device")
    assert (out / "model.safetensors").read_text() == "v1"
