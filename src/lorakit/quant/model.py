"""Quantize a model's linear layers in place: every ``nn.Linear`` becomes a frozen ``QuantLinear``.

What stays in full precision (QLoRA §3 and common practice): the output head
(``model.get_output_embeddings()``; it is often tied to the input embedding and is the most
quantization-sensitive layer), every non-Linear module (embeddings, norms), and whatever ``skip``
names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .._txn import all_or_nothing
from ..errors import AdapterStateError, QuantizationError
from ..state import lora_layers
from .linear import QUANT_TYPES, QuantLinear, check_compute_dtype
from .nf4 import check_blocksize


def check_options(quant_type: str, blocksize: int, compute_dtype: torch.dtype) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(
            f"quant_type={quant_type!r} is not supported; use one of {', '.join(map(repr, QUANT_TYPES))}."
        )
    if quant_type in ("nf4", "fp4"):
        check_blocksize(blocksize)
    check_compute_dtype(compute_dtype)


def name_matches(path: str, names: Iterable[str]) -> bool:
    """A module path matches a name if it equals it or ends with ``"." + name``."""
    return any(path == n or path.endswith("." + n) for n in names)


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights, e.g. lm_head ↔ embed_tokens)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def linears_to_quantize(model: nn.Module, skip: Iterable[str] = (), quantize_head: bool = False
                        ) -> list[tuple[str, nn.Linear]]:
    """The (path, Linear) pairs that :func:`quantize_model` replaces; refuses unknown skip names and
    tied weights (quantizing one of two tied modules would silently untie them)."""
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    skip = [skip] if isinstance(skip, str) else skip  # "down_proj" is one name, not 9 letters
    try:
        skip = list(skip)
    except TypeError:
        skip = [skip]  # refused below, by the non-str check
    if not all(isinstance(n, str) for n in skip):
        raise QuantizationError(f"skip={skip!r:.80}: give module paths or suffixes as strings, e.g. ['lm_head'].")
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in skip:
        if not any(name_matches(p, [name]) for p, _ in linears):
            raise QuantizationError(
                f"skip entry {name!r} matches no nn.Linear of the model; give a module path or its suffix"
                + (f", e.g. {linears[0][0]!r}." if linears else " (the model has no nn.Linear).")
            )
    head = output_head(model)
    # Modules the model class asks to keep in fp32 (T5's FFN output ``wo``: its forward casts activations
    # to wo.weight.dtype) are not quantized — transformers' bitsandbytes path leaves them as Linear too.
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()), *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    chosen = [(p, m) for p, m in linears
              if not name_matches(p, skip) and not name_matches(p, keep) and (quantize_head or m is not head)]
    shared = shared_parameters(model)
    for path, m in chosen:
        if id(m.weight) in shared:
            raise QuantizationError(
                f"{path}: its weight is shared with another module (tied weights, e.g. tie_word_embeddings); "
                "quantizing it would untie them. Add it to skip (the output head is skipped unless "
                "quantize_head=True), or untie the weights first."
            )
    return chosen


def check_no_merged_adapters(model: nn.Module, linears: set[int]) -> None:
    """A merged adapter's ΔW would be quantized into the base, and its host would still list it as merged:
    unmerge could then never subtract it (a QuantLinear has no float weight — an AttributeError before)."""
    merged = [f"{path} ({', '.join(host.merged)})" for path, host in lora_layers(model)
              if host.merged and id(host.base_layer) in linears]
    if merged:
        raise AdapterStateError(f"quantize_model: adapters are merged into layers it would quantize: {', '.join(merged[:4])}"
                                f"{' …' if len(merged) > 4 else ''}; call lorakit.unmerge(model) first (or "
                                "lorakit.merge_and_unload(model) to quantize the merged weights as a plain model).")


@all_or_nothing
def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                   compute_dtype: torch.dtype = torch.bfloat16, skip: Iterable[str] = (),
                   quantize_head: bool = False) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by ``QuantLinear`` in place and return the model.

    ``quant_type``: "nf4" (QLoRA's choice), "fp4", "int8" (symmetric per row) or "int8_asym".
    ``double_quant`` and ``blocksize`` apply to the 4-bit formats. ``skip``: module paths (or their
    suffixes, e.g. "down_proj") to keep in full precision; the output head is kept unless
    ``quantize_head``. Each Linear's float weight is freed as soon as its replacement exists.
    """
    check_options(quant_type, blocksize, compute_dtype)
    for name, flag in (("double_quant", double_quant), ("quantize_head", quantize_head)):
        if not isinstance(flag, bool):  # "no" would read as True (quantize_head="no" quantized the head)
            raise QuantizationError(f"{name}={flag!r}: must be True or False.")
    todo = list(linears_to_quantize(model, skip, quantize_head))
    check_no_merged_adapters(model, {id(linear) for _, linear in todo})
    for path, linear in todo:
        if linear.weight.device.type == "meta":
            raise QuantizationError(f"{path}: the weight is on the meta device; load the model's weights first.")
        qlinear = QuantLinear.from_linear(linear, quant_type, double_quant, blocksize, compute_dtype)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, qlinear)
    return model
