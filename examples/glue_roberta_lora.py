"""The LoRA paper's NLU setup, offline: RoBERTa sequence classification with LoRA on query and value
only (r = 8, α = 16; Hu et al. 2021, §5.2, Table 2), trained by `lorakit train` on GLUE-format files.

    python examples/glue_roberta_lora.py OUT            # builds OUT/model, OUT/sst2/*.tsv, OUT/mrpc/*.tsv
    lorakit train --config recipes/glue-roberta-lora.yaml --model OUT/model \\
        --data OUT/sst2/train.tsv --eval-data OUT/sst2/dev.tsv --output-dir OUT/run-sst2 \\
        lr=5e-3 batch_size=32 epochs=20 warmup_steps=10 weight_decay=0     # tiny random-init model

Offline there are no pretrained weights: OUT/model is a tiny random-init RoBERTa (2 layers, hidden 64)
with a byte-level BPE tokenizer trained on the generated sentences, and the data are small generated
files in GLUE's own formats (SST-2: ``sentence<TAB>label``; MRPC: ``Quality<TAB>#1 ID<TAB>#2 ID<TAB>
#1 String<TAB>#2 String``). With real data, point --model at a local copy of roberta-base and --data at
GLUE's SST-2/MRPC files; docs/LORALIB.md ("The paper's NLU setup") gives the published numbers.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

POSITIVE = "good great fine lovely superb moving charming witty brilliant warm".split()
NEGATIVE = "bad awful dull boring clumsy tedious flat lifeless weak bland".split()
FILLER = "the film movie plot acting story cast script is was a very quite rather and but with".split()


def sst2_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is the polarity of the one sentiment word they contain."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def mrpc_rows(n: int, seed: int) -> list[tuple[int, str, str]]:
    """Pairs: a paraphrase reorders the same words (label 1), a non-paraphrase changes them (0)."""
    rng = random.Random(seed)
    vocab = FILLER + POSITIVE + NEGATIVE
    rows = []
    for _ in range(n):
        a = rng.sample(vocab, 6)
        label = rng.randint(0, 1)
        b = rng.sample(a, len(a)) if label else rng.sample([w for w in vocab if w not in a], 6)
        rows.append((label, " ".join(a), " ".join(b)))
    return rows


def write_glue(out: Path, n_train: int = 256, n_dev: int = 64) -> None:
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        sst = out / "sst2" / f"{split}.tsv"
        sst.parent.mkdir(parents=True, exist_ok=True)
        sst.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in sst2_rows(n, seed)), encoding="utf-8")
        mrpc = out / "mrpc" / f"{split}.tsv"
        mrpc.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{y}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\n" for i, (y, a, b) in enumerate(mrpc_rows(n, seed))]
        mrpc.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(lines), encoding="utf-8")


def make_tiny_roberta(path: Path, corpus: list[str], seed: int = 0) -> Path:
    """A random-init RobertaForSequenceClassification (2 labels) and a byte-level BPE tokenizer."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))  # vocab.json + merges.txt
    tok = RobertaTokenizerFast(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))  # transformers ≥ 5 names
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=130, num_labels=2,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    RobertaForSequenceClassification(cfg).save_pretrained(path)
    return path


def main(out: Path) -> None:
    write_glue(out)
    corpus = [" ".join(POSITIVE + NEGATIVE + FILLER)] * 4 + [s for s, _ in sst2_rows(256, 0)]
    make_tiny_roberta(out / "model", corpus)
    print(f"wrote {out}/model (tiny random-init RoBERTa), {out}/sst2/{{train,dev}}.tsv, {out}/mrpc/{{train,dev}}.tsv")
    print(f"next: lorakit train --config recipes/glue-roberta-lora.yaml --model {out}/model "
          f"--data {out}/sst2/train.tsv --eval-data {out}/sst2/dev.tsv --output-dir {out}/run-sst2 "
          "lr=5e-3 batch_size=32 epochs=20 warmup_steps=10 weight_decay=0   # tiny-model overrides")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/glue-demo"))
