"""Streaming quantized loading: a transformers checkpoint larger than RAM (in 16 bit) loads in 4 bit.

    config.json ──► model skeleton on the meta device (parameters take no memory; buffers such as
                    rotary ``inv_freq`` are built for real, they are not in checkpoints)
    shards ──► tensor by tensor (``safetensors.safe_open``; one shard mapped at a time):
        Linear weight to quantize ──► quantize, swap the meta Linear for a QuantLinear, drop the float
        anything else             ──► materialize in its checkpoint dtype (or ``dtype``)

Peak memory is the quantized model plus one tensor (and the quantizer's chunk temporaries). Tied
weights (lm_head ↔ embed_tokens) stay tied: the tensor that arrives first fills every name of the
tie. The result is checked before it is returned: a tensor the model lacks is a warning, a model
tensor still on the meta device is an error — a partly loaded model is never returned.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import QuantizationError
from ..validate import inside, read_json_object
from .checkpoint_keys import CheckpointKeys
from .linear import QuantLinear, quantize_weight
from .model import check_options, linears_to_quantize

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def load_quantized(model_dir: str | os.PathLike, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16, skip=(),
                   quantize_head: bool = False, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", model_class=None, config_kwargs: dict | None = None,
                   init_missing=()) -> nn.Module:
    """Build the model of ``model_dir/config.json`` and fill it from its safetensors checkpoint,
    quantizing every ``nn.Linear`` weight (except the output head and ``skip``) as it arrives.

    ``dtype`` casts the tensors kept in full precision (default: as stored). ``device`` is where
    tensors go (and are quantized). ``model_class`` overrides ``config.architectures[0]``.
    """
    check_options(quant_type, blocksize, compute_dtype)
    if not isinstance(model_dir, (str, os.PathLike)):
        raise QuantizationError(f"model_dir={model_dir!r:.60}: give the path of a transformers model directory.")
    model_dir = Path(model_dir)
    model = _empty_model(model_dir, model_class)
    targets = {path for path, _ in linears_to_quantize(model, skip, quantize_head)}
    ties = _tie_groups(model)
    for path in targets:
        if path + ".weight" in ties:
            raise QuantizationError(
                f"{path}: its weight is tied to {[n for n in ties[path + '.weight'] if n != path + '.weight']} "
                "(tie_word_embeddings); quantizing it would untie them. Keep quantize_head=False or add it to skip."
            )
    filled: set[str] = set()
    unexpected: list[str] = []
    quantize = dict(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    shards = _shards(model_dir)
    keys = CheckpointKeys(model)  # transformers' renames and MoE stacking, as from_pretrained applies them
    for shard, names in shards:
        if names is None:
            with _open_shard(shard) as f:
                keys.plan(f.keys())
        else:
            keys.plan(names)
    for shard, names in shards:
        log.info("load_quantized: reading %s", shard.name)
        with _open_shard(shard) as f:
            present = set(f.keys())
            if names is None:
                names = list(f.keys())
            missing = [n for n in names if n not in present]
            if missing:
                raise QuantizationError(
                    f"{shard.name} lacks {len(missing)} tensor(s) that {INDEX} places there, e.g. "
                    f"{missing[:5]}; the checkpoint is incomplete or the index is stale — re-save it."
                )
            for key in names:
                for name, tensor in keys.take(key, f.get_tensor(key)):  # model names; [] while a stack fills
                    if name in filled:
                        continue  # the other name of a tied pair; the first one wins
                    placed = _place(model, name, tensor, shard.name, targets, ties, quantize,
                                    compute_dtype, dtype, device)
                    if placed:
                        filled.update(ties.get(name, (name,)))
                    else:
                        unexpected.append(key)
    _init_missing(model, init_missing, dtype, device)
    _check_complete(model, model_dir)
    if unexpected:
        warnings.warn(
            f"load_quantized: {len(unexpected)} checkpoint tensor(s) have no place in the model built from "
            f"{model_dir / 'config.json'} and were ignored: {unexpected[:10]}", stacklevel=2
        )
    return model.eval()


def _empty_model(model_dir: Path, model_class, config_kwargs: dict | None = None) -> nn.Module:
    if not (model_dir / "config.json").is_file():
        raise QuantizationError(f"{model_dir} has no config.json; load_quantized needs a transformers model directory.")
    import transformers
    from accelerate import init_empty_weights

    read_json_object(model_dir / "config.json", QuantizationError, "re-save the model's config.json.")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True, **(config_kwargs or {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers' ways of refusing a config
        raise QuantizationError(f"{model_dir / 'config.json'}: transformers cannot build a config from it "
                                f"({type(exc).__name__}: {exc}); re-save the model's config.json.") from None
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
    with init_empty_weights():  # parameters on meta; buffers real (include_buffers=False)
        if model_class is None:
            return transformers.AutoModelForCausalLM.from_config(config)
        if model_class.__name__.startswith("Auto"):  # an Auto class dispatches on the config
            return model_class.from_config(config)
        return model_class(config)


def _shards(model_dir: Path) -> list[tuple[Path, list[str] | None]]:
    """(file, tensor names it must hold — None: all it has) in reading order."""
    index, single = model_dir / INDEX, model_dir / SINGLE
    if index.is_file():
        fix = "the checkpoint index is damaged; re-save the model with save_pretrained."
        weight_map = read_json_object(index, QuantizationError, fix).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QuantizationError(f"{index}: 'weight_map' must be a non-empty object of tensor name → shard file; {fix}")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            inside(model_dir, file, f"{index.name} weight_map[{name!r}]", QuantizationError)
            by_file.setdefault(file, []).append(name)
        absent = [f for f in by_file if not (model_dir / f).is_file()]
        if absent:
            raise QuantizationError(f"{index.name} names shard file(s) missing from {model_dir}: {absent}.")
        return [(model_dir / f, names) for f, names in by_file.items()]
    if single.is_file():
        return [(single, None)]
    raise QuantizationError(
        f"{model_dir} has neither {SINGLE} nor {INDEX}; load_quantized reads safetensors checkpoints "
        "(re-save a .bin checkpoint with save_pretrained(..., safe_serialization=True))."
    )


@contextmanager
def _open_shard(shard: Path):
    """``safe_open`` with a truncated or damaged shard reported as a ``QuantizationError``."""
    try:
        handle = safe_open(str(shard), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise QuantizationError(f"{shard}: not a readable safetensors file ({exc}); the download is incomplete "
                                "or the file is damaged — fetch or re-save it.") from None
    with handle as f:
        try:
            yield f
        except SafetensorError as exc:  # a tensor's bytes lie beyond the end of a truncated file
            raise QuantizationError(f"{shard}: a tensor cannot be read ({exc}); the file is truncated or "
                                    "damaged — fetch or re-save it.") from None


def _tie_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """name → every name tied to it: parameters shared by identity, plus transformers' declared ties
    (``get_expanded_tied_weights_keys``), which a meta-device skeleton has not applied yet."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    of = {n: g for g in groups.values() for n in g}
    declared = getattr(model, "get_expanded_tied_weights_keys", None)
    for target, source in (declared(all_submodels=True) if callable(declared) else {}).items():
        if target in of and source in of and of[target] is not of[source]:
            merged = of[source] + of[target]
            for n in merged:
                of[n] = merged
    return {n: tuple(g) for n, g in of.items() if len(g) > 1}


def _place(model, name, tensor, shard, targets, ties, quantize, compute_dtype, dtype, device) -> bool:
    """Put one checkpoint tensor into the model; False if the model has no such tensor."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    if path in targets and attr == "weight" and isinstance(module, nn.Linear):
        _check_shape(name, shard, tuple(tensor.shape), tuple(module.weight.shape))
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizationError(
                f"{name} in {shard} has dtype {tensor.dtype}; load_quantized quantizes float32/bfloat16/float16 "
                "weights. Dequantize the checkpoint first, or add the module to skip."
            )
        qweight = quantize_weight(tensor.to(device), **quantize)
        qlinear = QuantLinear(qweight, None, compute_dtype)
        if module.bias is not None:  # still meta; filled (frozen) when its own tensor arrives
            qlinear.bias = nn.Parameter(module.bias, requires_grad=False)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, qlinear)
        return True
    current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if current is None:
        return False
    _check_shape(name, shard, tuple(tensor.shape), tuple(current.shape))
    if current.is_floating_point() != tensor.is_floating_point():
        raise QuantizationError(f"{name} in {shard} has dtype {tensor.dtype}, but the model's tensor is "
                                f"{current.dtype}; integer and float tensors are never cast into each other — "
                                "the checkpoint is damaged or from another architecture.")
    # An explicit copy: safetensors hands out views of the mapped shard, and one live view keeps every
    # page of the shard that was read resident (RSS grows towards the checkpoint's size).
    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    tensor = tensor.to(device=device, dtype=cast, copy=True)
    if attr in module._buffers:
        module._buffers[attr] = tensor
        return True
    new = nn.Parameter(tensor, requires_grad=current.requires_grad and tensor.is_floating_point())
    for other in ties.get(name, (name,)):
        owner_path, _, owner_attr = other.rpartition(".")
        model.get_submodule(owner_path)._parameters[owner_attr] = new
    return True


def _check_shape(name: str, shard: str, got: tuple, expected: tuple) -> None:
    if got != expected:
        raise QuantizationError(
            f"{name} in {shard} has shape {got}, but the model built from config.json expects {expected}; "
            "the checkpoint does not match its config (check hidden_size, intermediate_size, vocab_size, "
            "num_key_value_heads)."
        )


def _init_missing(model: nn.Module, paths, dtype: torch.dtype | None, device) -> None:
    """Materialize and initialize the modules of ``paths`` whose tensors the checkpoint did not fill
    (transformers' ``_init_weights`` when the model has it, else the module's own ``reset_parameters``)."""
    for path in paths:
        module = model.get_submodule(path)
        if not any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
            continue
        module.to_empty(device=device)
        if dtype is not None:
            module.to(dtype)
        init = getattr(model, "_init_weights", None)
        with torch.no_grad():
            if callable(init):
                init(module)
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def _check_complete(model: nn.Module, model_dir: Path) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise QuantizationError(
            f"the checkpoint in {model_dir} lacks {len(left)} tensor(s) the model needs, e.g. {left[:10]}; "
            "it is incomplete or was saved from a different architecture. No model was returned."
        )
