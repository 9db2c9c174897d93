"""Checkpoints and artifacts of a sharded (FSDP2) model: gathered to whole tensors, sharded back on resume.

Why gather instead of ``torch.distributed.checkpoint`` (DCP, one file per process): what a LoRA run
saves — the trainable factors and their two Adam moments — is a few MB, so gathering it costs
nothing, and the checkpoint keeps the *same files* as a one-process or DDP run
(``checkpoint.py``): ``trainable.safetensors`` holds whole tensors by parameter name,
``optimizer.pt`` is ``optimizer.state_dict()`` with whole moments, indexed like one process's
optimizer. So a checkpoint is readable with safetensors alone, checked by the same code on resume,
and the artifact is the ordinary PEFT file — never the empty or 1/W-sized adapter PEFT users get
when they save a sharded model without gathering (huggingface/peft#2892). DCP would pay off for
full fine-tuning of models too big for one process's memory; ``method=full`` here gathers too.

Gathering is collective: every process calls these functions in the same order, and only the main
process keeps (and writes) the whole tensors. A parameter that is not a ``DTensor`` (a run without
FSDP) passes through unchanged, so the callers need no branch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """The whole tensor of ``t`` on the CPU (an all-gather when ``t`` is sharded); None when not ``keep``."""
    full = t.full_tensor() if _is_sharded(t) else t
    return full.detach().cpu() if keep else None


def gather_trainable(model: nn.Module, names: list[str], main: bool) -> dict[str, torch.Tensor]:
    """``{name: whole tensor}`` of the named parameters, on the main process (``{}`` elsewhere).
    One parameter at a time, so no process holds more than one extra whole tensor at once."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        t = whole(params[name], keep=main)
        if t is not None:
            out[name] = t
    return out


def gather_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor (Adam's ``exp_avg``, ``exp_avg_sq``)
    made whole: the same layout a one-process run saves. ``{}`` on the other processes."""
    sd = optimizer.state_dict()
    state = {}
    for index in sorted(sd["state"]):  # the same order on every process: the gathers pair up
        entry = {}
        for key, value in sd["state"][index].items():
            entry[key] = whole(value, keep=main) if isinstance(value, torch.Tensor) else value
        state[index] = entry
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor read from a checkpoint) laid out like ``param``: this process's shard
    when ``param`` is sharded (rows split as FSDP split the parameter), else ``value`` itself."""
    if not _is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(dtype=param.dtype, device=param.device_mesh.device_type),
                             param.device_mesh, param.placements)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A gathered optimizer state (``gather_optimizer_state``) with each per-parameter tensor laid out
    like its parameter, ready for ``optimizer.load_state_dict``. Scalars (Adam's ``step``) stay whole."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(_is_sharded(p) for p in params):
        return saved
    state = {}
    for index, entry in saved["state"].items():
        p = params[index]
        state[index] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0
                        else v for k, v in entry.items()}
    return {"state": state, "param_groups": saved["param_groups"]}


@contextmanager
def whole_parameters(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Within the block, the named parameters of a sharded ``model`` are whole plain tensors, so the
    ordinary writers (``lorakit.save_adapter``) see one process's model. Collective on entry; the
    sharded parameters are put back on exit. Frozen parameters stay sharded: only what the artifact
    holds is gathered."""
    swapped = []
    try:
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            sharded = owner._parameters[attr]
            if not _is_sharded(sharded):
                continue
            owner._parameters[attr] = nn.Parameter(sharded.full_tensor().detach(), requires_grad=sharded.requires_grad)
            swapped.append((owner, attr, sharded))
        yield
    finally:
        for owner, attr, sharded in reversed(swapped):
            owner._parameters[attr] = sharded
