"""Issue 17 item 7 · padding-free packing: packed rows give the per-token losses of the same rows run
alone (each row through the plain model, the loss written out here), and labels never cross rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorakit.data.batches import model_loss_sum, target_count
from lorakit.data.packing import IGNORE, MODES, block_causal_mask, collate_packed, pack_rows
from lorakit.errors import ConfigError
from lorakit.train import train
from lorakit.train.packing_check import mask_dtype_for, packing_mode

from .train_helpers import quick_args, write_rows

V = 61


def _models():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=128)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    }


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        labels = [IGNORE if i < n // 3 else t for i, t in enumerate(ids)]  # a "prompt" third without targets
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _per_token_reference(model, rows):
    """Each row alone through the model; token t+1's cross-entropy from position t, for targets only."""
    out = []
    for r in rows:
        logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]  # (L, V)
        labels = torch.tensor(r["labels"][1:])
        losses = F.cross_entropy(logits[:-1].float(), labels.clamp(min=0), reduction="none")
        out.append(losses[labels != IGNORE])
    return out


def _per_token_packed(model, packed, batch):
    """The packed batch's per-token losses, split back into its rows (in packing order)."""
    labels = batch.pop("labels")
    logits = model(**batch).logits  # (B, T, V)
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].clamp(min=0).reshape(-1),
                             reduction="none").view(labels.shape[0], -1)
    out = []
    for b, e in enumerate(packed):
        start = 0
        for n in e["seq_lens"]:
            lab = labels[b, start + 1:start + n]
            out.append(losses[b, start:start + n - 1][lab != IGNORE])
            start += n
    return out


# -- packing itself -----------------------------------------------------------------------------------------
def _naive_bfd_loads(lengths, cap):
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, load in enumerate(loads) if load + n <= cap]
        if fits:
            best = min(fits, key=lambda i: cap - loads[i])
            loads[best] += n
        else:
            loads.append(n)
    return sorted(loads)


def test_best_fit_decreasing_keeps_rows_whole():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 40, (300,), generator=g).tolist()
    rows = _rows(lengths)
    packed = pack_rows(rows, 64)
    assert sorted(sum(p["seq_lens"]) for p in packed) == _naive_bfd_loads(lengths, 64)
    assert all(len(p["input_ids"]) == sum(p["seq_lens"]) <= 64 for p in packed)
    seen = []
    for p in packed:
        start = 0
        for n in p["seq_lens"]:
            seen.append(p["input_ids"][start:start + n])
            assert p["labels"][start] == IGNORE  # a row's first token is never predicted from the previous row
            start += n
    assert sorted(map(tuple, seen)) == sorted(tuple(r["input_ids"]) for r in rows)  # every row once, intact
    assert pack_rows(rows, 64) == packed  # deterministic
    fill = sum(lengths) / (64 * len(packed))
    assert fill > 0.95


def test_block_mask_is_causal_within_rows():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = block_causal_mask(seg)[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(m[i, j]) == (j <= i and seg[0, i] == seg[0, j])
    f = block_causal_mask(seg, torch.float32)[0, 0]
    assert torch.equal(f == 0, m) and f.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_losses_equal_unpacked(arch, attn, mode):
    model = _models()[arch]()
    model.config._attn_implementation = attn
    model.eval()
    rows = _rows([9, 17, 4, 23, 12, 6, 30, 2, 15])
    packed = pack_rows(rows, 40)
    assert len(packed) < len(rows)
    batch = collate_packed(packed, 0, mode, mask_dtype_for(model))
    with torch.no_grad():
        ref = _per_token_reference(model, rows)
        got = _per_token_packed(model, packed, dict(batch))
    order = [tuple(p["input_ids"][sum(p["seq_lens"][:k]):sum(p["seq_lens"][:k + 1])])
             for p in packed for k in range(len(p["seq_lens"]))]
    by_ids = {tuple(r["input_ids"]): t for r, t in zip(rows, ref)}
    assert len(got) == len(rows)
    for ids, losses in zip(order, got):
        assert losses.shape == by_ids[ids].shape
        assert torch.allclose(losses, by_ids[ids], atol=1e-5, rtol=0), (losses - by_ids[ids]).abs().max()
    # lorakit's own loss path (chunked cross-entropy) on the packed batch: the same sum, the same targets
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        total = model_loss_sum(model, model, inputs, labels, chunked=True)
    assert float(total) == pytest.approx(float(sum(t.sum() for t in ref)), rel=1e-5)
    assert target_count(batch) == sum(len(t) for t in ref)


def test_labels_never_cross_rows():
    packed = pack_rows(_rows([5, 8, 3, 11, 7]), 16)
    batch = collate_packed(packed, 0, "position_ids")
    pos, labels = batch["position_ids"], batch["labels"]
    segment = (pos == 0).cumsum(-1)  # a new row starts where positions restart
    targets = labels[:, 1:] != IGNORE  # token t+1 is predicted from position t
    assert targets.any()
    assert torch.equal(segment[:, 1:][targets], segment[:, :-1][targets])
    assert batch["use_cache"] is False and "attention_mask" not in batch


def test_probe_picks_a_mode_and_leaves_the_model_as_it_was():
    model = _models()["llama"]()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert packing_mode(model) == "position_ids"
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _CumulativeLM(torch.nn.Module):
    """A "model" whose token t sees the mean of all earlier embeddings and ignores position ids and masks."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(V, 16), torch.nn.Linear(16, V)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, **_):
        x = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return SimpleNamespace(logits=self.head(x))


def test_a_model_that_mixes_rows_is_refused(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="_CumulativeLM does not keep packed rows apart.*Drop packing"):
        packing_mode(_CumulativeLM())


def test_packed_training_step_matches_unpacked(tiny_lm, tmp_path):
    """One step over all rows: the step's loss (mean over every target token, before the update) is the
    same packed and padded."""
    rows = [{"instruction": f"rev {'abcdefghij'[:k]}", "output": "abcdefghij"[:k][::-1]} for k in range(1, 11)]
    data = write_rows(tmp_path / "d.jsonl", rows)
    from transformers import AutoTokenizer

    from lorakit.data.encode import encode
    from lorakit.data.files import read_data

    # a batch holds exactly every row (a larger one would wrap around and repeat some)
    n_seq = len(encode(read_data(str(data)), AutoTokenizer.from_pretrained(tiny_lm), 64, packing=True).examples)
    plain = train(quick_args(tiny_lm, data, tmp_path / "plain", batch_size=10, max_steps=1))
    packed = train(quick_args(tiny_lm, data, tmp_path / "packed", batch_size=n_seq, max_steps=1, packing=True))
    d = packed.metrics["data"]["train"]
    assert d["packed"] and d["rows"] == 10 and d["examples"] == n_seq < 10
    assert packed.metrics["loss"]["first"] == pytest.approx(plain.metrics["loss"]["first"], abs=1e-5)
    assert packed.metrics["time"]["tokens_per_second"] > 0
