"""All or nothing: a call that changes a model either completes or leaves it exactly as it was.

``snapshot(model)`` records, for every module reachable from the root, its attribute dictionary
(shallow copies of ``_modules`` / ``_parameters`` / ``_buffers`` and of plain attributes such as a
LoRA host's ``active`` / ``merged`` lists), every parameter's ``requires_grad`` and lorakit's
bookkeeping (``state.ModelState``: adapter records, active list). ``restore`` puts all of that back:
modules that a failed call created are dropped with their tensors, renamed state-dict keys disappear,
a half-quantized model gets its ``nn.Linear`` layers back.

What is *not* copied is tensor contents — that would double the model's memory. Calls wrapped here
only write into tensors they created themselves (new adapter factors, new quantized weights) or after
every check has passed; ``changed_in_place`` lets a test verify that via tensor version counters.

Use ``@all_or_nothing`` on a public function whose first argument is the model. Nested wrapped calls
(``load_adapter`` → ``inject``) snapshot once, at the outermost call.
"""

from __future__ import annotations

import contextvars
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from .state import _KEY, ModelState

F = TypeVar("F", bound=Callable[..., Any])
_LISTS = (list, dict, set)  # mutable attribute containers copied one level deep
_open: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("lorakit_txn_open", default=frozenset())


@dataclass
class Snapshot:
    modules: list[tuple[nn.Module, dict[str, Any]]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    versions: list[tuple[Any, int]]


def _copy_attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    for key, value in module.__dict__.items():
        if key == _KEY and isinstance(value, ModelState):
            out[key] = _copy_state(value)
        elif isinstance(value, _LISTS):
            out[key] = copy.copy(value)
        else:
            out[key] = value
    return out


def _copy_state(st: ModelState) -> ModelState:
    return ModelState(adapters={k: copy.copy(r) for k, r in st.adapters.items()}, active=list(st.active))


def snapshot(model: nn.Module) -> Snapshot:
    modules = [(m, _copy_attrs(m)) for m in model.modules()]
    params = list(model.parameters(recurse=True))
    tensors = params + list(model.buffers(recurse=True))
    return Snapshot(
        modules=modules,
        requires_grad=[(p, p.requires_grad) for p in params],
        versions=[(t, t._version) for t in tensors if not t.is_inference()],  # inference tensors have none
    )


def restore(snap: Snapshot) -> None:
    """Put every recorded module's attributes and every parameter's ``requires_grad`` back."""
    for module, attrs in snap.modules:
        module.__dict__.clear()
        # Copy again so that the snapshot stays valid if restore is called twice.
        module.__dict__.update({k: (_copy_state(v) if isinstance(v, ModelState) else
                                    copy.copy(v) if isinstance(v, _LISTS) else v) for k, v in attrs.items()})
    for p, flag in snap.requires_grad:
        p.requires_grad_(flag)


def changed_in_place(snap: Snapshot) -> list[Any]:
    """Tensors of the snapshot written to since it was taken (their version counter moved)."""
    return [t for t, v in snap.versions if t._version != v]


def all_or_nothing(fn: F) -> F:
    """Run ``fn(model, ...)``; if it raises anything (a ``LorakitError``, a ``KeyboardInterrupt``, an
    out-of-memory error), restore the model's structure and flags before re-raising."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module) or id(model) in _open.get():
            return fn(model, *args, **kwargs)
        snap = snapshot(model)
        token = _open.set(_open.get() | {id(model)})
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            restore(snap)
            raise
        finally:
            _open.reset(token)

    return wrapper  # type: ignore[return-value]
