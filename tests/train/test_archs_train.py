"""`lorakit train` on architectures other than Llama — GPT-NeoX, Falcon, BLOOM, OPT, Phi, GPT-J,
GPTBigCode, Starcoder2, Gemma 2, Mixtral and Qwen2-MoE — in plain LoRA and QLoRA (nf4), and the refusal
of an encoder-decoder checkpoint (T5) before anything loads.

Reference for the LoRA runs: PEFT loads the adapter the run wrote onto the same base, and its logits
must equal lorakit's (the adapter file, its names and its scaling are what PEFT users get)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lorakit.errors import ConfigError
from lorakit.train import train

from . import train_helpers
from .train_helpers import write_rows

peft = pytest.importorskip("peft", reason="PEFT reads the adapters these runs write")

_D = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128)
ARCHS = {
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                word_embed_proj_dim=32, max_position_embeddings=128)),
    "phi": ("PhiConfig", "PhiForCausalLM", _D),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4)),
    "gpt-bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _D),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_D, head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_D, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_D, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2)),
}


def _model_dir(path, cfg_name, model_name, kw):
    from lorakit.tasks import build_tokenizer

    tok = build_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    getattr(T, model_name)(getattr(T, cfg_name)(vocab_size=len(tok), **ids, **kw)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def quick_args(model, data, out, **kw):
    return train_helpers.quick_args(model, data, out, **{**dict(max_steps=2, lr=5e-2, target_modules="all-linear",
                                                                 eval_rows=0, max_length=48), **kw})


def _finite_losses(result):
    loss = result.metrics["loss"]
    return all(torch.isfinite(torch.tensor(float(loss[k]))) for k in ("first", "last"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    data = [{"prompt": f"add {i} and {i + 1}", "completion": str(2 * i + 1)} for i in range(24)]
    return write_rows(tmp_path_factory.mktemp("rows") / "train.jsonl", data)


# GPT-J, GPTBigCode, Starcoder2 and Gemma 2 train the same way; their adapter files are covered both ways by
# tests/interop/test_peft_archs.py, so the (slower) training runs keep to distinct layouts
@pytest.mark.parametrize("name", ["bloom", "falcon", "gpt-neox", "mixtral", "opt", "phi", "qwen2-moe"])
def test_lora_run_writes_an_adapter_peft_reads_identically(name, rows, tmp_path):
    model_dir = _model_dir(tmp_path / "model", *ARCHS[name])
    result = train(quick_args(model_dir, rows, tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert _finite_losses(result)

    import lorakit

    ours = lorakit.load_adapter(T.AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    base = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = ours(ids).logits, theirs(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the trained adapter changes the model


@pytest.mark.parametrize("name", ["gpt-neox", "mixtral", "qwen2-moe"])  # the ones whose checkpoint names transformers converts
def test_qlora_run(name, rows, tmp_path):
    model_dir = _model_dir(tmp_path / "model", *ARCHS[name])
    result = train(quick_args(model_dir, rows, tmp_path / "run", quant="nf4"))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert _finite_losses(result)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_an_encoder_decoder_is_refused_before_anything_runs(quant, rows, tmp_path):
    model_dir = _model_dir(tmp_path / "t5", "T5Config", "T5ForConditionalGeneration",
                           dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(ConfigError, match=r"'t5' model \(T5ForConditionalGeneration\) has no AutoModelForCausalLM"):
        train(quick_args(model_dir, rows, tmp_path / "run", quant=quant))
    assert not (tmp_path / "run").exists()
