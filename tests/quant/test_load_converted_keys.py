"""load_quantized on checkpoints whose names transformers (≥ 5) converts at load: renamed modules
(GPT-NeoX's ``embed_out`` → ``lm_head``, Mixtral's ``block_sparse_moe`` → ``mlp``) and MoE experts stored
one Linear per expert that the model holds stacked (Mixtral, Qwen2-MoE, DeepSeek-V3).

Reference: transformers' own ``from_pretrained`` (which applies its conversion mapping), quantized in
memory by ``quantize_model``; the streamed model must hold the same tensors and give the same logits, with
the checkpoint in one file and in many small shards (experts split across shards)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from qhelpers import one_thread  # noqa: F401  (fixture)
from safetensors.torch import load_file, save_file

from lorakit.errors import QuantizationError
from lorakit.quant import load_quantized, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

_DENSE = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
MODELS = {
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DENSE, num_local_experts=4, num_experts_per_tok=2)),
    # 12 experts: experts.10 and .11 must stack after .9, not after .1 (string order); sharded: split across files
    "mixtral-12": ("MixtralConfig", "MixtralForCausalLM", dict(_DENSE, num_local_experts=12, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_DENSE, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2)),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DENSE, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                         v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         first_k_dense_replace=1, n_group=1, topk_group=1)),
}


def _write(name, path, shard=None):
    cfg_cls, model_cls, kw = MODELS[name]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**kw))
    with torch.no_grad():
        for p in model.parameters():  # experts differ from each other and from their init
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.mark.parametrize("name, shard", [(n, None) for n in sorted(MODELS)] + [("mixtral-12", "8KB"), ("qwen2-moe", "8KB")],
                         ids=lambda v: {None: "one-file", "8KB": "sharded"}.get(v, v))
def test_streamed_model_equals_transformers_load(name, shard, tmp_path):
    path = _write(name, tmp_path / name, shard)
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"] if shard else {}
    if name != "gpt-neox":
        # the checkpoint really stores experts one by one (what this test is about)
        keys = names or load_file(path / "model.safetensors")
        assert any(".experts.1." in k for k in keys)
    ref = quantize_model(T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                         compute_dtype=torch.float32).eval()
    got = load_quantized(path, compute_dtype=torch.float32)
    want_sd, got_sd = ref.state_dict(), got.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    for key, value in want_sd.items():
        assert torch.equal(got_sd[key], value), key
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_a_missing_expert_is_refused(tmp_path):
    path = _write("mixtral", tmp_path / "m", "8KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    victim = next(k for k in index["weight_map"] if ".experts.2.w2." in k)
    shard = path / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    # the index and shards agree, so the stack is built from 3 experts and its shape gives it away
    with pytest.raises(QuantizationError, match=r"experts\.down_proj in .* has shape \(3, 32, 64\), but .* expects \(4, 32, 64\)"):
        load_quantized(path)
