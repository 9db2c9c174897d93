"""LLaMA-Pro block expansion across architectures: dense (Llama family, Phi, Starcoder2, GPT-J,
Falcon, BLOOM, GPT-NeoX, OPT), MoE (Mixtral, Qwen2-MoE, DeepSeek-V3 with dense first blocks), and the
refusals — post-LayerNorm blocks, an MoE part no layout names.

The reference is the model before expansion: the expanded one must give the same logits, with and without
the KV cache. Every parameter is perturbed first (biases, norm weights: HF's init makes biases 0 and
norms 1, which would hide a bias left live or a post-norm block), and the new blocks must train."""

from __future__ import annotations

import types

import pytest
import torch
import transformers as T
from torch import nn

from lorakit.errors import LorakitError, UnsupportedModuleError
from lorakit.variants.expand import expand_blocks

V = 100
_DENSE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)

# name: (config class, model class, config kwargs, path of the block list)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", _DENSE, "model.layers"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DENSE, head_dim=8), "model.layers"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DENSE, head_dim=8), "model.layers"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _DENSE, "model.layers"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _DENSE, "model.layers"),
    "cohere": ("CohereConfig", "CohereForCausalLM", _DENSE, "model.layers"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _DENSE, "model.layers"),
    "phi": ("PhiConfig", "PhiForCausalLM", _DENSE, "model.layers"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DENSE, num_local_experts=4, num_experts_per_tok=2),
                "model.layers"),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_DENSE, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2), "model.layers"),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DENSE, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                         v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         first_k_dense_replace=1, n_group=1, topk_group=1), "model.layers"),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      max_position_embeddings=64), "gpt_neox.layers"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4), "transformer.h"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=32, n_layer=4, n_head=4),
              "transformer.h"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64, rotary_dim=4), "transformer.h"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                 word_embed_proj_dim=32, max_position_embeddings=64), "model.decoder.layers"),
}


def _build(name, **overrides):
    cfg_cls, model_cls, kw, path = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, path


def _ids():
    return torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))


def _cached_last_logits(model, ids):
    """Logits of the last position computed through the KV cache (prefix first, then one token)."""
    with torch.no_grad():
        past = model(ids[:, :-1], use_cache=True).past_key_values
        return model(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_expansion_is_the_identity_and_new_blocks_train(name):
    model, path = _build(name)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    new = expand_blocks(model, 2)
    blocks = model.get_submodule(path)
    assert new == [2, 5] and len(blocks) == 6 == model.config.num_hidden_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-6)
    # the cache slots follow the renumbered blocks (a stale layer_idx would mix two blocks' caches)
    torch.testing.assert_close(_cached_last_logits(model, ids), ref[:, -1], rtol=1e-5, atol=1e-5)

    # the copies are not dead: a loss reaches their zeroed outputs, and only they train
    model.train()
    model(ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith((f"{path}.2.", f"{path}.5.")) for n in trainable)
    for i in new:
        grads = [p.grad for p in blocks[i].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name, option", [("bloom", {"apply_residual_connection_post_layernorm": True}),
                                          ("opt", {"do_layer_norm_before": False})])
def test_post_layernorm_blocks_are_refused_unchanged(name, option):
    # LN(h + 0) is not h once the norm's weight and bias are trained, so a zeroed copy would change the model
    model, path = _build(name, **option)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=next(iter(option))) as err:
        expand_blocks(model, 2)
    assert "pre-norm" in str(err.value)
    assert len(model.get_submodule(path)) == 4 and model.config.num_hidden_layers == 4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Experts(nn.Module):
    def __init__(self, n, hidden, inter):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, hidden, inter) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(n, inter, hidden) * 0.1)

    def forward(self, x):  # every expert, equal weights: (b, t, hidden)
        return sum(torch.relu(x @ self.gate_up_proj[e]) @ self.down_proj[e] for e in range(self.gate_up_proj.shape[0]))


class _MoE(nn.Module):
    """Routed experts plus a shared path under a name no layout knows."""

    def __init__(self, hidden, extra: bool):
        super().__init__()
        self.experts = _Experts(2, hidden, 8)
        self.side = nn.Linear(hidden, hidden) if extra else None

    def forward(self, x):
        return self.experts(x) + (self.side(x) if self.side is not None else 0)


class _Block(nn.Module):
    def __init__(self, hidden, extra):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = nn.Linear(hidden, hidden)
        self.mlp = _MoE(hidden, extra)

    def forward(self, x):
        x = x + self.self_attn.o_proj(torch.tanh(x))
        return x + self.mlp(x)


class _Net(nn.Module):
    def __init__(self, extra, hidden=6):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=hidden, num_hidden_layers=2)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block(hidden, extra) for _ in range(2)])

    def forward(self, x):
        for block in self.model.layers:
            x = block(x)
        return x


def test_moe_with_an_unknown_shared_part_is_refused_and_a_known_one_works():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6)
    plain = _Net(extra=False)
    ref = plain(x)
    assert expand_blocks(plain, 2) == [1, 3]  # matched as Mixtral-style: the stacked experts are zeroed
    torch.testing.assert_close(plain(x), ref, rtol=0, atol=1e-6)

    odd = _Net(extra=True)
    before = {k: v.clone() for k, v in odd.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.mlp .*still writes") as err:
        expand_blocks(odd, 2)
    assert isinstance(err.value, LorakitError) and "outputs=" in str(err.value)
    assert len(odd.model.layers) == 2 and all(torch.equal(before[k], v) for k, v in odd.state_dict().items())
    # naming the extra path makes it work
    ref = odd(x)
    expand_blocks(odd, 2, blocks="model.layers", outputs=("self_attn.o_proj", "mlp.experts.down_proj", "mlp.side"))
    torch.testing.assert_close(odd(x), ref, rtol=0, atol=1e-6)


def test_a_block_kind_no_layout_knows_is_refused_naming_it():
    model, path = _build("mistral")
    model.get_submodule(path)[1].mlp = nn.Sequential(nn.Linear(32, 32))  # block 1 is copied: its MLP is unknown
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.1 .*lacks \['mlp\.down_proj'\]"):
        expand_blocks(model, 2)
    assert len(model.get_submodule(path)) == 4
