"""``lorakit export``: write a trained adapter in another tool's format.

    lorakit export runs/default/adapter --format gguf --base SmolLM2.Q4_1.gguf [--out adapter.gguf]

``--format gguf`` writes a llama.cpp LoRA adapter for the base model GGUF ``--base``
(``llama-cli -m BASE --lora OUT``); see ``lorakit.quant.gguf_export`` for the format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("gguf",)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an adapter for another runtime (llama.cpp GGUF LoRA)",
                       description="Convert a lorakit/PEFT LoRA adapter directory for another runtime.")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, help="gguf: a llama.cpp LoRA adapter")
    p.add_argument("--base", required=True, help="the base model's .gguf file (tensor names, architecture)")
    p.add_argument("--out", help="output file (default: ADAPTER/adapter.gguf)")
    p.add_argument("--outtype", default="f32", choices=("f32", "f16"), help="tensor type of the LoRA factors")
    p.set_defaults(run=run_export)


def run_export(ns: argparse.Namespace) -> int:
    from ..quant.gguf_export import export_gguf_adapter

    out = Path(ns.out) if ns.out else Path(ns.adapter) / "adapter.gguf"
    path = export_gguf_adapter(ns.adapter, out, ns.base, out_type=ns.outtype)
    print(f"wrote a llama.cpp LoRA adapter to {path} (use: llama-cli -m {ns.base} --lora {path})")
    return 0
