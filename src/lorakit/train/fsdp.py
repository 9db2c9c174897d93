"""FSDP for LoRA / QLoRA runs: torch's FSDP2 ``fully_shard``, which runs on CPU (gloo) as on GPUs.

Why not accelerate's FSDP plugin: on a machine without CUDA, accelerate 1.15 turns
``accelerate launch --use_fsdp`` into plain DDP when the ``Accelerator`` is built with ``cpu=True``
(``DistributedType.MULTI_CPU``) and into *no* process group at all otherwise
(``DistributedType.NO``: every process trains alone). So lorakit shards the model itself and keeps
``accelerate`` for what it does on every device: the process group, ``reduce`` and ``gather``.

What is sharded (Zhao et al. 2023, "PyTorch FSDP", §3): every transformer block (the classes the
model lists in ``_no_split_modules``) is one FSDP unit, the rest of the model (embeddings, final
norm, head) the root unit. Each *parameter* becomes a ``DTensor`` holding 1/W of its rows
(``Shard(0)``); a unit's parameters are all-gathered just before its forward/backward and freed
after, and gradients are reduce-scattered (averaged over the W processes, like DDP's all-reduce).
Frozen and trainable parameters share a unit (FSDP2 allows mixed ``requires_grad``); the optimizer
sees only the local shards, so its state is sharded too (ZeRO-3).

Buffers are *not* sharded: a QLoRA base keeps its packed NF4 weights in buffers
(``lorakit.quant.QuantLinear``), so under FSDP every process holds the whole 4-bit base and only the
float parameters (embeddings, norms, head, LoRA factors) and the optimizer state are sharded. The
4-bit base is 1/8 of the fp32 model; sharding it too would need the packed bytes stored as
parameters of one float dtype (Answer.AI's FSDP-QLoRA, bitsandbytes' ``quant_storage``) — not done.

Checkpoints and the final adapter are gathered (``dist_checkpoint.py``); resume shards them again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .args import TrainArgs

#: Methods whose artifact and checkpoints are gathered by parameter name (see ``dist_checkpoint``).
FSDP_METHODS = ("lora", "loraplus", "full")
LAUNCH_HINT = ("launch it with `torchrun --nproc_per_node N -m lorakit.cli train ...` (or `accelerate launch "
               "--num_processes N -m lorakit.cli train ...`)")


def launched() -> bool:
    """True inside a process group launcher (torchrun, accelerate launch, ...): they set these."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def resolve_mode(args: TrainArgs) -> str:
    """``"fsdp"``, ``"ddp"`` or ``"single"`` for this process, from ``args.distributed`` and the launcher.

    ``auto`` is DDP under a launcher with more than one process, and FSDP when the launcher asked for it
    (``accelerate launch --use_fsdp`` sets ``ACCELERATE_USE_FSDP``, which accelerate ignores on CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.distributed in ("fsdp", "ddp") and not launched():
        raise ConfigError(f"distributed={args.distributed} needs one process per shard/replica, started by a "
                          f"launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: {LAUNCH_HINT}. "
                          "For one process, drop distributed= (or set distributed=auto).")
    if args.distributed == "fsdp":
        return "fsdp"
    if args.distributed == "auto" and launched() and _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        return "fsdp"
    return "ddp" if world > 1 else "single"


def check_fsdp_args(args: TrainArgs) -> None:
    """What FSDP cannot do here, refused before anything is loaded (each with what to use instead)."""
    problems = []
    if args.method not in FSDP_METHODS:
        problems.append(f"method={args.method} (its hooks read or reshape whole parameters; FSDP supports "
                        f"{', '.join(FSDP_METHODS)})")
    if args.quant == "gguf":
        problems.append("quant=gguf (a .gguf model's packed weights are parameters of byte dtypes that FSDP "
                        "would shard; nf4/fp4/int8 keep them in buffers and work)")
    if args.optim != "adamw":
        problems.append(f"optim={args.optim} (the 8-bit optimizer's blockwise state assumes whole tensors; "
                        "use optim=adamw)")
    if args.probe_every:
        problems.append("probe_every (the forgetting probe runs the base model on the main process only)")
    # Generation runs on the main process alone; FSDP's forward passes are collective and would wait forever.
    if args.sample_every:
        problems.append("sample_every (samples are generated on the main process only)")
    if args.metric_for_best == "eval_score" and (args.early_stopping_patience or args.save_best):
        problems.append("metric_for_best=eval_score (the generation score is computed on the main process only; "
                        "use metric_for_best=eval_loss)")
    if problems:
        raise ConfigError("distributed=fsdp does not support " + "; ".join(problems)
                          + ". Use distributed=ddp for these settings, or change them.")


def shard_model(model: nn.Module, device: torch.device,
                groups: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Shard ``model`` in place (FSDP2) over all processes of the default group.

    ``fully_shard`` replaces every parameter by a new ``nn.Parameter`` holding a ``DTensor``, so
    optimizer parameter groups built before (LoRA+'s A/B groups) are returned re-pointed at the new
    parameters, matched by name. Names do not change.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if groups is None:
        return None
    params = dict(model.named_parameters())
    return [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in groups]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: the model's transformer blocks (``_no_split_modules``), or the
    children of its longest ``nn.ModuleList`` when it names none."""
    wanted = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded gradients: the norm of the local shards is a
    partial sum (a ``DTensor``); ``full_tensor()`` all-reduces it into the norm of the whole gradient."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
