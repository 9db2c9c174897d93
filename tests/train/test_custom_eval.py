"""Issue 17 item 2 · generation-based scores on the user's own eval rows, with pluggable scorers.

References are independent of the code under test: hand-written scorer expectations, prompts compared
with the training encoding's own prefix, and expected rates from a naive per-row ``model.generate``
loop (base model, or the trained adapter loaded with PEFT)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from lorakit.cli.commands import evaluate, format_eval
from lorakit.data.encode import IGNORE, encode
from lorakit.data.files import RawData, read_data
from lorakit.errors import ConfigError, ScorerError
from lorakit.tasks import get as get_task
from lorakit.train import TrainArgs, train
from lorakit.train.gen_eval import reference_prompts
from lorakit.train.scoring import load_scorer

from .train_helpers import quick_args, write_rows


def _norm(s: str) -> str:
    return " ".join(s.split())


def _naive(model, tok, ids: list[int], max_new: int) -> str:
    """One row at a time, no padding: HF's greedy generate."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def _chat_prompt_ids(tok, user: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# -- scorers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, pred, ref, want", [
    ("exact", "  Paris\n", "Paris", 1.0),
    ("exact", "New   York\tCity", "New York City", 1.0),
    ("exact", "paris", "Paris", 0.0),  # case-sensitive
    ("exact", "Paris, France", "Paris", 0.0),
    ("exact_ci", "PARIS \n", "paris", 1.0),
    ("contains", "The answer is  Paris.", "is Paris", 1.0),
    ("contains", "The answer is Lyon.", "Paris", 0.0),
    ("regex:#### (-?\\d+)", "so 3+4 #### 7", "7", 1.0),  # reference without a match: the whole reference
    ("regex:#### (-?\\d+)", "so #### 7", "3 + 4 = 7\n#### 7", 1.0),  # extracted from both sides
    ("regex:#### (-?\\d+)", "so #### 8", "#### 7", 0.0),
    ("regex:#### (-?\\d+)", "no marker 7", "7", 0.0),  # no match in the prediction
    ("regex:\\d+", "it is 42 or so", "42", 1.0),  # no group: the whole match
])
def test_builtin_scorers(spec, pred, ref, want):
    assert load_scorer(spec)(pred, ref) == want


def test_user_functions_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "myscore.py").write_text(textwrap.dedent("""
        def first_word(prediction, reference):
            return prediction.split()[:1] == reference.split()[:1]
        def half(prediction, reference):
            return 0.5
    """))
    assert load_scorer(f"{tmp_path / 'myscore.py'}:first_word")("Paris is big", "Paris") == 1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_scorer("myscore:half")("a", "b") == 0.5


@pytest.mark.parametrize("spec, body, match", [
    ("nope", None, "not a built-in scorer"),
    ("regex:(unclosed", None, "does not compile"),
    ("regex:", None, "regex is empty"),
    ("no_such_module_xyz:fn", None, "no module named 'no_such_module_xyz'"),
    ("{dir}/missing.py:fn", None, "does not exist"),
    ("{dir}/s.py:missing", "def other(p, r):\n    return 1\n", "defines no 'missing'.*other"),
    ("{dir}/s.py:VALUE", "VALUE = 3\n", "not a function"),
    ("{dir}/s.py:fn", "def fn(p, r):\n    return 'yes'\n", "returned str"),
    ("{dir}/s.py:fn", "def fn(p, r):\n    return 42\n", "must lie in \\[0, 1\\]"),
    ("{dir}/s.py:fn", "def fn(p):\n    return 1\n", "raised TypeError"),
    ("{dir}/s.py:fn", "import no_such_dependency_xyz\n", "running .*s.py failed"),
    ("mod.py:bad-name", None, "Python function name"),
])
def test_bad_scorer_specs_name_the_spec(tmp_path, spec, body, match):
    spec = spec.format(dir=tmp_path)
    if body is not None:
        (tmp_path / "s.py").write_text(body)
    with pytest.raises(ScorerError, match=match) as info:
        load_scorer(spec).check(["ref"])
    assert repr(spec) in str(info.value)


def test_spec_form_is_checked_on_construction():
    with pytest.raises(ScorerError, match="regex:\\(x"):
        TrainArgs(scorer="regex:(x")
    with pytest.raises(ConfigError, match="eval_max_new_tokens"):
        TrainArgs(eval_max_new_tokens=0)


def test_a_bad_scorer_fails_before_training(tmp_path, tiny_lm, instr_file):
    (tmp_path / "s.py").write_text("def fn(p, r):\n    return None\n")
    out = tmp_path / "run"
    with pytest.raises(ScorerError, match="returned NoneType"):
        train(quick_args(tiny_lm, instr_file, out, eval_data=str(instr_file), scorer=f"{tmp_path / 's.py'}:fn"))
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists() and not (out / "metrics.json").exists()


# -- prompts are what training put before the answer ---------------------------------------------------------
def _answer_start(labels: list[int]) -> int:
    """Index of the first token of the last run of target labels (the last answer)."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i


def _rows_by_format():
    return {
        "instruction": [{"instruction": "rev", "input": "abc", "output": "cba"}, {"instruction": "copy xy", "output": "xy"}],
        "completion": [{"prompt": "sort dcb=", "completion": "bcd"}],
        "chat": [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev ab"},
                               {"role": "assistant", "content": "ba"}, {"role": "user", "content": "rev xyz"},
                               {"role": "assistant", "content": "zyx"}]}],
    }


@pytest.mark.parametrize("fmt", ["instruction", "completion", "chat"])
@pytest.mark.parametrize("templated", [True, False])
def test_prompts_are_the_trained_prefix(fmt, templated, tiny_lm, tiny_lm_no_template):
    from transformers import AutoTokenizer

    if fmt == "chat" and not templated:
        pytest.skip("chat rows need a chat template")
    tok = AutoTokenizer.from_pretrained(tiny_lm if templated else tiny_lm_no_template)
    raw = RawData(_rows_by_format()[fmt], fmt, "x.jsonl")
    enc = encode(raw, tok, 128)
    prompts = reference_prompts(raw, tok)
    refs = {"instruction": "output", "completion": "completion"}
    assert [p.reference for p in prompts] == [r[refs[fmt]] if fmt in refs else r["messages"][-1]["content"]
                                              for r in raw.rows]
    for p, ex in zip(prompts, enc.examples):
        start = _answer_start(ex["labels"][1:]) + 1  # labels[t] is predicted from the tokens before t
        assert p.ids == ex["input_ids"][:start]


def test_rows_without_references_give_no_prompts(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert reference_prompts(RawData([{"text": "hello"}], "text", "t.jsonl"), tok) == []
    assert reference_prompts(RawData([{"text": "a", "label": 1}], "classification", "c.jsonl"), tok) == []


# -- the score equals a naive loop ---------------------------------------------------------------------------
def test_lorakit_eval_score_matches_a_naive_generate_loop(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, net = AutoTokenizer.from_pretrained(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    users = [f"rev {w}" for w in ("abc", "hello", "xyz", "lorakit", "qq", "mno", "tuvw", "ij")]
    preds = [_naive(net, tok, _chat_prompt_ids(tok, u), 6) for u in users]
    # Half the references are the model's own answer (scored 1 by exact), half are not.
    refs = [p if i % 2 == 0 and _norm(p) else "zz" for i, p in enumerate(preds)]
    expected = sum(_norm(p) == _norm(r) for p, r in zip(preds, refs)) / len(refs)
    assert 0 < expected < 1
    data = write_rows(tmp_path / "dev.jsonl", [{"instruction": u, "output": r} for u, r in zip(users, refs)])
    result = evaluate(str(data), model=str(tiny_lm), batch_size=3, generate_rows=8, max_new_tokens=6)
    assert result["base"]["score"]["score"] == pytest.approx(expected)
    assert result["base"]["score"]["n"] == 8
    table = "\n".join(format_eval(result))
    assert f"{100 * expected:.1f}%" in table and "score: greedy generation on 8 eval rows" in table
    few = evaluate(str(data), model=str(tiny_lm), generate_rows=3, max_new_tokens=6, scorer="contains")
    assert few["base"]["score"]["n"] == 3 and few["base"]["score"]["scorer"] == "contains"


def test_train_scores_eval_rows_during_and_after(tmp_path, tiny_lm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = get_task("rev")
    train_rows, eval_rows = task.examples(32, seed=0), task.examples(6, seed=1, split="eval")
    tr, ev = write_rows(tmp_path / "train.jsonl", train_rows), write_rows(tmp_path / "dev.jsonl", eval_rows)
    out = tmp_path / "run"
    result = train(quick_args(tiny_lm, tr, out, eval_data=str(ev), max_steps=4, eval_every=2, eval_generate_rows=5,
                              eval_max_new_tokens=5, scorer="contains", lr=3e-2))
    log = (out / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    assert "eval_score" in header
    assert sum(1 for line in log[1:] if line.split(",")[header.index("eval_score")] != "") == 2  # steps 2 and 4
    score = result.metrics["score"]
    assert score["before"]["n"] == score["after"]["n"] == 5 and score["after"]["scorer"] == "contains"
    # Independent: the saved adapter through PEFT, one row at a time.
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), str(out / "adapter")).eval()
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    naive = [_naive(peft, tok, _chat_prompt_ids(tok, f"rev {r['input']}"), 5) for r in eval_rows[:5]]
    assert [r["prediction"] for r in rows] == naive
    want = sum(_norm(r["output"]) in _norm(p) for r, p in zip(eval_rows, naive)) / 5
    assert score["after"]["score"] == pytest.approx(want)
    summary_line = f"score        contains {100 * score['before']['score']:.1f}% → {100 * want:.1f}%"
    from lorakit.train.report import summary_lines

    assert any(line.startswith(summary_line) for line in summary_lines(result.metrics))


def test_eval_split_rows_are_scored(tmp_path, tiny_lm, instr_file):
    result = train(quick_args(tiny_lm, instr_file, tmp_path / "run", eval_split=0.25, max_steps=1,
                              eval_max_new_tokens=3))
    n_held = len(read_data(str(instr_file)).rows) // 4
    assert result.metrics["score"]["after"]["n"] == n_held
    assert result.metrics["score"]["after"]["scorer"] == "exact"


def test_builtin_eval_data_keeps_its_task_score(tmp_path, tiny_lm):
    result = train(quick_args(tiny_lm, "builtin:rev", tmp_path / "run", max_steps=1))
    assert result.metrics["score"]["after"] is None and "rev" in result.metrics["tasks"]["after"]


def test_cli_eval_prints_the_score_and_refuses_a_bad_scorer(tmp_path, tiny_lm, capsys):
    from lorakit.cli import main

    data = write_rows(tmp_path / "dev.jsonl", [{"instruction": "rev ab", "output": "ba"}] * 3)
    assert main(["eval", "--model", str(tiny_lm), "--data", str(data), "--scorer", "exact_ci",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "score: greedy generation on 3 eval rows, ≤ 3 new tokens; exact_ci" in out
    assert out.splitlines()[2].rstrip().endswith("%")  # the base row has a score, not "-"
    assert main(["eval", "--model", str(tiny_lm), "--data", str(data), "--scorer", "regex:("]) == 2
    assert "scorer='regex:('" in capsys.readouterr().err
