"""``lorakit merge`` for a QLoRA adapter (one with ``lorakit_quant.json``): rebuild the quantized base
it was trained on, load the adapter, and merge.

* default — dequantize → add → 16/32-bit export: W' = dequantize(W_q) + ΔW in the run's compute dtype,
  exactly the function the adapter was trained against (``lorakit.quant.dequantize_and_merge``);
* ``requantize=True`` — W' quantized again in the base's format (``requantized_merge``), which adds a
  rounding error: it is measured per layer, printed, and written to ``lorakit_requant_report.json``.
  The checkpoint stores the requantized weights dequantized (a plain transformers checkpoint, loadable
  anywhere); loading it with ``quant=`` rebuilds a 4-bit model of (nearly) the same codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._fs import atomic_dir, atomic_write_json

REPORT_FILE = "lorakit_requant_report.json"


def merge_qlora(adapter: str, out: str, base: str, record: dict[str, Any], requantize: bool = False,
                labels_file: str = "lorakit_labels.json") -> tuple[Path, Any]:
    """Merge a QLoRA ``adapter`` into its quantized base (the directory ``base``, resolved by the caller);
    returns (output dir, requant report or None)."""
    from ..io import load_adapter
    from ..quant.load_qlora import load_for_qlora
    from ..quant.merge import dequantize_and_merge, requantized_merge
    from .model import load_tokenizer, model_dir

    path, _ = model_dir(base)
    dtype = record["compute_dtype"]
    kwargs: dict[str, Any] = {}
    labels = Path(adapter) / labels_file
    if labels.is_file():  # a classifier: rebuild its (new) head, the adapter file fills it
        from transformers import AutoModelForSequenceClassification

        label2id = json.loads(labels.read_text())
        kwargs = dict(model_class=AutoModelForSequenceClassification, new_head=("score", "classifier"),
                      config_kwargs=dict(num_labels=len(label2id), label2id=label2id,
                                         id2label={v: k for k, v in label2id.items()}))
    net = load_for_qlora(path, quant=record["quant"], double_quant=record["double_quant"],
                         blocksize=record.get("blocksize", 64), compute_dtype=dtype, skip=record.get("skip") or (),
                         modules=record.get("modules"), prepare=False, **kwargs)
    load_adapter(net, adapter)
    report = None
    if requantize:
        net, report = requantized_merge(net)
        net = dequantize_and_merge(net, dtype=dtype)  # the requantized weights, stored dense
    else:
        net = dequantize_and_merge(net, dtype=dtype)
    net = net.to(dtype)
    net.config.torch_dtype = dtype
    tokenizer = load_tokenizer(path)
    target = Path(out)
    with atomic_dir(target) as tmp:  # the previous --out (or none) until the whole checkpoint is written
        net.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if report is not None:
            atomic_write_json(tmp / REPORT_FILE, {"quant": record["quant"], "mean": report.mean, "max": report.max,
                                                  "per_layer": report.per_layer})
    return target, report
