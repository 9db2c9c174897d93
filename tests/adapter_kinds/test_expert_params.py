"""LoRA on MoE expert parameters (``target_parameters``, adapter_kinds/expert_params.py) against PEFT's
ParamWrapper: files both ways with identical outputs, exact merges, and a naive per-expert formula."""

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError

peft = pytest.importorskip("peft")


def tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen3_moe(seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, head_dim=8)
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_gpt_oss(seed=0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, num_local_experts=4, num_experts_per_tok=2,
                       head_dim=8, max_position_embeddings=64, layer_types=["full_attention"] * 2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # its experts start uninitialised in some versions: give them values
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    return model


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}
KW = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def _ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _train_like(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_file_loads_in_lorakit(arch, tmp_path):
    make = MODELS[arch]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**KW, init_lora_weights=False))
    _train_like(pm)
    pm.eval()
    want = _logits(pm)
    assert (want - _logits(make())).abs().max() > 1e-3
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_lorakit_file_loads_in_peft_and_merges_exactly(arch, tmp_path):
    make = MODELS[arch]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**KW, init_lora_weights=False))
    _train_like(ours)
    want = _logits(ours)
    lorakit.save_adapter(ours, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    torch.testing.assert_close(_logits(pm), want, rtol=1e-5, atol=1e-5)
    lorakit.merge(ours)
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)
    merged = lorakit.merge_and_unload(ours)
    ref = pm.merge_and_unload().state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


def test_delta_is_the_naive_per_expert_product():
    model = lorakit.inject(tiny_mixtral(), lorakit.LoraConfig(**KW, init_lora_weights=False))
    experts = model.model.layers[0].mlp.experts  # outer host: down_proj; inner: gate_up_proj
    w0 = tiny_mixtral().model.layers[0].mlp.experts.gate_up_proj.detach()  # (E, 2I, H) = (E, out, in)
    inner = experts.base_layer
    ad = inner.lora["default"]
    e, r = 4, 2
    for k in range(e):
        a_k = ad.lora_A[k * r:(k + 1) * r]  # (r, in)
        b_k = ad.lora_B[:, [j * e + k for j in range(r)]]  # (out, r): column j·E + e
        torch.testing.assert_close(ad.delta_2d()[k], ad.scaling * b_k @ a_k)
    lorakit.merge(model)
    torch.testing.assert_close(experts.base_layer.base_layer.gate_up_proj.detach(), w0 + ad.delta_2d().detach())
    lorakit.unmerge(model)
    torch.testing.assert_close(experts.base_layer.base_layer.gate_up_proj.detach(), w0, rtol=0, atol=1e-6)


def test_only_the_adapter_trains():
    model = lorakit.inject(tiny_mixtral(), lorakit.LoraConfig(**KW))
    ids = _ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable and "lora_A" in n)


def test_bad_target_parameters():
    with pytest.raises(TargetNotFoundError, match="experts.gate_proj"):
        lorakit.inject(tiny_mixtral(), lorakit.LoraConfig(r=2, target_modules=[], target_parameters=["experts.gate_proj"]))
    with pytest.raises(ConfigError, match=r"experts\.gate_up_proj.*lora_dropout=0"):
        lorakit.inject(tiny_mixtral(), lorakit.LoraConfig(**{**KW, "lora_dropout": 0.1}))
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"experts\.gate_up_proj: DoRA"):
        lorakit.inject(model, lorakit.LoraConfig(**KW, use_dora=True))
    assert model.state_dict().keys() == before.keys()
