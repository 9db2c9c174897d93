"""One call from a local checkpoint to a model ready for QLoRA: quantized *as it loads*.

    load_for_qlora(dir, quant="nf4", double_quant=True, compute_dtype=torch.bfloat16, skip=[...])
      config.json ──► checks (no pre-quantized checkpoint, quantizable modules, bf16 available)
      shards      ──► load_quantized: Linear weights quantized on arrival (never a 16/32-bit model
                      in memory), everything else in ``compute_dtype``
                  ──► prepare_for_kbit_training: frozen, norms in fp32, gradient checkpointing

What stays in 16/32 bit (QLoRA §3 and docs/QUANT.md): the output head, embeddings, norms, a new
classification head, and the modules of ``skip``. ``modules`` narrows what is quantized; naming a
module that is not an ``nn.Linear`` (an embedding, a norm, GPT-2's ``Conv1D``) is refused.

``QLORA_FILE`` records these settings next to a trained adapter, so that ``lorakit merge`` can
rebuild the same quantized base before merging (docs/QUANT.md, "Merging").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, QuantizationError
from .linear import QUANT_TYPES
from .loading import _empty_model, load_quantized
from .model import name_matches, output_head
from .training import prepare_for_kbit_training

QLORA_FILE = "lorakit_quant.json"  # the quantization a QLoRA adapter was trained on
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_qlora(path: str | os.PathLike, quant: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, skip: Iterable[str] = (),
                   modules: Iterable[str] | None = None, blocksize: int = 64, gradient_checkpointing: bool = True,
                   model_class=None, config_kwargs: dict | None = None, new_head: Iterable[str] = (),
                   device: str | torch.device = "cpu", prepare: bool = True) -> nn.Module:
    """Build the model of ``path`` with its linear layers quantized as the shards stream in.

    Args:
        quant: ``nf4`` (QLoRA's), ``fp4``, ``int8`` (symmetric per row) or ``int8_asym``.
        double_quant: quantize the 4-bit formats' absmax values too (QLoRA §3), ≈ 0.37 bit/param less.
        compute_dtype: dtype of the matmuls and of every tensor kept unquantized (fp32 or bf16).
        skip: module paths or suffixes (``down_proj``) kept in 16/32 bit.
        modules: if given, only these (paths or suffixes) are quantized; each must be an ``nn.Linear``.
        new_head: modules the checkpoint lacks (a new classification head): initialized, never quantized.
        prepare: run ``prepare_for_kbit_training`` (freeze, fp32 norms, gradient checkpointing).
    """
    if quant not in QUANT_TYPES:
        raise QuantizationError(f"quant={quant!r} is not a lorakit quantization; use one of "
                                f"{', '.join(QUANT_TYPES)} (or quant=none to train a 16/32-bit base).")
    check_compute_dtype_supported(compute_dtype, device)
    path = Path(path)
    _refuse_prequantized(path)
    skeleton = _empty_model(path, model_class, config_kwargs)
    present = dict(skeleton.named_modules())
    new_head = [n for n in new_head if isinstance(present.get(n), nn.Module)]
    skip = list(skip) + [n for n in new_head if isinstance(present[n], nn.Linear)]
    skip += _not_chosen(skeleton, modules, skip)
    _check_something_to_quantize(skeleton, skip, path)
    del skeleton
    model = load_quantized(path, quant_type=quant, double_quant=double_quant, blocksize=blocksize,
                           compute_dtype=compute_dtype, skip=skip, dtype=compute_dtype, device=device,
                           model_class=model_class, config_kwargs=config_kwargs, init_missing=list(new_head))
    if prepare:
        prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    return model


def check_compute_dtype_supported(dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
    """Refuse bf16 where the device cannot run it (an old GPU; a CPU build without bf16 kernels)."""
    if dtype != torch.bfloat16:
        return
    kind = torch.device(device).type
    if kind == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        ok = _cpu_runs_bf16()
    if not ok:
        raise ConfigError(
            f"bf16 compute is not supported on this {kind.upper()} (no bfloat16 matmul); train with bf16=false "
            "(fp32 compute; for QLoRA: compute_dtype=torch.float32) or on hardware with bf16."
        )


def _cpu_runs_bf16() -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except RuntimeError:
        return False


def _refuse_prequantized(path: Path) -> None:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QuantizationError(f"{path} has no config.json; QLoRA loading needs a local transformers model "
                                "directory (safetensors, sharded or single).")
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    except ValueError as e:
        raise QuantizationError(f"{cfg_file} is not valid JSON: {e}") from None
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise QuantizationError(
            f"{path} is already quantized ({method}; config.json has a quantization_config) — its weights are "
            "packed integers that lorakit cannot re-quantize. Point --model at the 16/32-bit checkpoint, or "
            "dequantize it first and save it with save_pretrained."
        )


def _not_chosen(model: nn.Module, modules: Iterable[str] | None, skip: list[str]) -> list[str]:
    """Linear paths to skip so that only ``modules`` are quantized; refuses non-Linear choices."""
    if modules is None:
        return []
    modules = list(modules)
    named = dict(model.named_modules())
    for name in modules:
        hits = [p for p in named if p and name_matches(p, [name])]
        if not hits:
            raise QuantizationError(f"quant_modules entry {name!r} matches no module of the model; give a module "
                                    "path or its suffix, e.g. 'q_proj'.")
        bad = [p for p in hits if not isinstance(named[p], nn.Linear)]
        if bad:
            kind = type(named[bad[0]]).__name__
            raise QuantizationError(
                f"quant_modules entry {name!r} names {bad[0]} ({kind}); lorakit quantizes nn.Linear weights only "
                f"— a {kind} stays in 16/32 bit (embeddings and norms are quantization-sensitive and small). "
                f"Remove {name!r} from quant_modules."
            )
    head = output_head(model)
    return [p for p, m in named.items()
            if isinstance(m, nn.Linear) and not name_matches(p, modules) and not name_matches(p, skip)
            and m is not head]


def _check_something_to_quantize(model: nn.Module, skip: list[str], path: Path) -> None:
    head = output_head(model)
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if not [p for p in linears if not name_matches(p, skip)]:
        others = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("Conv1D", "Conv2d")})
        why = (f" (its projections are {', '.join(others)}, e.g. GPT-2's Conv1D; lorakit quantizes nn.Linear)"
               if others else "")
        raise QuantizationError(
            f"quantization would leave every layer of {path} in full precision: no nn.Linear to quantize besides "
            f"the output head{why}. Use a model with nn.Linear projections (Llama, Mistral, Qwen, ...), shorten "
            "quant_skip, or train without quant."
        )


# -- the record next to a QLoRA adapter ---------------------------------------------------------------
def qlora_record(quant: str, double_quant: bool, compute_dtype: torch.dtype, skip: Iterable[str] = (),
                 modules: Iterable[str] | None = None, blocksize: int = 64) -> dict[str, Any]:
    return {"quant": quant, "double_quant": bool(double_quant), "blocksize": blocksize,
            "compute_dtype": str(compute_dtype).removeprefix("torch."), "skip": list(skip),
            "modules": None if modules is None else list(modules)}


def read_qlora_record(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The quantization an adapter was trained on (``QLORA_FILE``), or None for a 16/32-bit base."""
    f = Path(adapter_dir) / QLORA_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
        rec["compute_dtype"] = _DTYPES[rec.get("compute_dtype", "bfloat16")]
        if rec.get("quant") not in QUANT_TYPES:
            raise KeyError(f"quant={rec.get('quant')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantizationError(f"{f} is not a lorakit quantization record ({e}); delete it to treat the "
                                "adapter as trained on a 16/32-bit base, or re-save it from training.") from None
    return rec
