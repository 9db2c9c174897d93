"""Load the model and tokenizer a run trains: a local transformers directory or the embedded one.

The head comes from ``task``: ``causal-lm`` (``AutoModelForCausalLM``) or ``seq-cls``
(``AutoModelForSequenceClassification``); ``auto`` reads the config's ``architectures`` and the data
format. Everything loads with ``local_files_only=True``: lorakit never downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..quant import prepare_for_kbit_training, quantize_model
from ..tasks import embedded_model_dir
from .args import TrainArgs
from .gguf_model import check_gguf_task, gguf_causal_lm, gguf_tokenizer, is_gguf


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
    if is_gguf(path):
        if not path.is_file():
            raise ConfigError(f"--model {spec}: no such GGUF file; pass the path of a local .gguf file.")
        return path, False
    if path.is_dir() and sorted(path.glob("*.gguf")) and not (path / "config.json").is_file():
        raise ConfigError(f"--model {spec}: a directory of GGUF files; pass the .gguf file itself, e.g. "
                          f"--model {sorted(path.glob('*.gguf'))[0]}.")
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


def check_model_class(config, path: Path, task: str) -> None:
    """Refuse, before anything loads, a checkpoint transformers cannot build for ``task``: an
    encoder-decoder such as T5 has no ``AutoModelForCausalLM`` class (transformers' ValueError would
    end the run in a traceback, or the quantized path would build the seq2seq model and fail later)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    seq_cls = task == "seq-cls"
    mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if seq_cls else MODEL_FOR_CAUSAL_LM_MAPPING
    if type(config) in mapping:
        return
    arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    raise ConfigError(
        f"--model {path}: a {getattr(config, 'model_type', '?')!r} model ({arch}) has no "
        f"{'AutoModelForSequenceClassification' if seq_cls else 'AutoModelForCausalLM'} class in transformers. "
        "lorakit's train / eval / generate / merge commands run decoder-only causal LMs (task=causal-lm) and "
        "sequence classifiers (task=seq-cls); adapt an encoder-decoder such as T5 from Python with "
        "lorakit.inject(model, LoraConfig(...)) and your own loop."
    )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if is_gguf(path):
        tokenizer = gguf_tokenizer(path)  # the file's own tokenizer and chat template
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:  # no tokenizer files there: transformers' message names neither
            raise ConfigError(f"--model {path}: no tokenizer could be loaded from it ({type(exc).__name__} in "
                              "transformers; tokenizer.json / tokenizer_config.json missing or broken?); save the "
                              "tokenizer next to the model (tokenizer.save_pretrained(DIR)).") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the usual pick.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(args: TrainArgs, data_format: str | None = None, label2id: dict[str, int] | None = None
               ) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path, embedded = model_dir(args.model)
    gguf = is_gguf(path)
    config = None if gguf else AutoConfig.from_pretrained(path, local_files_only=True)
    task = resolve_task(args.task, getattr(config, "architectures", None), data_format)
    if gguf:
        check_gguf_task(path, task)
    elif args.quant == "gguf":
        raise ConfigError(f"quant=gguf keeps a GGUF file's quantized weights; --model {args.model or '(the embedded model)'} is "
                          "not a .gguf file. Use quant=nf4 (or fp4/int8) for a transformers checkpoint.")
    else:
        check_model_class(config, path, task)
    tokenizer = load_tokenizer(path)
    if args.bf16:
        from ..quant.load_qlora import check_compute_dtype_supported

        check_compute_dtype_supported(torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
    if task == "seq-cls" and label2id is None:
        raise ConfigError("a sequence classifier needs the data's labels; pass classification data.")
    id2label = {i: k for k, i in label2id.items()} if task == "seq-cls" else None
    if gguf:
        model = gguf_causal_lm(path, args.quant, args.bf16)
    elif args.quant != "none":  # quantized as the shards stream in: never a 16/32-bit copy in memory
        model = quantized_model(path, args, task, id2label)
    elif task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, num_labels=len(id2label), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if task == "seq-cls":
        model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    if gguf and args.quant == "gguf":
        from ..quant import prepare_for_kbit_training

        model = prepare_for_kbit_training(model, gradient_checkpointing=args.gradient_checkpointing)
    elif gguf and args.quant != "none":  # a dequantized GGUF model, quantized again
        model = quantize(model, args.quant, args.bf16, args.gradient_checkpointing)
    elif args.quant == "none" and args.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; drop the flag.")
        # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads needed).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return LoadedModel(model, tokenizer, path, task, embedded)


def quantize(model, quant: str, bf16: bool, checkpointing: bool):
    """Quantize an already loaded frozen base (a dequantized GGUF model) with ``lorakit.quant``; the
    output head stays in full precision. Compute runs in bf16 with ``bf16``, else fp32."""
    model = quantize_model(model, quant_type=quant, compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    return prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)


def quantized_model(path: Path, args: TrainArgs, task: str, id2label: dict[int, str] | None):
    """The base loaded with ``lorakit.quant.load_for_qlora``: linear weights quantized on arrival,
    the rest (head, embeddings; norms go to fp32) in the compute dtype — bf16 with ``bf16``, else fp32."""
    from ..quant.load_qlora import load_for_qlora
    from ..quant.malloc import SMALL_TENSORS, lean_allocator

    lean_allocator(SMALL_TENSORS)  # freed tensors go back to the OS instead of piling up in the heap (quant/malloc.py)
    kwargs = {}
    if task == "seq-cls":
        from transformers import AutoModelForSequenceClassification

        kwargs = dict(model_class=AutoModelForSequenceClassification, new_head=("score", "classifier"),
                      config_kwargs=dict(num_labels=len(id2label), id2label=id2label,
                                         label2id={k: i for i, k in id2label.items()}))
    return load_for_qlora(path, quant=args.quant, double_quant=args.double_quant,
                          compute_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                          skip=args.quant_skip or (), modules=args.quant_modules,
                          gradient_checkpointing=args.gradient_checkpointing, **kwargs)
