"""What "the model is exactly as it was" means in the fault tests: an independent picture of a model."""

from __future__ import annotations

import torch

import lorakit


def picture(model: torch.nn.Module) -> dict:
    """State dict (values cloned), module tree (path → class), requires_grad, adapter lists."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tree": [(p, type(m).__name__) for p, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "adapters": lorakit.list_adapters(model),
        "active": lorakit.active_adapters(model),
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["tree"] == before["tree"]
    assert after["grad"] == before["grad"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.dtype == v.dtype and w.shape == v.shape and torch.equal(w, v), k


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_lm_dir(path):
    """A 2-layer Llama with lorakit's character tokenizer saved in ``path`` (for training runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.tasks import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_rows(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def quick_args(model, data, out, **kw):
    from lorakit.train import TrainArgs

    base = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=4, max_steps=4, lr=1e-2,
                r=4, lora_alpha=8, progress=False, threads=1, eval_rows=8, builtin_rows=32, max_length=64)
    base.update(kw)
    return TrainArgs(**base)
