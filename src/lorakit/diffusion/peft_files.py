"""diffusers / PEFT LoRA files: ``pytorch_lora_weights.safetensors`` with ``unet.`` / ``text_encoder.`` /
``text_encoder_2.`` prefixes, as ``pipe.save_lora_weights`` writes and ``pipe.load_lora_weights`` reads.

    unet.<path>.lora_A.weight   (r, in[, k, k])      unet.<path>.lora_B.weight   (out, r[, 1, 1])

α goes into the safetensors metadata ``lora_adapter_metadata`` (a JSON dict of PEFT ``LoraConfig``
fields per component, ``{"unet.r": …, "unet.lora_alpha": …, "unet.alpha_pattern": …}``), which
diffusers ≥ 0.34 reads. ``fold_alpha=True`` instead folds α/r into ``lora_B`` (α = r), for readers
that ignore the metadata — the same ΔW either way.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._fs import atomic_write
from ..adapter_kinds.lora import LoraAdapter
from ..adapters import set_trainable
from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterNotFoundError
from ..io import check_and_copy
from ..state import lora_layers
from ..validate import check_bool
from .components import components_of
from .config import DiffusionLoraConfig, lora_config_for
from .inject import adapter_components, apply_all
from .kinds import FILE_KINDS, effective_scaling, tensor_problems
from .kohya import _fit, check_finite_for_save, check_float_dtype, check_save_path, check_tensors, read_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def save_diffusers(pipe: Any, directory: str | Path, name: str = "default", fold_alpha: bool = False,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write adapter ``name`` as ``<directory>/pytorch_lora_weights.safetensors`` (atomically)."""
    directory = check_save_path(directory, "LoRA directory")
    check_bool("fold_alpha", fold_alpha)  # "no" folded α/r into lora_B
    check_float_dtype(dtype)
    components = adapter_components(pipe, name)
    if not components:
        raise AdapterNotFoundError(f"no component of the pipeline holds an adapter named {name!r}.")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for comp, module in components.items():
        per: dict[str, tuple[int, float]] = {}
        for path, host in lora_layers(module):
            if name not in host.lora:
                continue
            adapter = host.lora[name]
            if not isinstance(adapter, LoraAdapter):
                raise AdapterFileError(f"adapter {name!r} on {comp}.{path} is a {type(adapter).__name__}; the "
                                       "diffusers file format holds plain LoRA — use save_kohya (LyCORIS keys).")
            r = adapter.lora_A.shape[0]
            alpha = effective_scaling(adapter) * r
            for suffix, t in adapter.peft_tensors(host.kind).items():
                t = t.detach().to("cpu", torch.float32)
                if fold_alpha and suffix.startswith("lora_B"):
                    t = t * (alpha / r)
                tensors[f"{comp}.{path}.{suffix}"] = t.to(dtype).contiguous()
            per[path] = (r, float(r) if fold_alpha else alpha)
        cfg = lora_config_for(per).to_peft_dict()
        meta.update({f"{comp}.{k}": v for k, v in cfg.items()})
    out = directory / WEIGHT_NAME
    check_finite_for_save(tensors, name, out)
    header = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True, default=list)}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=header))
    return out


def load_diffusers(pipe: Any, path: str | Path, name: str = "default", trainable: bool = False) -> dict[str, nn.Module]:
    """Load a diffusers/PEFT-format LoRA (a file, or a directory holding ``pytorch_lora_weights.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    tensors, header = read_file(path)
    meta = _metadata(path, header)
    components = components_of(pipe)
    lora = FILE_KINDS["lora"]
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    alphas: dict[tuple[str, str], float] = {}
    problems = []
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", rest)
        if comp not in components:
            problems.append(f"{key}: component {comp!r} is not in this pipeline (it has {sorted(components)})")
        elif rest.endswith(".alpha"):
            mpath = _resolve(components[comp], rest[: -len('.alpha')])
            missing = _missing(components[comp], comp, mpath)
            bad = tensor_problems(key[: -len(".alpha")], {"alpha": t}) + ([f"{key}: {missing}"] if missing else [])
            problems += bad
            if not bad:
                alphas[(comp, mpath)] = float(t)
        elif m is None:
            problems.append(f"{key}: not a LoRA tensor (expected <component>.<path>.lora_A/lora_B.weight)")
        elif (bad := _missing(components[comp], comp, _resolve(components[comp], m[1]))) is not None:
            problems.append(f"{key}: {bad}")
        else:
            groups[comp][_resolve(components[comp], m[1])][f"{m[2]}.weight"] = t
    problems += [f"{comp}.{mpath}.alpha: the file has no lora_A/lora_B for this module" for comp, mpath in alphas
                 if comp not in groups or mpath not in groups[comp]]
    if problems:
        raise AdapterFileError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20])
                               + "\nIs it a LoRA for another pipeline (SD 1.x / SDXL / another model)?")
    if not groups:  # load_kohya refuses an empty file; this one loaded nothing and said nothing
        raise AdapterFileError(f"{path}: holds no LoRA tensors (<component>.<path>.lora_A/lora_B.weight); it is not a "
                               "diffusers LoRA file.")
    check_tensors(path, {f"{comp}.{mpath}": g for comp, per in groups.items() for mpath, g in per.items()})
    steps = {}
    for comp, per_path in groups.items():
        cfg = LoraConfig.from_peft_dict(meta[comp], source=f"{path} metadata {comp}") if comp in meta else None
        if cfg is not None and cfg.use_dora:  # read as plain LoRA before: the magnitude vector silently dropped
            raise AdapterFileError(f"{path}: metadata {METADATA_KEY} says {comp}.use_dora=true; DoRA diffusion LoRAs "
                                   "are not implemented in lorakit — load it with diffusers/PEFT, or retrain as LoRA.")
        plan = {}
        for mpath, g in per_path.items():
            if "lora_A.weight" not in g:
                raise AdapterFileError(f"{path}: {comp}.{mpath} has lora_B but no lora_A; the file is incomplete.")
            r = int(g["lora_A.weight"].shape[0])
            alpha = alphas.get((comp, mpath), cfg.alpha_for(mpath) if cfg else float(r))
            if cfg is not None and cfg.use_rslora:  # rsLoRA (Kalajdzievski 2023): s = α/√r = (α·√r)/r
                alpha *= math.sqrt(r)
            plan[mpath] = (r, alpha)

        def step(module, comp=comp, plan=plan, per_path=per_path):
            lora.inject(module, plan, DiffusionLoraConfig(), name)
            hosts = dict(lora_layers(module))
            expected, given = {}, {}
            for mpath, g in per_path.items():
                for suffix, param in hosts[mpath].lora[name].peft_tensors(hosts[mpath].kind).items():
                    expected[f"{comp}.{mpath}.{suffix}"] = param
                    if suffix in g:
                        given[f"{comp}.{mpath}.{suffix}"] = _fit(g[suffix], param.shape)
            check_and_copy(expected, given, str(path), required=lambda k, t: True)
            set_trainable(module, name, trainable)
        steps[comp] = step
    apply_all(components, name, steps)
    return {c: components[c] for c in groups}


def _metadata(path: Path, header: dict[str, str]) -> dict[str, dict]:
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: metadata {METADATA_KEY} is not valid JSON ({exc}); re-save the LoRA.") from None
    if not isinstance(flat, dict):
        raise AdapterFileError(f"{path}: metadata {METADATA_KEY} must be a JSON object of LoraConfig fields per "
                               f"component ({{\"unet.r\": …}}), not a {type(flat).__name__}; re-save the LoRA.")
    out: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        out[comp][field] = value
    return dict(out)


def _missing(module: nn.Module, comp: str, path: str) -> str | None:
    """Why ``path`` names no module of the component (None: it names one)."""
    try:
        module.get_submodule(path)
    except AttributeError:
        return f"{comp} has no module {path!r} (a LoRA for another base model?)"
    return None


def _resolve(module: nn.Module, path: str) -> str:
    """A text encoder path written with transformers < 5's ``text_model.`` level, mapped onto this model."""
    if path.startswith("text_model.") and not hasattr(module, "text_model"):
        return path[len("text_model."):]
    return path
