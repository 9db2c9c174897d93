"""loralib checkpoints in and out of lorakit-injected models (and on to PEFT's format).

A loralib checkpoint is what ``torch.save(lora.lora_state_dict(model), path)`` wrote: a dict of
``<module path>.lora_A`` / ``<module path>.lora_B`` tensors (sometimes wrapped as
``{"model_state_dict": ...}``, as the LoRA repository's GPT-2 script saves it), optionally biases
and a trained head. It carries no α and no config: the caller gives ``lora_alpha`` (the scaling is
α/r with r read from the shapes) and, for ``MergedLinear`` layers, which slices were adapted.

Loading injects a LoRA adapter into exactly the modules the file names, checks every tensor against
the model first and reports every mismatch at once (nothing changes on failure), then copies. A
``MergedLinear`` pair (A (k·r, in), B (k·d, r)) becomes a ``fused_slices`` adapter (the same layout,
``lorakit/adapter_kinds/sliced.py``); ``lorakit.save_adapter`` then writes the PEFT form, which PEFT
loads with the same outputs. Files are read with ``torch.load(weights_only=True)`` (or safetensors);
nothing else is unpickled.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._fs import atomic_write
from ..adapter_kinds.sliced import slice_rows
from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError
from ..inject import candidate_modules, inject_adapter
from ..io import install_adapter
from ..layers.host import LoraLayer
from ..layers.kinds import kind_of
from ..state import lora_layers, trainable_copies
from ..validate import check_float_tensors
from .utils import lora_state_dict

_WRAPPERS = ("model_state_dict", "state_dict", "model")


# -- reading --------------------------------------------------------------------------------------
def read_checkpoint(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a loralib checkpoint: a path (``.pt``/``.bin``/``.pth`` via
    ``torch.load(weights_only=True)``, or ``.safetensors``) or an in-memory dict."""
    if isinstance(source, Mapping):
        data, where = dict(source), "the given state dict"
    elif not isinstance(source, (str, Path)) and not hasattr(source, "__fspath__"):
        raise AdapterFileError(f"checkpoint={source!r:.60}: pass a file path (.pt/.bin/.safetensors) or the dict "
                               "lora.lora_state_dict(model) returns.")
    else:
        path, where = Path(source), str(source)
        if not path.is_file():
            raise AdapterFileError(f"{path}: no such file; pass the .pt/.bin written by torch.save(lora_state_dict(model)).")
        data = _load_file(path)
    for key in _WRAPPERS:  # {"model_state_dict": {...}} as examples/NLG/src/gpt2_ft.py saves it
        if set(data) == {key} and isinstance(data[key], Mapping):
            data = dict(data[key])
    bad = sorted(k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise AdapterFileError(
            f"{where}: entries {bad[:10]} are not tensors; a loralib checkpoint is a flat dict of tensors "
            "(torch.save(lora.lora_state_dict(model), path)). Save just that dict."
        )
    if all(k.startswith("module.") for k in data):  # saved from a DistributedDataParallel wrapper
        data = {k[len("module."):]: v for k, v in data.items()}
    # the factors as adapter files have them: floating point and finite (a NaN would load silently)
    check_float_tensors({k: v for k, v in data.items() if k.rpartition(".")[2] in ("lora_A", "lora_B")}, where,
                        AdapterFileError)
    return data


def _first_line(exc: BaseException) -> str:
    """The informative part of torch.load's message (its 'WeightsUnpickler error' line if any)."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (found.group(1).strip() if found else lines[0] if lines else type(exc).__name__)[:200]


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise AdapterFileError(f"{path}: not a readable safetensors file ({exc}).") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated or non-torch file
        raise AdapterFileError(f"{path}: not a readable torch.save file ({_first_line(exc)}); "
                               "the file is damaged or not a checkpoint.") from None
    except (pickle.UnpicklingError, AttributeError, TypeError) as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise AdapterFileError(f"{path}: not a readable torch.save file ({_first_line(exc)}); the file is "
                                   "damaged or not a checkpoint.") from None
        raise AdapterFileError(
            f"{path}: torch.load(weights_only=True) refused it — the pickle needs more than tensors (it "
            f"references {found.group(1)}). lorakit never runs arbitrary pickles: in the code that made it (and "
            "that you trust), re-save only the tensors, e.g. torch.save(dict(lora.lora_state_dict(model)), "
            "path), or convert the file to safetensors."
        ) from None
    if not isinstance(data, Mapping):
        raise AdapterFileError(f"{path}: holds a {type(data).__name__}, not a dict of tensors; save "
                               "lora.lora_state_dict(model) instead.")
    return dict(data)


# -- planning -------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What loading a checkpoint into a model will do; built before anything changes."""

    ranks: dict[str, int] = field(default_factory=dict)  # path -> r (per slice for a MergedLinear)
    fused: dict[str, list[bool]] = field(default_factory=dict)  # path -> enable_lora (MergedLinear layers)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # path -> (A, B) as in the file
    copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save path -> {param: t}
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> bias
    problems: list[str] = field(default_factory=list)


def _enable_for(path: str, enable_lora: Mapping[str, Sequence[bool]] | None) -> list[bool] | None:
    for name, enable in (enable_lora or {}).items():
        if path == name or path.endswith("." + name):
            return [bool(e) for e in enable]
    return None


def _fan(module: nn.Module) -> tuple[int, int] | None:
    """(fan_in, fan_out) of a base module loralib can adapt; None for other types."""
    kind = kind_of(module)
    if kind is None or kind.name not in ("linear", "conv1d_gpt2", "embedding"):
        return None
    if kind.name == "embedding":
        return module.num_embeddings, module.embedding_dim
    return kind.dims(module)


def plan_load(model: nn.Module, tensors: Mapping[str, torch.Tensor],
              enable_lora: Mapping[str, Sequence[bool]] | None = None,
              modules_to_save: Sequence[str] | None = None) -> _Plan:
    plan = _Plan()
    modules = dict(candidate_modules(model))
    # modules_to_save names match module paths as target_modules do (exact path or ".name" suffix)
    saved = [p for p in modules for n in modules_to_save or [] if p == n or p.endswith("." + n)]
    for name in modules_to_save or []:
        if not any(p == name or p.endswith("." + name) for p in modules):
            plan.problems.append(f"modules_to_save {name!r}: the model has no such module")
    for name in enable_lora or {}:  # a typo would silently load a fused layer as a plain one
        if not any(p == name or p.endswith("." + name) for p in modules):
            plan.problems.append(f"enable_lora {name!r}: the model has no such module")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, _, leaf = key.rpartition(".")
        owner = next((p for p in saved if key.startswith(p + ".")), None)
        if leaf in ("lora_A", "lora_B"):
            pairs.setdefault(stem, {})[leaf] = t
        elif owner is not None:
            plan.copies.setdefault(owner, {})[key[len(owner) + 1:]] = t
        elif leaf == "bias":
            plan.biases[stem] = t
        else:
            plan.problems.append(
                f"{key} {tuple(t.shape)}: not a LoRA tensor (…lora_A / …lora_B), a bias or a modules_to_save "
                "tensor; pass only lora.lora_state_dict(model), or name its module in modules_to_save=[...]"
            )
    if not pairs:
        plan.problems.append("no …lora_A / …lora_B tensors at all: is this a loralib lora_state_dict checkpoint?")
    for path, ab in sorted(pairs.items()):
        _plan_pair(plan, path, ab, modules, enable_lora)
    for path, params in plan.copies.items():
        module = modules[path]
        own = dict(module.state_dict())
        for name in sorted(set(own) - set(params)):
            plan.problems.append(f"missing tensor {path}.{name} {tuple(own[name].shape)} of modules_to_save {path}")
        for name, t in params.items():
            if name not in own:
                plan.problems.append(f"{path}.{name} {tuple(t.shape)}: module {path} has no tensor {name!r}")
            elif tuple(own[name].shape) != tuple(t.shape):
                plan.problems.append(f"{path}.{name}: file has shape {tuple(t.shape)}, model expects {tuple(own[name].shape)}")
    for path, t in plan.biases.items():
        module = modules.get(path)
        b = getattr(module.base_layer if isinstance(module, LoraLayer) else module, "bias", None)
        if not isinstance(b, nn.Parameter):
            plan.problems.append(f"{path}.bias {tuple(t.shape)}: the model has no module {path} with a bias")
        elif b.shape != t.shape:
            plan.problems.append(f"{path}.bias: file has shape {tuple(t.shape)}, model expects {tuple(b.shape)}")
    return plan


def _plan_pair(plan: _Plan, path: str, ab: dict[str, torch.Tensor], modules: dict[str, nn.Module],
               enable_lora) -> None:
    a, b = ab.get("lora_A"), ab.get("lora_B")
    if a is None or b is None:
        have, miss = ("lora_A", "lora_B") if b is None else ("lora_B", "lora_A")
        plan.problems.append(f"{path}: has {have} but no {miss}; the checkpoint is incomplete")
        return
    module = modules.get(path)
    if module is None:
        plan.problems.append(f"{path}.lora_A {tuple(a.shape)}: the model has no module {path}")
        return
    base = module.base_layer if isinstance(module, LoraLayer) else module
    fan = _fan(base)
    if fan is None:
        plan.problems.append(
            f"{path}: a {type(base).__name__}; loralib checkpoints load into Linear, GPT-2 Conv1D and Embedding "
            "layers (loralib's conv factors have no lorakit/PEFT equivalent)"
        )
        return
    fan_in, fan_out = fan
    enable = _enable_for(path, enable_lora)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in:
        plan.problems.append(f"{path}: lora_A has shape {tuple(a.shape)}, the module expects (r, {fan_in})")
        return
    if enable is None:
        r = a.shape[0]
        if tuple(b.shape) != (fan_out, r):
            hint = ""
            if b.shape[1] and r % b.shape[1] == 0 and b.shape[0] < fan_out:
                k = r // b.shape[1]  # MergedLinear: A (k·r, in), B (k·d, r) for k enabled slices
                hint = (f" — a MergedLinear layout with {k} adapted slice(s)? pass enable_lora="
                        f"{{'{path.rpartition('.')[2]}': [...]}}, one bool per fused block, e.g. [True, False, True]")
            plan.problems.append(f"{path}: lora_B has shape {tuple(b.shape)}, expected ({fan_out}, {r}){hint}")
            return
        plan.ranks[path], plan.pairs[path] = r, (a, b)
        return
    if not any(enable):
        plan.problems.append(f"{path}: enable_lora {enable} enables no slice, yet the file has factors for it")
        return
    try:
        rows = slice_rows(fan_out, enable, 1, where=path)
    except ConfigError as exc:
        plan.problems.append(str(exc))
        return
    k, d = len(rows), rows[0].numel()
    if a.shape[0] % k or tuple(b.shape) != (k * d, a.shape[0] // k):
        plan.problems.append(
            f"{path}: with enable_lora={enable} lora_A/lora_B should be ({k}·r, {fan_in}) / ({k * d}, r); "
            f"the file has {tuple(a.shape)} / {tuple(b.shape)}"
        )
        return
    plan.ranks[path], plan.fused[path], plan.pairs[path] = a.shape[0] // k, enable, (a, b)


# -- loading --------------------------------------------------------------------------------------
def load_lora_state_dict(model: nn.Module, checkpoint, lora_alpha: float, adapter_name: str = "default",
                         enable_lora: Mapping[str, Sequence[bool]] | None = None,
                         modules_to_save: Sequence[str] | None = None, trainable: bool = False) -> nn.Module:
    """Load a loralib checkpoint into ``model`` (a plain transformers/PyTorch model) as lorakit adapter
    ``adapter_name``, in place; returns the model.

    Args:
        checkpoint: a path or a dict (see :func:`read_checkpoint`).
        lora_alpha: the α the checkpoint was trained with (loralib files do not store it); each
            module's scaling is α/r with r from its lora_A.
        enable_lora: ``{module name: [bool, ...]}`` for ``MergedLinear`` layers, e.g.
            ``{"c_attn": [True, False, True]}`` (names match as in ``target_modules``).
        modules_to_save: modules whose full tensors the file holds (e.g. ``["classifier"]``).

    Every problem (a key the model lacks, a shape, a missing partner) is reported at once in an
    ``AdapterFileError``, and the model is then unchanged. :func:`lorakit.save_adapter` afterwards
    writes the PEFT form.
    """
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ConfigError(f"lora_alpha={lora_alpha!r}: give the positive α the checkpoint was trained with "
                          "(loralib's default is 1; the LoRA paper's GLUE runs used 16 with r = 8).")
    tensors = read_checkpoint(checkpoint)
    where = "the given state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    plan = plan_load(model, tensors, enable_lora, modules_to_save)
    if plan.problems:
        shown = "\n  ".join(plan.problems[:40]) + (f"\n  … and {len(plan.problems) - 40} more" if len(plan.problems) > 40 else "")
        raise AdapterFileError(f"{where}: the loralib checkpoint does not fit this model "
                               f"({len(plan.problems)} problem(s)):\n  {shown}\nLoad it into the model it was "
                               "trained on (same architecture and sizes), with its enable_lora / modules_to_save.")
    config = _config_for(plan, float(lora_alpha))
    install_adapter(model, where, adapter_name, trainable,
                    inject_fn=lambda: inject_adapter(model, config, adapter_name, None),
                    fill_fn=lambda: _fill(model, plan, adapter_name))
    return model


def _config_for(plan: _Plan, alpha: float) -> LoraConfig:
    """One LoraConfig: the most common r, exact-path rank_pattern entries for the others (loralib's
    scaling is α/r per layer, so α is the same everywhere), fused_slices for MergedLinear layers."""
    ranks = list(plan.ranks.values())
    r0 = max(set(ranks), key=ranks.count)
    rank_pattern = {re.escape(p): r for p, r in plan.ranks.items() if r != r0}
    bias = "none"
    if plan.biases:
        bias = "lora_only" if set(plan.biases) <= set(plan.ranks) else "all"
    return LoraConfig(r=r0, lora_alpha=alpha, target_modules=sorted(plan.ranks), rank_pattern=rank_pattern,
                      bias=bias, modules_to_save=sorted(plan.copies) or None, fused_slices=dict(plan.fused))


def _fill(model: nn.Module, plan: _Plan, adapter_name: str) -> None:
    hosts = dict(lora_layers(model))
    copies = dict(trainable_copies(model))
    with torch.no_grad():
        for path, (a, b) in plan.pairs.items():
            adapter = hosts[path].lora[adapter_name]
            adapter.lora_A.copy_(a.to(adapter.lora_A.dtype))
            adapter.lora_B.copy_(b.to(adapter.lora_B.dtype))
        for path, params in plan.copies.items():
            own = copies[path].modules_to_save[adapter_name].state_dict(keep_vars=True)
            for name, t in params.items():
                own[name].copy_(t.to(own[name].dtype))
        for path, t in plan.biases.items():
            module = hosts.get(path) or model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            base.bias.copy_(t.to(base.bias.dtype))


# -- writing --------------------------------------------------------------------------------------
def save_lora_state_dict(model: nn.Module, path: str | Path, bias: str = "none",
                         adapter_name: str | None = None) -> Path:
    """Write :func:`lora_state_dict` with ``torch.save`` (what loralib code loads), atomically."""
    tensors = {k: v.detach().cpu().clone() for k, v in lora_state_dict(model, bias, adapter_name).items()}
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    return path
