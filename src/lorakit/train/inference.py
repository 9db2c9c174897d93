"""Load a base model (HF directory, GGUF file or the embedded model) with an adapter, frozen, for
inference: ``lorakit eval / merge / generate`` and the forgetting harness (``eval/forgetting.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdapterFileError, ConfigError
from ..io import load_adapter, read_adapter_config
from ..tasks import embedded_model_dir
from .gguf_model import gguf_causal_lm, is_gguf
from .model import check_model_class, load_tokenizer, model_dir

LABELS_FILE = "lorakit_labels.json"  # label2id of a classifier's adapter, written next to it


def base_of(adapter: str | None, model: str | None) -> str | None:
    """The base model: ``--model``, else the adapter's ``base_model_name_or_path`` (None = embedded)."""
    if model is not None or adapter is None:
        return model

    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFileError(f"{Path(adapter) / 'adapter_config.json'}: base_model_name_or_path={base!r:.60} must "
                               "be a path string or null; fix the field, or pass --model DIR.")
    if base and ((Path(base) / "config.json").is_file() or (is_gguf(base) and Path(base).is_file())):
        return base

    if base and Path(base).resolve() == embedded_model_dir(check=False).resolve():
        return None
    if not base:
        raise ConfigError(f"{adapter}: adapter_config.json names no base model (base_model_name_or_path is "
                          f"{base!r}); pass --model DIR.")
    raise ConfigError(f"{adapter}: its base model {base!r} is not a local directory; pass --model DIR.")


def load_for_inference(model: str | None, adapter: str | None):
    """(model, tokenizer, task) with the adapter loaded (frozen) when one is given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification


    path, _ = model_dir(base_of(adapter, model))
    tokenizer = load_tokenizer(path)
    labels_file = Path(adapter) / LABELS_FILE if adapter else None
    if is_gguf(path):  # a causal LM, dequantized (merge/eval/generate want plain weights)
        net = gguf_causal_lm(path, "none")
        if adapter is not None:
            load_adapter(net, adapter)
        return net.eval(), tokenizer, "causal-lm"
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    is_cls = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    check_model_class(config, path, "seq-cls" if is_cls or (labels_file is not None and labels_file.is_file())
                      else "causal-lm")
    if labels_file is not None and labels_file.is_file():
        label2id = json.loads(labels_file.read_text())
        net = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, num_labels=len(label2id), label2id=label2id,
            id2label={v: k for k, v in label2id.items()}, ignore_mismatched_sizes=True)
        net.config.pad_token_id = tokenizer.pad_token_id
        task = "seq-cls"
    elif is_cls:
        net = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        net.config.pad_token_id = tokenizer.pad_token_id
        task = "seq-cls"
    else:
        net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        task = "causal-lm"
    if adapter is not None:
        load_adapter(net, adapter)
    net.eval()
    return net, tokenizer, task
