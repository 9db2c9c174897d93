"""Adapter lifecycle on an injected model: activate, disable, delete, merge, unmerge, unload.

All functions take the model that :func:`lorakit.inject` returned and change it in place.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

from torch import nn

from .errors import AdapterNotFoundError, AdapterStateError, ConfigError
from .state import (  # noqa: F401  (merged_adapters: re-exported for the public API)
    activate,
    clear_state,
    lora_layers,
    merged_adapters,
    model_state,
    refresh_trainable,
    require_adapter,
    set_submodule,
    trainable_copies,
    unmerge_to_switch,
)
from .tied import check_merge_untied
from .validate import check_bool


def list_adapters(model: nn.Module) -> list[str]:
    st = model_state(model)
    return list(st.adapters) if st else []


def active_adapters(model: nn.Module) -> list[str]:
    st = model_state(model)
    return list(st.active) if st else []


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters; several active adapters add their updates.

    As PEFT's ``set_adapter``: if adapters are merged, they are unmerged first (with a warning), so the
    model then runs exactly ``names``; merge again afterwards if wanted. An unknown name changes nothing.
    """
    names = _name_list(names)
    for n in names:
        require_adapter(model, n)
    unmerge_to_switch(model, names)
    activate(model, names)


def set_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    check_bool("trainable", trainable)  # "no" would silently read as True
    record = require_adapter(model, name)
    if trainable and any(name in h.merged for _, h in lora_layers(model)):
        # its update is inside the base weights: the factors no longer run, so they would get no gradient
        raise AdapterStateError(f"adapter {name!r} is merged into the base weights, so its factors take no part "
                                "in the forward pass; call lorakit.unmerge(model) before training it.")
    record.trainable = trainable
    refresh_trainable(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without any adapter inside the block (exception-safe).

    Merged adapters are unmerged on entry and merged again on exit, so the block sees the base (PEFT
    leaves them unmerged after its block). If the block switched the active adapters (``set_adapter``),
    they stay unmerged, as ``set_adapter`` would have left them.
    """
    hosts = [h for _, h in lora_layers(model)]
    copies = [h for _, h in trainable_copies(model)]
    merged = {id(h): list(h.merged) for h in hosts}
    active = active_adapters(model)
    was = {id(h): h.disabled for h in [*hosts, *copies]}  # restored on exit: blocks may nest
    for h in hosts:
        h.unmerge()
        h.disabled = True
    for h in copies:
        h.disabled = True
    try:
        yield model
    finally:
        remerge = active_adapters(model) == active
        for h in hosts:
            h.disabled = was[id(h)]
            if remerge:
                h.merge(merged[id(h)])
        for h in copies:
            h.disabled = was[id(h)]


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Serve several adapters in one batch: row i uses ``adapter_names[i]`` (None = the base model).

    Example::

        with lorakit.per_row_adapters(model, ["fr", "de", None]):
            logits = model(input_ids).logits   # batch of 3
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise ConfigError(f"adapter_names={adapter_names!r:.60}: give a list with one adapter name (or None) "
                          "per row of the batch.")
    for n in adapter_names:
        if n is not None:
            require_adapter(model, n)
    if any(h.merged for _, h in lora_layers(model)):
        raise AdapterStateError("per-row adapters need unmerged adapters; call lorakit.unmerge(model) first.")
    hosts = [h for _, h in lora_layers(model)] + [h for _, h in trainable_copies(model)]
    for h in hosts:
        h.row_adapters = list(adapter_names)  # LoRA hosts and modules_to_save copies alike
    try:
        yield model
    finally:
        for h in hosts:
            h.row_adapters = None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (its layers, ``modules_to_save`` copies and record).

    A merged adapter is refused (its update could not be taken out of the weights afterwards). As in PEFT,
    deleting the only active adapter activates the first remaining one in name order, with a warning.
    """
    require_adapter(model, name)
    merged = [p for p, h in lora_layers(model) if name in h.merged]
    if merged:
        raise AdapterStateError(f"adapter {name!r} is merged into the base weights ({len(merged)} layer(s), e.g. "
                                f"{merged[0]!r}); call lorakit.unmerge(model) before deleting it.")
    st = model_state(model)
    was_active = name in st.active
    drop_adapter(model, name)
    st = model_state(model)
    if st is None:
        return
    if was_active and not st.active:
        successor = sorted(st.adapters)[0]
        warnings.warn(f"deleted adapter {name!r} was the active one; {successor!r} (the first remaining adapter "
                      "by name, as PEFT chooses) is active now. Choose with lorakit.set_adapter(model, names).",
                      UserWarning, stacklevel=2)
        activate(model, [successor])


def drop_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (checked, not merged) and keep the other active adapters active; no successor
    is chosen (the rollback of a failed load uses this)."""
    for path, host in reversed(list(lora_layers(model))):  # innermost first (nested ParamHosts)
        if name in host.lora:
            host.remove_adapter(name)
            if len(host.lora) == 0:
                set_submodule(model, path, host.base_layer)
    for path, host in list(trainable_copies(model)):
        if name in host.modules_to_save:
            del host.modules_to_save[name]
            if len(host.modules_to_save) == 0:
                set_submodule(model, path, host.original_module)
    st = model_state(model)
    del st.adapters[name]
    activate(model, [n for n in st.active if n != name])
    if not st.adapters:
        clear_state(model)


def merge(model: nn.Module, names: str | Sequence[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Add the updates of ``names`` (default: the active adapters) into the base weights.

    Idempotent: an adapter already merged is skipped. With ``safe_merge`` a merge that would make any
    weight non-finite raises ``AdapterStateError`` before touching that weight.
    """
    check_bool("safe_merge", safe_merge)
    names = _names(model, names)
    check_merge_untied(model, names)  # a tied weight (lm_head ↔ embed_tokens) is refused
    plan = [(path, host, [n for n in names if n in host.lora]) for path, host in lora_layers(model)]
    # Every refusal before the first weight changes, so a failure never leaves earlier layers merged:
    # safe_merge checks all layers first; layers that refuse in-place merges (QuantLinear, grouped convs)
    # go first.
    plan.sort(key=lambda item: getattr(item[1].kind, "in_place", True))  # stable: False (refusing) first
    if safe_merge:
        for path, host, todo in plan:
            with _naming_module(path):
                host.check_merge(todo)
    for path, host, todo in plan:
        with _naming_module(path):
            host.merge(todo)
    return model


@contextlib.contextmanager
def _naming_module(path: str):
    """A layer's refusal (``AdapterStateError``) with the module's path in front, if it lacks it."""
    try:
        yield
    except AdapterStateError as exc:
        if repr(path) in str(exc):
            raise
        raise AdapterStateError(f"module {path!r}: {exc}") from None


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged update again (restores W up to floating-point rounding)."""
    for _, host in lora_layers(model):
        host.unmerge()
    return model


def merge_and_unload(model: nn.Module, names: str | Sequence[str] | None = None,
                     safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters (or ``names``) and return the plain model: every LoRA host replaced by
    its base module (e.g. ``nn.Linear``) and every ``modules_to_save`` wrapper by its active copy."""
    merge(model, names, safe_merge=safe_merge)
    return _strip(model, keep_copies=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original model comes back."""
    unmerge(model)
    return _strip(model, keep_copies=False)


def _strip(model: nn.Module, keep_copies: bool) -> nn.Module:
    for path, host in reversed(list(lora_layers(model))):  # innermost first (nested ParamHosts)
        set_submodule(model, path, host.base_layer)
    for path, host in list(trainable_copies(model)):
        set_submodule(model, path, host.current() if keep_copies else host.original_module)
    clear_state(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _names(model: nn.Module, names) -> list[str]:
    if names is None:
        st = model_state(model)
        if st is None:
            raise AdapterNotFoundError("the model has no lorakit adapters to merge.")
        return list(st.active)
    names = _name_list(names)
    for n in names:
        require_adapter(model, n)
    return names


def _name_list(names) -> list[str]:
    """One adapter name or a list/tuple of them; anything not iterable (None, 3) is a ConfigError."""
    if isinstance(names, str):
        return [names]
    try:
        names = list(names)
    except TypeError:
        raise ConfigError(f"adapter names {names!r:.60}: give one name or a list of names "
                          f"(got a {type(names).__name__}).") from None
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:  # set_adapter(["a", "a"]) would add a's update twice in every forward
        raise ConfigError(f"adapter names {names}: {twice} listed more than once; name each adapter once.")
    return names
