"""The SmolLM2 study's plumbing and scores (lorakit.eval.study), on a tiny random-init chat model.

Scores are checked against naive references written here from full logits; the study itself runs
end to end (every method kind, self-replay, the page and the plot) in a few seconds."""

from __future__ import annotations

import copy
import json
import math
import unicodedata

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.eval.study.data import split_rows, text_blocks, unicode_name_rows
from lorakit.eval.study.report import pareto_front, plot, write_page
from lorakit.eval.study.run import Sizes, run_study
from lorakit.eval.study.runs import Method, Schedule, mix, parse_methods
from lorakit.eval.study.scores import (
    agreement,
    answer_exact,
    answer_nll,
    base_reference,
    exact_match,
    perplexity,
)
from lorakit.tasks import build_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def _examples(seed=0, n=5, vocab=40):
    """Rows of different lengths whose labels are IGNORE on a prompt and the tokens on an answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, vocab, (6 + i,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (3 + i % 2) + ids[3 + i % 2:]})
    return out


def _naive_logprobs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)


def test_answer_nll_is_the_mean_over_answer_tokens_of_a_per_row_computation(model):
    ex = _examples()
    total, n = 0.0, 0
    for e in ex:  # one row at a time, no padding: position t predicts token t+1
        lp = _naive_logprobs(model, e["input_ids"])
        for t in range(len(e["input_ids"]) - 1):
            if e["labels"][t + 1] != IGNORE:
                total -= float(lp[t, e["labels"][t + 1]])
                n += 1
    assert answer_nll(model, ex, pad_id=0, batch_size=2) == pytest.approx(total / n, rel=1e-5)


def test_answer_exact_counts_rows_whose_greedy_tokens_are_all_the_reference(model):
    ex = _examples(seed=5, n=6)
    for i, e in enumerate(ex):  # rows 0, 2, 4: the answer is the model's own greedy continuation
        if i % 2 == 0:
            lp = _naive_logprobs(model, e["input_ids"])
            start = next(t for t, lab in enumerate(e["labels"]) if lab != IGNORE)
            ids = list(e["input_ids"])
            for t in range(start, len(ids)):  # greedy decoding, token by token
                ids[t] = int(_naive_logprobs(model, ids[:t])[-1].argmax())
            e["input_ids"], e["labels"] = ids, [IGNORE] * start + ids[start:]
    hits = 0
    for e in ex:
        lp = _naive_logprobs(model, e["input_ids"])
        hits += all(int(lp[t].argmax()) == e["labels"][t + 1] for t in range(len(e["labels"]) - 1)
                    if e["labels"][t + 1] != IGNORE)
    assert hits >= 3
    assert answer_exact(model, ex, pad_id=0, batch_size=4) == pytest.approx(hits / len(ex))


def test_perplexity_is_exp_of_the_mean_next_token_nll(model):
    blocks = [[7, 8, 9, 10, 11, 12], [20, 3, 5, 30, 31, 8]]
    nll = [-float(_naive_logprobs(model, b)[t, b[t + 1]]) for b in blocks for t in range(len(b) - 1)]
    assert perplexity(model, blocks) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_agreement_and_kl_against_a_hand_computation(model):
    ex = _examples(seed=3)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = base_reference(model, ex, pad_id=0, batch_size=3)
    agree, kl, n = 0, 0.0, 0
    for e in ex:
        a, b = _naive_logprobs(model, e["input_ids"]), _naive_logprobs(other, e["input_ids"])
        for t in range(len(e["input_ids"]) - 1):
            if e["labels"][t + 1] != IGNORE:
                agree += int(a[t].argmax() == b[t].argmax())
                kl += sum(float(a[t, v].exp() * (a[t, v] - b[t, v])) for v in range(a.shape[1]))
                n += 1
    got_agree, got_kl = agreement(other, ref)
    assert got_agree == pytest.approx(agree / n)
    assert got_kl == pytest.approx(kl / n, rel=1e-4)
    assert got_kl > 0
    same_agree, same_kl = agreement(model, ref)
    assert same_agree == 1.0 and same_kl == pytest.approx(0.0, abs=1e-6)


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match(["Latin  Small letter A", "x"], ["latin small letter a", "y"]) == 0.5
    assert exact_match(["Latin Small Letter Ab"], ["Latin Small Letter A"]) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_the_target_rows_are_unicodedata_names_and_the_split_is_disjoint():
    rows = unicode_name_rows()
    assert len(rows) > 400
    for r in rows[::25]:
        ch = r["instruction"].rsplit(" ", 1)[1].rstrip("?")
        assert r["output"].upper() == unicodedata.name(ch)
    train, held = split_rows(rows, 48)
    assert len(held) == 48 and len(train) == len(rows) - 48
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert split_rows(rows, 48)[1] == held  # fixed by the seed


def test_text_blocks_are_spread_and_do_not_overlap():
    blocks = text_blocks(list(range(100)), 10, 3)
    assert blocks == [list(range(0, 10)), list(range(30, 40)), list(range(60, 70))]
    with pytest.raises(ValueError):
        text_blocks(list(range(20)), 10, 3)


def test_pareto_front():
    pts = {"a": (0.0, 1.0), "b": (1.0, 2.0), "c": (1.0, 1.0), "d": (2.0, 2.0), "e": (0.5, 0.5)}
    assert sorted(pareto_front(pts)) == ["a", "b"]


def test_method_labels():
    ms = parse_methods("full, lora-r8,dora-r4,lora-r64+replay")
    assert ms == [Method("full", "full"), Method("lora-r8", "lora", 8), Method("dora-r4", "dora", 4),
                  Method("lora-r64+replay", "lora", 64, True)]
    for bad in ("lora", "lora-r0", "olora-r8", "full+x", ""):
        with pytest.raises(ConfigError, match="study"):
            parse_methods(bad)


def test_replay_makes_up_the_asked_fraction():
    mixed = mix(list(range(30)), ["r"] * 4, 0.25, seed=0)
    assert len(mixed) == 40 and mixed.count("r") == 10


def test_the_study_runs_end_to_end_on_a_tiny_chat_model(model, tok, tmp_path):
    sizes = Sizes(held_out=8, max_length=48, text_blocks=3, text_block=16, chat_tokens=6, replay_prompts=4,
                  replay_tokens=6, answer_tokens=4)
    methods = parse_methods("full,lora-r2,dora-r2,lora-r2+replay")
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_study(model, tok, methods, [0, 1], Schedule(steps=2, batch_size=4), sizes, tmp_path,
                       {"seeds": [0, 1], "methods": "..."}, say=lambda *a: None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_before.items())  # the base is untouched
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == [m.label for m in methods] * 2
    for r in saved["runs"]:
        assert 0 <= r["target_em"] <= 1 and 0 <= r["chat_agree"] <= 1 and r["chat_kl"] >= 0
        assert r["text_ppl"] > 1 and r["wall_seconds"] >= r["train_seconds"] > 0
    full = next(r for r in saved["runs"] if r["method"] == "full")
    lora = next(r for r in saved["runs"] if r["method"] == "lora-r2")
    assert full["trainable"] == sum(p.numel() for p in model.parameters()) > 10 * lora["trainable"]
    from lorakit.eval.study.report import aggregate

    plot(result["base"], aggregate(result["runs"]), tmp_path / "p.png", "tiny")
    write_page(tmp_path / "page.md", {**result, "settings": {**result["settings"], "finished": "now"}},
               "python -m lorakit.eval.study", "test", "notes", "p.png")
    page = (tmp_path / "page.md").read_text()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lora-r2+replay |" in page and "lora-r2 vs full" in page

    # --report-from merges saved results (e.g. of parallel processes) into one page
    from lorakit.eval.study.__main__ import main

    other = {**saved, "runs": [{**r, "method": r["method"] + "+x"} for r in saved["runs"][:2]]}
    (tmp_path / "b.json").write_text(json.dumps(other))
    argv = ["--report-from", f"{tmp_path / 'results.json'},{tmp_path / 'b.json'}", "--page", str(tmp_path / "m.md")]
    assert main(argv) == 0
    merged = (tmp_path / "m.md").read_text()
    assert "| full+x |" in merged and "| dora-r2 |" in merged and (tmp_path / "m.png").is_file()


def test_report_from_refuses_a_file_that_is_not_results(tmp_path, capsys):
    from lorakit.eval.study.__main__ import main

    (tmp_path / "x.json").write_text("{}")
    assert main(["--report-from", str(tmp_path / "x.json"), "--page", str(tmp_path / "p.md")]) == 2
    assert "not a study's results.json" in capsys.readouterr().err
    assert main(["--report-from", str(tmp_path / "nope.json"), "--page", str(tmp_path / "p.md")]) == 2
    assert "--report-from" in capsys.readouterr().err and not (tmp_path / "p.md").exists()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lora-r0"], "study method 'lora-r0'"),
    (["--held-out", "0"], "--held-out 0"),
    (["--seeds", ","], "--seeds is empty"),
    (["--replay", "1.0"], "--replay 1.0"),
])
def test_the_command_refuses_bad_settings_naming_them(argv, message, tmp_path, capsys):
    from lorakit.eval.study.__main__ import main

    assert main([*argv, "--model", str(tmp_path), "--page", str(tmp_path / "p.md")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.md").exists()


def test_the_command_refuses_a_model_directory_without_config(tmp_path, capsys):
    from lorakit.eval.study.__main__ import main

    assert main(["--model", str(tmp_path / "nope"), "--page", str(tmp_path / "p.md")]) == 2
    assert "not a transformers model directory" in capsys.readouterr().err


def test_write_data_writes_the_split_the_study_scores(tmp_path):
    from lorakit.eval.study.__main__ import main

    assert main(["--write-data", str(tmp_path)]) == 0
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(x) for x in (tmp_path / "held_out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (train, held) == split_rows(unicode_name_rows(), 48)
