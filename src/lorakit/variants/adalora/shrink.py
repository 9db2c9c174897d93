"""Cut AdaLoRA adapters to the rank they were allocated, for real (not only masked as PEFT does).

Once the allocation is final (§3.3, t ≥ T − t_f) the masked triplets can never come back, so
carrying them costs compute and memory for nothing. :func:`shrink` slices P's columns, λ and Q's
rows down to the kept triplets and moves the optimizer's state along (Adam's moments are sliced, not
reset), so the rest of training and inference run on the smaller factors. The parameters stay the
same objects (only their data shrinks): an optimizer, an LR scheduler and a checkpoint's parameter
names keep working.

Adapters left with rank 0 are removed (layers left without any adapter are unwrapped) unless
``remove_empty=False``, which leaves them as zero-size stubs that cost nothing in the forward pass —
the training hook does that until the end of training, so that the loop's checkpoints keep the same
parameter names. The allocation is recorded in the adapter's config as PEFT's ``rank_pattern``, also
for removed adapters: that is what lets PEFT load the file.
"""

from __future__ import annotations

import torch
from torch import nn

from ...state import layer_adapters, require_adapter, set_submodule
from .layer import Cut, SVDAdapter, svd_adapters


def shrink(model: nn.Module, adapter_name: str = "default", optimizer: torch.optim.Optimizer | None = None,
           remove_empty: bool = True) -> dict[str, int]:
    """Cut every adapter ``adapter_name`` to its kept triplets; returns module path → rank.

    ``optimizer`` (if given) is patched in place: the state of every cut parameter is sliced, and
    the parameters of removed adapters leave its param groups.
    """
    rec = require_adapter(model, adapter_name)
    pattern = dict(rec.config.rank_pattern or {})
    cuts: list[Cut] = []
    removed: list[nn.Parameter] = []
    ranks: dict[str, int] = {}
    for path, host, adapter in layer_adapters(model, adapter_name, SVDAdapter):
        pattern[f"{path}.lora_E"] = adapter.pattern()
        ranks[path] = adapter.rank
        if adapter.rank < adapter.r:
            cuts += adapter.cut_()
        if adapter.r == 0 and remove_empty:
            removed += [adapter.lora_A, adapter.lora_E, adapter.lora_B]
            host.remove_adapter(adapter_name)
            if len(host.lora) == 0:
                set_submodule(model, path, host.base_layer)
    rec.config.rank_pattern = pattern
    if optimizer is not None:
        patch_optimizer(optimizer, cuts, removed)
    return ranks


@torch.no_grad()
def patch_optimizer(optimizer: torch.optim.Optimizer, cuts: list[Cut], removed: list[nn.Parameter] = ()) -> None:
    """Follow :meth:`SVDAdapter.cut_` in ``optimizer``, in place: each ``(old, new, dim, index, old
    shape)`` puts ``new`` where ``old`` was in the param groups and moves old's state over, slicing the
    state tensors of the old shape (Adam's moments) along ``dim``; ``removed`` parameters leave.

    In place (not a new optimizer) so that LR schedulers, gradient scalers and accelerate's wrapper,
    which hold the optimizer, keep working.
    """
    swap = {id(old): new for old, new, *_ in cuts}
    gone = {id(p) for p in removed}
    for group in optimizer.param_groups:
        swapped = (swap.get(id(p), p) for p in group["params"])
        group["params"] = [p for p in swapped if id(p) not in gone]
    for old, new, dim, idx, shape in cuts:
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {k: v.index_select(dim, idx.to(v.device))
                                    if torch.is_tensor(v) and tuple(v.shape) == shape else v
                                    for k, v in state.items()}
    for p in removed:
        optimizer.state.pop(p, None)


def current_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Module path → kept rank of adapter ``adapter_name``, 0 for adapters removed by :func:`shrink`."""
    rec = require_adapter(model, adapter_name)
    ranks = {key.removesuffix(".lora_E"): sum(flags) for key, flags in (rec.config.rank_pattern or {}).items()}
    ranks.update({path: ad.rank for path, ad in svd_adapters(model, adapter_name).items()})
    return ranks
