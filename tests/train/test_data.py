"""Data: formats, row errors naming file/row/field, response-only labels, truncation counts, packing."""

from __future__ import annotations

import pytest

from lorakit.data.encode import IGNORE, encode, label_mapping
from lorakit.data.files import read_data
from lorakit.errors import ConfigError, DataError

from .train_helpers import write_rows


@pytest.fixture(scope="module")
def tok(tiny_lm):
    from lorakit.train.model import load_tokenizer

    return load_tokenizer(tiny_lm)


@pytest.mark.parametrize("row,field", [
    ({"instruction": "rev", "input": "ab"}, "output"),
    ({"input": "ab", "output": "ba"}, "instruction"),
    ({"instruction": "rev", "input": "ab", "output": 5}, "output"),
])
def test_instruction_row_errors_name_file_row_and_field(tmp_path, row, field):
    good = {"instruction": "rev", "input": "abc", "output": "cba"}
    path = write_rows(tmp_path / "d.jsonl", [good, good, row] if not isinstance(row.get("output"), int) else [row])
    with pytest.raises(DataError) as exc:
        read_data(str(path))
    msg = str(exc.value)
    assert str(path) in msg and f"'{field}'" in msg
    if not isinstance(row.get("output"), int):
        assert "row 3" in msg


def test_chat_row_errors(tmp_path):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    path = write_rows(tmp_path / "c.jsonl", [ok, bad_role])
    with pytest.raises(DataError, match=r"row 2.*role 'bot'.*messages\[1\]\.role"):
        read_data(str(path))
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match="row 2: no assistant turn"):
        read_data(str(write_rows(tmp_path / "c2.jsonl", [ok, no_answer])))


def test_text_and_classification_errors(tmp_path):
    with pytest.raises(DataError, match=r"row 2: missing field \(field 'text'\)"):
        read_data(str(write_rows(tmp_path / "t.jsonl", [{"text": "a"}, {"text": None}])))
    with pytest.raises(DataError, match=r"row 1: missing field \(field 'label'\)"):
        read_data(str(write_rows(tmp_path / "l.jsonl", [{"text": "a", "label": None}, {"text": "b", "label": 1}])))


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_data(str(path))


def test_unknown_columns_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot tell the row format"):
        read_data(str(write_rows(tmp_path / "x.jsonl", [{"foo": "bar"}])))
    with pytest.raises(DataError, match="does not exist"):
        read_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="unknown task 'shfit'; did you mean 'shift'"):
        read_data("builtin:shfit")


def test_csv_and_parquet_are_read(tmp_path):
    import datasets

    rows = [{"text": "abc", "label": 0}, {"text": "xyz", "label": 1}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("text,label\nabc,0\nxyz,1\n")
    for name in ("d.parquet", "d.csv"):
        raw = read_data(str(tmp_path / name))
        assert raw.format == "classification" and raw.rows == rows


def test_instruction_labels_cover_the_answer_only(tok):
    raw = read_data("builtin:rev", builtin_rows=3)
    enc = encode(raw, tok, max_length=64)
    for row, ex in zip(raw.rows, enc.examples):
        ids, labels = ex["input_ids"], ex["labels"]
        # The chat template renders bos + "rev abc=" + "cba\n" + eos; only "cba\n" + eos is predicted.
        target = [t for t, lab in zip(ids, labels) if lab != IGNORE]
        assert tok.decode(target) == row["output"] + "\n" + tok.eos_token
        prompt = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=True)
        assert prompt == f"rev {row['input']}="


def test_plain_rendering_without_template_matches(tiny_lm_no_template, tok):
    from lorakit.train.model import load_tokenizer

    plain = load_tokenizer(tiny_lm_no_template)
    assert not plain.chat_template
    raw = read_data("builtin:rev", builtin_rows=3)
    a, b = encode(raw, plain, 64), encode(raw, tok, 64)
    assert [e["labels"] for e in a.examples] == [e["labels"] for e in b.examples]
    assert [e["input_ids"] for e in a.examples] == [e["input_ids"] for e in b.examples]


def test_chat_labels_cover_every_assistant_turn(tmp_path, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    raw = read_data(str(write_rows(tmp_path / "c.jsonl", [{"messages": msgs}])))
    ex = encode(raw, tok, 128).examples[0]
    target = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert target == f"a1\n{tok.eos_token}a2\n{tok.eos_token}"


def test_truncation_and_drops_are_counted(tmp_path, tok):
    rows = [{"instruction": "rev", "input": "a" * 40, "output": "b" * 40},  # answer cut short: truncated
            {"instruction": "x" * 70, "input": "", "output": "y"},  # prompt fills max_length: dropped
            {"instruction": "rev", "input": "ab", "output": "ba"}]
    enc = encode(read_data(str(write_rows(tmp_path / "d.jsonl", rows))), tok, max_length=60)
    assert enc.rows == 3 and len(enc.examples) == 2
    assert enc.truncated == 1 and enc.dropped == {"no_target_tokens": 1}
    assert all(len(e["input_ids"]) <= 60 for e in enc.examples)


def test_packing_keeps_every_kept_token(tmp_path, tok):
    # Padding-free packing (tests/train/test_packing.py): rows are truncated as unpacked, then packed whole.
    rows = [{"text": "abcdefghij"[:k]} for k in range(1, 11)] + [{"text": "x" * 30}]
    raw = read_data(str(write_rows(tmp_path / "t.jsonl", rows)))
    plain, packed = encode(raw, tok, 16), encode(raw, tok, 16, packing=True)
    assert plain.truncated == packed.truncated == 1
    assert sum(len(e["input_ids"]) for e in packed.examples) == sum(len(e["input_ids"]) for e in plain.examples)
    assert all(len(e["input_ids"]) <= 16 for e in packed.examples) and len(packed.examples) < len(plain.examples)


def test_label_mapping():
    assert label_mapping([{"label": 2}, {"label": 0}]) == {"0": 0, "1": 1, "2": 2}
    assert label_mapping([{"label": "pos"}, {"label": "neg"}]) == {"neg": 0, "pos": 1}
    assert label_mapping([{"label": "pos"}], {"pos": 1, "neg": 0}) == {"pos": 1, "neg": 0}


def test_directory_header_only_csv_and_empty_parquet_say_so(tmp_path):
    """Each was reported misleadingly: a directory as "does not exist", a header-only CSV and a zero-row
    parquet with datasets' own messages ("corresponds to no data", "BatchSize must be > 0")."""
    import datasets

    with pytest.raises(DataError, match="is a directory"):
        read_data(str(tmp_path))
    (tmp_path / "h.csv").write_text("instruction,output\n\n")
    with pytest.raises(DataError, match="h.csv holds no rows"):
        read_data(str(tmp_path / "h.csv"))
    datasets.Dataset.from_dict({"instruction": [], "output": []}).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match="e.parquet holds no rows"):
        read_data(str(tmp_path / "e.parquet"))
    (tmp_path / "ok.csv").write_text("instruction,output\nsay hi,hi\n")  # one row still reads
    assert read_data(str(tmp_path / "ok.csv")).rows == [{"instruction": "say hi", "output": "hi"}]
