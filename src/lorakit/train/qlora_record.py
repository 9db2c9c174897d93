"""The quantization a QLoRA run's adapter was trained on, written next to it (``lorakit_quant.json``)
so that ``lorakit merge`` rebuilds the same quantized base (docs/QUANT.md, "Merging")."""

from __future__ import annotations

from pathlib import Path

import torch

from .._fs import atomic_write_json
from ..quant.load_qlora import QLORA_FILE, qlora_record
from .args import TrainArgs


def write_qlora_record(adapter_dir: Path, args: TrainArgs) -> Path:
    rec = qlora_record(args.quant, args.double_quant, torch.bfloat16 if args.bf16 else torch.float32,
                       args.quant_skip or (), args.quant_modules)
    path = Path(adapter_dir) / QLORA_FILE
    atomic_write_json(path, rec)
    return path
