"""Save an adapter that started from PiSSA / OLoRA as a plain LoRA against the ORIGINAL weights
(PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

PiSSA and OLoRA train against the residual W_res = W − s·B0·A0 (``adapter_kinds/weight_inits.py``),
so their adapter only fits the residual model. With the factors at the start (A0, B0) saved first,

    W_res + s·B·A = W + s·(B·A − B0·A0) = W + s·[B | −B0]·[A ; A0]

is a LoRA of rank 2r on W itself: A' = [A ; A0] (2r, fan_in), B' = [B | −B0] (fan_out, 2r). The
file keeps the scaling: r' = 2r and α' = 2α (α·√2 under rsLoRA, where s = α/√r); rank and alpha
patterns likewise. Any plain LoRA reader (PEFT, lorakit) then applies it to the untouched base.
Exact up to rounding; on a quantized base the difference Q(W_res) vs Q(W) remains (PEFT warns too).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFileError, AdapterStateError, OutputError
from .io import (
    adapter_tensors,
    normalize_key,
    peft_config_dict,
    read_adapter_weights,
    write_adapter_dir,
)
from .state import require_adapter


def initial_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A copy of adapter ``adapter_name``'s A and B factors now (PEFT keys): call it right after the
    adapter was created, and pass the result to :func:`save_as_lora` as ``initial_path``."""
    return {k: v.detach().float().cpu().clone() for k, v in adapter_tensors(model, adapter_name).items()
            if k.endswith((".lora_A.weight", ".lora_embedding_A", ".lora_B.weight", ".lora_embedding_B"))}


def save_as_lora(model: nn.Module, path: str | Path, initial_path: str | Path | Mapping[str, torch.Tensor],
                 adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` to ``path`` as a rank-2r LoRA on the original weights.

    ``initial_path`` is a directory where the same adapter was saved (``lorakit.save_adapter`` or PEFT)
    right after it was created, before any training: it holds A0 and B0 — or those tensors themselves,
    as :func:`initial_factors` returned them. Returns ``path``.
    """
    rec = require_adapter(model, adapter_name)
    config = rec.config
    if isinstance(path, (str, os.PathLike)) and isinstance(initial_path, (str, os.PathLike)) \
            and Path(path).resolve() == Path(initial_path).resolve():
        # the converted adapter would replace A0/B0, the only record of the start it is converted against
        raise OutputError(f"{path}: is initial_path itself; writing there would replace the initial adapter "
                          "(A0, B0). Save the converted LoRA to another directory.")
    if getattr(config, "use_dora", False) or rec.kind != "lora":
        raise AdapterStateError(
            f"adapter {adapter_name!r} is a {'DoRA' if getattr(config, 'use_dora', False) else rec.kind} adapter: "
            "only plain LoRA factors can be rewritten against the original weights (a magnitude or another "
            "parametrisation has no rank-2r LoRA form). Train a plain LoRA adapter with init_lora_weights='pissa'/'olora'."
        )
    initial = {}
    start_tensors = initial_path if isinstance(initial_path, Mapping) else read_adapter_weights(initial_path)
    for key, value in start_tensors.items():
        norm = normalize_key(key)
        if norm is not None:
            initial[norm] = value
    now = {k: v.detach().float().cpu() for k, v in adapter_tensors(model, adapter_name).items()}
    problems, tensors = [], {}
    for key, value in now.items():
        is_a = key.endswith((".lora_A.weight", ".lora_embedding_A"))
        is_b = key.endswith((".lora_B.weight", ".lora_embedding_B"))
        if not (is_a or is_b):
            tensors[key] = value.contiguous()  # modules_to_save copies, biases: as they are
            continue
        start = initial.get(key)
        if start is None:
            problems.append(f"missing tensor {key} {tuple(value.shape)}")
        elif tuple(start.shape) != tuple(value.shape):
            problems.append(f"{key}: file has shape {tuple(start.shape)}, the adapter has {tuple(value.shape)}")
        elif is_a:  # A' = [A ; A0]: (2r, fan_in…)
            tensors[key] = torch.cat([value, start.float()], dim=0).contiguous()
        else:  # B' = [B | −B0]: (fan_out, 2r…)
            tensors[key] = torch.cat([value, -start.float()], dim=1).contiguous()
    if problems:
        where = "the initial factors" if isinstance(initial_path, Mapping) else str(initial_path)
        raise AdapterFileError(
            f"{where}: this is not the initial state of adapter {adapter_name!r} "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:40])
            + "\nPass the directory saved right after the adapter was created, before training."
        )
    data = peft_config_dict(model, adapter_name, config)
    factor = math.sqrt(2.0) if config.use_rslora else 2.0  # keeps s = α/r (or α/√r) unchanged
    data["r"] = 2 * config.r
    data["lora_alpha"] = config.lora_alpha * factor
    data["rank_pattern"] = {k: 2 * v for k, v in config.rank_pattern.items()}
    data["alpha_pattern"] = {k: v * factor for k, v in config.alpha_pattern.items()}
    data["init_lora_weights"] = True
    path = Path(path)
    write_adapter_dir(path, tensors, data)
    return path
