"""Load the model and tokenizer a run trains: a local transformers directory or the embedded one.

The head comes from ``task``: ``causal-lm`` (``AutoModelForCausalLM``) or ``seq-cls``
(``AutoModelForSequenceClassification``); ``auto`` reads the config's ``architectures`` and the data
format. Everything loads with ``local_files_only=True``: lorakit never downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..quant import prepare_for_kbit_training, quantize_model
from ..tasks import embedded_model_dir
from .args import TrainArgs


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path
    task: str  # "causal-lm" or "seq-cls"
    embedded: bool


def model_dir(spec: str | None) -> tuple[Path, bool]:
    """The directory of ``spec`` (None = the embedded model) and whether it is the embedded one."""
    if spec is None:
        return embedded_model_dir(), True
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {spec}: not a local transformers model directory (no config.json there). lorakit "
            "works offline: download the model first (e.g. `huggingface-cli download NAME --local-dir DIR`) "
            "and pass DIR."
        )
    return path, False


def resolve_task(requested: str, architectures: list[str] | None, data_format: str | None) -> str:
    if requested == "auto":
        if any(a.endswith("ForSequenceClassification") for a in architectures or []):
            requested = "seq-cls"
        else:
            requested = "seq-cls" if data_format == "classification" else "causal-lm"
    if requested == "seq-cls" and data_format not in (None, "classification"):
        raise ConfigError(f"task=seq-cls needs classification rows (text, label); the data has {data_format} "
                          "rows. Use task=causal-lm for them.")
    if requested == "causal-lm" and data_format == "classification":
        raise ConfigError("classification rows (text, label) need a sequence classifier: pass task=seq-cls "
                          "(or --task seq-cls).")
    return requested


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the usual pick.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(args: TrainArgs, data_format: str | None = None, label2id: dict[str, int] | None = None
               ) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path, embedded = model_dir(args.model)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    task = resolve_task(args.task, getattr(config, "architectures", None), data_format)
    tokenizer = load_tokenizer(path)
    if task == "seq-cls":
        if label2id is None:
            raise ConfigError("a sequence classifier needs the data's labels; pass classification data.")
        id2label = {i: k for k, i in label2id.items()}
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, num_labels=len(id2label), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True,
        )
        model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if args.quant != "none":
        model = quantize(model, args.quant, args.bf16, args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; drop the flag.")
        # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads needed).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return LoadedModel(model, tokenizer, path, task, embedded)


def quantize(model, quant: str, bf16: bool, checkpointing: bool):
    """Quantize the frozen base with ``lorakit.quant``; the output head stays in full precision. Compute runs in bf16 with ``bf16``, else fp32."""
    import torch

    model = quantize_model(model, quant_type=quant, compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    return prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)
