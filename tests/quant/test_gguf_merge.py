"""Merging a LoRA adapter into its base GGUF (``lorakit merge --format gguf``): the merged file read back
with gguf's own reader and dequantizer against the textbook merge written here (base dequantized by
gguf + scale · B @ A, with llama.cpp's q/k permutation from gguf_helpers), transformers' loading of the
merged file against lorakit's adapted model, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf_helpers import HEADS, KV_HEADS, gguf, permute_qk, tiny_llama_model, write_tiny_gguf
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError, LorakitError, QuantizationError
from lorakit.quant.gguf_load import load_gguf
from lorakit.quant.gguf_merge import merge_gguf

PERMUTED = {"attn_q": HEADS, "attn_k": KV_HEADS}
HF_OF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def make_adapter(tmp_path, base_path, config: lorakit.LoraConfig, seed=0, name="adapter"):
    model = lorakit.inject(load_gguf(base_path), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path / name
    lorakit.save_adapter(model, out)
    return model, out


def read_gguf(path):
    """{name: (type name, fp32 array in numpy (rows, cols) order, raw bytes)} and the metadata."""
    r = gguf.GGUFReader(str(path))
    tensors = {}
    for t in r.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]
        deq = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape)
        tensors[t.name] = (t.tensor_type.name, deq.astype(np.float32), np.array(t.data).tobytes())
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, tensors


def expected_merge(base_path, adapter, scale_of):
    """Textbook: W' = gguf-dequantized base (file layout) + permute(scale · B @ A) per adapted tensor."""
    _, base = read_gguf(base_path)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")  # model.layers.0.self_attn.q_proj
        layer = int(module.split(".")[2])
        g = next(g for g, hf in HF_OF.items() if module.endswith(hf))
        b = weights[key.replace("lora_A", "lora_B")]
        delta = scale_of(module, a.shape[0]) * (b.double() @ a.double()).numpy()
        if g in PERMUTED:
            delta = permute_qk(delta, PERMUTED[g])
        name = f"blk.{layer}.{g}.weight"
        out[name] = (base[name][1].astype(np.float64) + delta).astype(np.float32)
    return out


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.gguf"
    write_tiny_gguf(path, qtype="Q4_1")  # Q4_1 linears, Q8_0 embedding (tied head), F32 norms
    return path


CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
              rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})


def _scale(module, r):
    return (3 if module.endswith("v_proj") else 8) / r


@pytest.mark.parametrize("out_type", ["f32", "f16", "keep"])
def test_merged_tensors_match_textbook_merge(tmp_path, base, out_type):
    _, adapter = make_adapter(tmp_path, base, lorakit.LoraConfig(**CONFIG))
    out = tmp_path / "merged.gguf"
    result = merge_gguf(adapter, out, base, out_type=out_type)
    base_meta, base_t = read_gguf(base)
    meta, got = read_gguf(out)
    assert meta == base_meta  # tokenizer, chat template, hyper-parameters: all kept
    expected = expected_merge(base, adapter, _scale)
    assert sorted(expected) == sorted(result.written) and len(expected) == 2 * 6
    assert list(got) == list(base_t)  # same tensors, same order
    for name, (qtype, w, raw) in got.items():
        if name not in expected:  # untouched: the base's bytes and type
            assert (qtype, raw) == (base_t[name][0], base_t[name][2]), name
            continue
        ref = expected[name]
        if out_type == "f32":
            assert qtype == "F32"
            np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-6, err_msg=name)
        elif out_type == "f16":
            assert qtype == "F16"
            np.testing.assert_allclose(w, ref.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-7, err_msg=name)
        else:  # requantized by gguf itself to the base's type; a reference ulp apart may round a code the other way
            assert qtype == "Q4_1"
            requant = gguf.quants.dequantize(gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q4_1),
                                             gguf.GGMLQuantizationType.Q4_1)
            assert np.mean(w != requant) < 1e-3, name
            np.testing.assert_allclose(w, requant, atol=0.2 * np.abs(ref).max(), err_msg=name)
    if out_type == "f32":
        assert result.report is None
    else:  # the error the written type adds, per tensor: F16 rounding ≪ Q4_1 rounding
        assert sorted(result.report.per_layer) == sorted(expected)
        bound = 1e-3 if out_type == "f16" else 0.2
        assert 0 < result.report.max < bound
        saved = json.loads((tmp_path / "merged.gguf.requant.json").read_text())
        assert saved["max"] == pytest.approx(result.report.max)


def test_transformers_loads_merged_gguf_like_lorakit(tmp_path, base):
    from transformers import AutoModelForCausalLM

    model, adapter = make_adapter(tmp_path, base, lorakit.LoraConfig(**CONFIG), seed=1)
    out = tmp_path / "merged.gguf"
    merge_gguf(adapter, out, base, out_type="f32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 40, 99, 200, 7, 3]])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
        with lorakit.adapters.disabled(model):
            plain = model(ids).logits
    # F32 merge: the same function up to fp32 summation order (x·W' vs x·W + (x·A)·B)
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the logits far beyond the tolerance
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_tied_head_adapter_gets_its_own_output_tensor(tmp_path, base):
    cfg = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    model, adapter = make_adapter(tmp_path, base, cfg)
    out = tmp_path / "merged.gguf"
    merge_gguf(adapter, out, base, out_type="f32")
    _, base_t = read_gguf(base)
    _, got = read_gguf(out)
    w = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = w["base_model.model.lm_head.lora_A.weight"], w["base_model.model.lm_head.lora_B.weight"]
    ref = base_t["token_embd.weight"][1] + 2.0 * (b @ a).numpy()
    np.testing.assert_allclose(got["output.weight"][1], ref, rtol=1e-6, atol=1e-6)
    assert got["token_embd.weight"][2] == base_t["token_embd.weight"][2]  # the input embedding is untouched


def test_qwen2_is_not_permuted(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_gguf(path, tiny_llama_model(2, arch="qwen2"), arch="qwen2", qtype="Q8_0")
    _, adapter = make_adapter(tmp_path, path, lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    merge_gguf(adapter, tmp_path / "m.gguf", path, out_type="f32")
    _, base_t = read_gguf(path)
    _, got = read_gguf(tmp_path / "m.gguf")
    w = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    ref = base_t["blk.1.attn_q.weight"][1] + (w[key + ".lora_B.weight"] @ w[key + ".lora_A.weight"]).numpy()
    np.testing.assert_allclose(got["blk.1.attn_q.weight"][1], ref, rtol=1e-6, atol=1e-6)


# -- bad input: a LorakitError and no output file ------------------------------------------------------
def _adapter_q(tmp_path, base):
    return make_adapter(tmp_path, base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))[1]


def test_adapter_of_another_architecture(tmp_path, base):
    adapter = _adapter_q(tmp_path, base)
    qwen = tmp_path / "qwen.gguf"
    write_tiny_gguf(qwen, tiny_llama_model(3, arch="qwen2"), arch="qwen2", qtype="Q8_0")
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="trained on a 'llama' model.*architecture 'qwen2'.*--model"):
        merge_gguf(adapter, out, qwen)
    assert not out.exists()


def test_adapter_of_another_model_size(tmp_path, base):
    adapter = _adapter_q(tmp_path, base)
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small.gguf"
    m = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=len(gguf_vocab())))
    write_tiny_gguf(small, m.eval(), qtype="Q8_0")
    out = tmp_path / "m.gguf"
    with pytest.raises(LorakitError, match="q_proj"):
        merge_gguf(adapter, out, small)
    assert not out.exists()


def gguf_vocab():
    from gguf_helpers import tokenizer_vocab

    return tokenizer_vocab()[0]


def test_non_gguf_base(tmp_path, base):
    adapter = _adapter_q(tmp_path, base)
    d = tmp_path / "hfmodel"
    tiny_llama_model(0).save_pretrained(d)
    with pytest.raises(ConfigError, match="needs the base model's .gguf file.*--model path/to/model.gguf"):
        merge_gguf(adapter, tmp_path / "m.gguf", d)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(QuantizationError, match="not a readable GGUF file"):
        merge_gguf(adapter, tmp_path / "m.gguf", fake)
    assert not (tmp_path / "m.gguf").exists()


def test_keep_refuses_k_quants_before_writing(tmp_path):
    path = tmp_path / "k.gguf"
    write_tiny_gguf(path, qtype="Q8_0", kquant_modules={"self_attn.q_proj": "Q4_K"})
    adapter = _adapter_q(tmp_path, path)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(QuantizationError, match=r"blk\.0\.attn_q\.weight is Q4_K.*--quant f16.*llama-quantize"):
        merge_gguf(adapter, out, path, out_type="keep")
    assert out.read_bytes() == b"previous"  # the old file is left as it was
    merge_gguf(adapter, out, path, out_type="f16")  # the K-quant base merges to F16
    assert read_gguf(out)[1]["blk.0.attn_q.weight"][0] == "F16"


def test_unsupported_architecture(tmp_path, base):
    adapter = _adapter_q(tmp_path, base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    phi = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(phi), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QuantizationError, match="architecture 'phi2' is not supported"):
        merge_gguf(adapter, tmp_path / "m.gguf", phi)
    assert not (tmp_path / "m.gguf").exists()


def test_bad_out_type(tmp_path, base):
    with pytest.raises(ConfigError, match="out_type='q3'"):
        merge_gguf(tmp_path, tmp_path / "m.gguf", base, out_type="q3")


# -- the command line ----------------------------------------------------------------------------------
def test_cli_merge_format_gguf(tmp_path, base, capsys):
    from lorakit.cli import main

    _, adapter = make_adapter(tmp_path, base, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    out_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--format", "gguf", "--out", str(out_dir),
                 "--model", str(base), "--quant", "keep"]) == 0
    printed = capsys.readouterr().out
    assert "2 tensors written as Q4_1" in printed and "relative output error" in printed
    _, got = read_gguf(out_dir / "model.gguf")
    assert got["blk.1.attn_output.weight"][0] == "Q4_1"
    # the adapter records its base GGUF: --model may be left out; an error exits 2 with one line
    assert main(["merge", "--adapter", str(adapter), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert read_gguf(tmp_path / "m.gguf")[1]["blk.0.attn_output.weight"][0] == "F16"
    assert main(["merge", "--adapter", str(adapter), "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
                 "--dtype", "bf16"]) == 2
    assert "--quant" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
