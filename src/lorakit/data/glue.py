"""GLUE-format files (TSV as distributed by GLUE, or CSV exports) → classification rows.

The LoRA paper's NLU experiments (Hu et al. 2021, §5.2, Table 2) fine-tune RoBERTa on GLUE. GLUE's
files name their columns per task; this module maps them onto lorakit's classification rows
``{"text", "text_pair"?, "label"}``:

    task   columns (GLUE TSV header / HF CSV export)                   → text, text_pair, label
    SST-2  sentence, label                                             → sentence, —, label
    CoLA   sentence, label (a header is needed: GLUE's own CoLA TSV has none)
    MRPC   Quality, #1 ID, #2 ID, #1 String, #2 String                 → #1 String, #2 String, Quality
    QQP    id, qid1, qid2, question1, question2, is_duplicate          → question1, question2, is_duplicate
    QNLI   index, question, sentence, label                           → question, sentence, label
    RTE / WNLI  index, sentence1, sentence2, label                     → sentence1, sentence2, label
    MNLI   …, sentence1, sentence2, …, gold_label (HF: premise, hypothesis, label)

STS-B (a regression score) is refused: lorakit's classifier trains on discrete labels. TSV files
are read without quote handling (GLUE's sentences contain unbalanced quotes), one row per line.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..errors import DataError

PAIRS = (("sentence1", "sentence2"), ("#1 String", "#2 String"), ("question1", "question2"),
         ("question", "sentence"), ("premise", "hypothesis"))
SINGLES = ("sentence",)
LABELS = ("label", "Quality", "is_duplicate", "gold_label")


def is_glue(columns: list[str]) -> bool:
    """True when the columns are GLUE's (and not already lorakit's ``text``/``label``)."""
    cols = set(columns)
    if "text" in cols:
        return False
    has_text = any(a in cols and b in cols for a, b in PAIRS) or any(c in cols for c in SINGLES)
    return has_text and (any(c in cols for c in LABELS) or "score" in cols)


def read_tsv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and header of a tab-separated file with a header line, quotes taken literally."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file; a GLUE TSV starts with a header line (e.g. 'sentence\\tlabel').")
        rows = []
        for n, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path} line {n}: {len(fields)} tab-separated fields, the header has "
                                f"{len(header)} ({', '.join(header)}). Fix the line (a tab inside a sentence?).")
            rows.append(dict(zip(header, fields)))
    return rows, header


def to_classification(rows: list[dict[str, Any]], columns: list[str], source: str) -> tuple[list[dict], list[str]]:
    """GLUE rows → ``{"text", "text_pair"?, "label"}``; integer-like labels become ints."""
    cols = set(columns)
    label = next((c for c in LABELS if c in cols), None)
    if label is None:
        raise DataError(f"{source}: columns {sorted(cols)} look like STS-B (a regression 'score'); lorakit "
                        "trains classifiers on discrete labels. Bin the scores into a 'label' column, or "
                        "use a classification task.")
    pair = next(((a, b) for a, b in PAIRS if a in cols and b in cols), None)
    first = pair[0] if pair else next(c for c in SINGLES if c in cols)
    out = []
    for n, row in enumerate(rows, start=1):
        value = row.get(label)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if value is None or value == "":
            raise DataError(f"{source} row {n}: empty label (field {label!r}); GLUE test files have no labels — "
                            "train and evaluate on train/dev files.")
        new = {"text": row.get(first), "label": value}
        if pair:
            new["text_pair"] = row.get(pair[1])
        out.append(new)
    return out, ["text", "text_pair", "label"] if pair else ["text", "label"]
