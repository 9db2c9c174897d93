"""Single-file LoRAs as kohya-ss/sd-scripts and LyCORIS write them (A1111, ComfyUI, diffusers read them).

One ``.safetensors`` file; per adapted module ``<name>.<suffix>`` tensors (names: ``names.py``;
suffixes per adapter kind: ``kinds.py``) and a scalar ``<name>.alpha``; string metadata ``ss_*``
(kohya's training metadata: ss_network_module, ss_network_dim, ss_network_alpha,
ss_base_model_version, ...). Reading checks every module name and shape against the pipeline and
reports all problems at once; a failed load leaves the pipeline unchanged.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._fs import atomic_write
from ..adapters import set_trainable
from ..errors import AdapterFileError, AdapterNotFoundError, AdapterStateError, ConfigError
from ..io import check_and_copy
from ..state import lora_layers
from ..validate import check_float_tensors
from .components import components_of, family_of
from .config import DiffusionLoraConfig
from .inject import adapter_components, apply_all
from .kinds import FILE_KINDS, classify, kind_for_adapter, tensor_problems
from .names import foreign_base_hint, name_table, write_name

BASE_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
NETWORK_MODULE = {"lora": "networks.lora"}  # LyCORIS kinds: "lycoris.kohya" with ss_network_args algo


# -- save -----------------------------------------------------------------------------------------
def kohya_state_dict(pipe: Any, name: str = "default", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of adapter ``name`` with kohya/LyCORIS keys (SGM names for SDXL's UNet)."""
    check_float_dtype(dtype)  # torch.int8 rounded every factor to 0 (save_kohya checked, this did not)
    components = adapter_components(pipe, name)
    if not components:
        raise AdapterNotFoundError(f"no component of the pipeline holds an adapter named {name!r}.")
    family = family_of(components_of(pipe))
    out: dict[str, torch.Tensor] = {}
    for comp, module in components.items():
        for path, host in lora_layers(module):
            if name not in host.lora:
                continue
            adapter = host.lora[name]
            kind = kind_for_adapter(adapter)
            if kind is None:
                raise AdapterFileError(f"adapter {name!r} on {comp}.{path} is a {type(adapter).__name__}, which "
                                       f"has no kohya/LyCORIS form; kinds with one: {', '.join(FILE_KINDS)}.")
            mod = write_name(comp, path, family, components_of(pipe)["unet"])
            for suffix, t in kind.write(adapter).items():
                out[f"{mod}.{suffix}"] = t.detach().to("cpu", dtype).contiguous().clone()
    return out


def save_kohya(pipe: Any, path: str | Path, name: str = "default", dtype: torch.dtype = torch.float32,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Write adapter ``name`` of ``pipe`` to one kohya/LyCORIS ``.safetensors`` file (atomically)."""
    path = check_save_path(path, "LoRA file")
    check_float_dtype(dtype)
    if metadata is not None and not isinstance(metadata, Mapping):  # a list was an AttributeError
        raise ConfigError(f"metadata={metadata!r:.60}: must be a mapping of names to values (e.g. "
                          "{'ss_output_name': 'my_style'}), not a {type(metadata).__name__}.")
    extra = {}
    for k, v in (metadata or {}).items():
        try:
            extra[str(k)] = v if isinstance(v, str) else json.dumps(v)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metadata[{k!r}]={v!r}: not a string and not JSON-serializable ({exc}); pass strings, "
                              "numbers, lists or dicts.") from None
    tensors = kohya_state_dict(pipe, name, dtype)
    check_finite_for_save(tensors, name, path)
    meta = kohya_metadata(pipe, name, tensors)
    meta.update(extra)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def kohya_metadata(pipe: Any, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    groups = group_modules(tensors)
    kinds = {classify(g).name for g in groups.values()}
    kind = kinds.pop() if len(kinds) == 1 else "lora"
    ranks = [_rank(classify(g).spec(g)) for g in groups.values()]
    alphas = [float(g["alpha"]) for g in groups.values()]
    meta = {
        "ss_network_module": NETWORK_MODULE.get(kind, "lycoris.kohya"),
        "ss_network_dim": str(max(set(ranks), key=ranks.count)),
        "ss_network_alpha": f"{max(set(alphas), key=alphas.count):g}",
        "ss_base_model_version": BASE_VERSION[family_of(components_of(pipe))],
        "ss_v2": "False",
        "lorakit_adapter_kind": kind,
    }
    if kind != "lora":
        meta["ss_network_args"] = json.dumps({"algo": kind})
    return meta


# -- load -----------------------------------------------------------------------------------------
def _rank(spec) -> int:
    return spec[0] if isinstance(spec, tuple) else spec.r


def check_save_path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{what} {path!r:.60}: give the path to write as a str or pathlib.Path.")
    return Path(path)


def check_finite_for_save(tensors: Mapping[str, torch.Tensor], name: str, path: Path) -> None:
    """The loaders refuse NaN/inf factors, so a file holding them (a diverged run, or a factor that overflows
    the save dtype) would be one that neither lorakit nor ComfyUI/A1111 can use: refuse before writing."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and t.numel()
           and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())]
    if bad:
        raise AdapterStateError(f"adapter {name!r} not saved to {path}: its tensors hold NaN or inf values: "
                                f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}. The run diverged (use an earlier "
                                "checkpoint), or the factors overflow the save dtype (save with dtype=torch.float32).")


def check_float_dtype(dtype) -> None:
    """A LoRA file is written in a floating-point dtype: an integer one would round every factor away."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r}: LoRA files are written in a floating-point dtype; use torch.float32, "
                          "torch.float16 or torch.bfloat16.")


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterFileError(f"LoRA file {path!r}: must be a path (str or Path) of a .safetensors file.")
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file; pass the path of a kohya/LyCORIS .safetensors LoRA.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types (header, IO)
        raise AdapterFileError(f"{path}: cannot be read as safetensors ({exc}); the file is damaged or "
                               "not a .safetensors LoRA (convert .ckpt/.pt files with a tool you trust).") from None


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``lora_unet_x.lora_down.weight`` → ``{"lora_unet_x": {"lora_down.weight": …}}``."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        mod, _, suffix = key.partition(".")
        groups[mod][suffix] = t
    return dict(groups)


_UNSUPPORTED_HINTS = {
    "dora_scale": "DoRA (weight-decomposed LoRA) is not implemented in lorakit",
    "hada_t1": "Tucker-decomposed LoHa convolutions (use_tucker) are not implemented; retrain without use_tucker",
    "lokr_t2": "Tucker-decomposed LoKr convolutions (use_tucker) are not implemented; retrain without use_tucker",
    "oft_blocks": "OFT/BOFT is not implemented in lorakit",
    "diff": "full-weight differences ('full' / 'diff' algo) are not adapters lorakit loads",
    "w_norm": "weight-norm training (wd_on_output / norm modules) is not implemented",
}


def _unknown_family(path, mod: str, keys: set[str]) -> AdapterFileError:
    reason = next((h for k, h in _UNSUPPORTED_HINTS.items() if any(x.startswith(k) for x in keys)), None)
    known = "; ".join(f"{k.name}: {', '.join(sorted(k.required))}" for k in FILE_KINDS.values())
    return AdapterFileError(
        f"{path}: module {mod!r} has tensors {sorted(keys)}, a key family lorakit does not read"
        f"{' (' + reason + ')' if reason else ''}. Supported families — {known} (each with an optional "
        "'alpha'). Re-export the LoRA as LoRA/LoCon, LoHa or LoKr without Tucker/DoRA.")


def load_kohya(pipe: Any, path: str | Path, name: str = "default", trainable: bool = False) -> dict[str, nn.Module]:
    """Load a kohya / LyCORIS single-file LoRA into ``pipe`` as adapter ``name`` (active).

    Every module name is resolved against the pipeline (SD 1.x names, SDXL's SGM names, diffusers'
    spelling of both); unknown names, wrong shapes and unknown key families raise one
    ``AdapterFileError`` naming the file and saying what to do; nothing is changed then.
    """
    tensors, _ = read_file(path)
    components = components_of(pipe)
    family = family_of(components)
    groups = group_modules(tensors)
    kinds = {}
    for mod, group in groups.items():
        kind = classify(group)
        if kind is None:
            raise _unknown_family(path, mod, set(group))
        kinds[mod] = kind
    if len({k.name for k in kinds.values()}) > 1:
        raise AdapterFileError(f"{path}: mixes adapter kinds {sorted({k.name for k in kinds.values()})}; lorakit "
                               "loads one kind per file — split the file per kind.")
    if not groups:
        raise AdapterFileError(f"{path}: holds no tensors; it is not a LoRA file.")
    check_tensors(path, groups)
    kind = next(iter(kinds.values()))
    table = name_table(components, family)
    unknown = sorted(m for m in groups if m not in table)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" … (+{len(unknown) - 5})" if len(unknown) > 5 else "")
        raise AdapterFileError(f"{path}: {len(unknown)} module name(s) match nothing in this "
                               f"{family.upper()} pipeline ({shown}); "
                               f"{foreign_base_hint(unknown, family, components)}.")
    plan: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    where: dict[str, str] = {}
    misfits: list[str] = []
    for mod, group in groups.items():
        comp, mpath = table[mod]
        if mpath in plan[comp]:
            raise AdapterFileError(f"{path}: module {comp}.{mpath} appears twice ({where[comp + mpath]} and {mod}); "
                                   "keep one spelling.")
        where[comp + mpath] = mod
        module = components[comp].get_submodule(mpath)
        plan[comp][mpath] = kind.spec(group, module)
        if (why := kind.misfit(plan[comp][mpath], module)) is not None:
            misfits.append(f"{mod} ({comp}.{mpath}): {why}")
    if misfits:
        raise AdapterFileError(f"{path}: {len(misfits)} module(s) do not fit this pipeline:\n  " + "\n  ".join(misfits[:20])
                               + "\nLoad it into the base model it was trained on (SD 1.x / 2.x / SDXL).")
    steps = {}
    for comp, per in plan.items():
        def step(module, comp=comp, per=per):
            kind.inject(module, per, DiffusionLoraConfig(kind=kind.name), name)
            _copy(module, name, kind, {where[comp + p]: groups[where[comp + p]] for p in per}, table, str(path))
            set_trainable(module, name, trainable)
        steps[comp] = step
    apply_all(components, name, steps)
    return {c: components[c] for c in plan}


def check_tensors(path, groups: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Every module's alpha is one finite number > 0 and every factor a finite float 2-D/4-D tensor;
    all problems in one ``AdapterFileError`` naming the file and the keys."""
    problems = [p for mod, group in groups.items() for p in tensor_problems(mod, dict(group))]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise AdapterFileError(f"{path}: {len(problems)} tensor(s) cannot be read:\n  {shown}\nThe file is damaged or "
                               "was not written as a LoRA; export it again (a missing alpha means alpha = rank).")
    check_float_tensors({f"{mod}.{s}": t for mod, group in groups.items() for s, t in group.items() if s != "alpha"},
                        str(path), AdapterFileError, fix="export the LoRA again")


def _copy(module: nn.Module, name: str, kind, groups: Mapping[str, Mapping[str, torch.Tensor]], table, source: str):
    hosts = dict(lora_layers(module))
    expected, given = {}, {}
    for mod, group in groups.items():
        _, mpath = table[mod]
        for suffix, param in kind.params(hosts[mpath].lora[name]).items():
            key = f"{mod}.{suffix}"
            expected[key] = param
            if suffix in group:
                given[key] = _fit(group[suffix], param.shape)
    check_and_copy(expected, given, source, hint="SD 1.x / 2.x / SDXL: the same base model and sizes",
                   required=lambda k, t: True)


def _fit(t: torch.Tensor, shape) -> torch.Tensor:
    """A Linear's (r, in) factor stored for a 1×1 conv (r, in, 1, 1), or the reverse (SD1 vs SD2 proj_in)."""
    if tuple(t.shape) != tuple(shape) and t.numel() == int(torch.Size(shape).numel()):
        core = lambda s: tuple(s[:2])  # noqa: E731
        if core(t.shape) == core(shape) and all(d == 1 for d in (*t.shape[2:], *shape[2:])):
            return t.reshape(shape)
    return t
