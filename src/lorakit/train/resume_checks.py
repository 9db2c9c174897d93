"""What a resume checks before it trusts a checkpoint.

A checkpoint is untrusted input like any file: its ``trainer_state.json`` may be a list, its step
``-5`` or ``10**9``, its ``rng.pt`` the wrong shape, its ``optimizer.pt`` from another run. Each is
a ``CheckpointError`` naming the checkpoint and the file.

A resume also *continues the same run*: the settings that shape the trajectory (lr, dropout, the
step budget, …) come from the checkpoint. A flag left at its default takes the checkpoint's value;
a flag that contradicts it is an error naming both values, unless ``resume_override`` lists it —
then the change is made and recorded (``metrics.json`` holds the args actually used). The data
files are fingerprinted by content (SHA-256): an edited file is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .args import BUILTIN_PREFIX, TrainArgs
from ..data.guard import scan_file

#: Settings a resume takes from the checkpoint (those in the fingerprint must match exactly anyway).
RESUMED = ("lr", "lora_dropout", "max_steps", "epochs", "warmup_steps", "schedule", "weight_decay",
           "max_grad_norm", "loraplus_ratio", "loraplus_embedding_lr", "bf16")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainArgs) if f.default is not dataclasses.MISSING}


# -- settings ---------------------------------------------------------------------------------------
def reconcile_args(args: TrainArgs, checkpoint: Path) -> tuple[TrainArgs, list[str]]:
    """``args`` with the checkpoint's settings filled in; lines saying what was taken or overridden."""
    state = read_state(checkpoint)
    saved = state.get("args")
    if not isinstance(saved, dict):
        return args, []  # a checkpoint from an older lorakit: only the fingerprint is checked
    allowed = set(args.resume_override or [])
    unknown = allowed - set(RESUMED)
    if unknown:
        raise ConfigError(f"resume_override names {sorted(unknown)}, which a resume cannot change; it may list "
                          f"{', '.join(RESUMED)}.")
    changes, notes, conflicts = {}, [], []
    for key in RESUMED:
        if key not in saved:
            continue
        mine, theirs = getattr(args, key), saved[key]
        if mine == theirs:
            continue
        if key in allowed:
            notes.append(f"{key}: {theirs!r} in the checkpoint, {mine!r} now (resume_override)")
        elif mine == _DEFAULTS.get(key):
            changes[key] = theirs
            notes.append(f"{key}={theirs!r} (from the checkpoint)")
        else:
            conflicts.append(f"{key}: checkpoint {theirs!r}, now {mine!r}")
    if conflicts:
        raise CheckpointError(
            f"{checkpoint}: a resume continues the same run, but these settings contradict the checkpoint's:\n  "
            + "\n  ".join(conflicts) + "\nDrop the flags (the checkpoint's values are used), or allow the change "
            f"explicitly with resume_override={','.join(c.split(':')[0] for c in conflicts)}."
        )
    try:
        return (args.replace(**changes) if changes else args), notes
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint}: its recorded settings are invalid ({exc}); resume from another "
                              "checkpoint.") from None


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc}); resume from an older checkpoint.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not a {type(state).__name__}; the checkpoint is "
                              "damaged — resume from an older one.")
    return state


# -- data -------------------------------------------------------------------------------------------
def data_digests(args: TrainArgs) -> dict[str, str | None]:
    """SHA-256 of the training (and replayed) data files; None for built-in tasks."""
    def digest(spec: str | None) -> str | None:
        if spec is None or spec.startswith(BUILTIN_PREFIX) or not Path(spec).is_file():
            return None
        return scan_file(spec, text=False)

    return {"data_sha256": digest(args.data), "replay_data_sha256": digest(args.replay_data)}


def check_data_unchanged(saved: dict[str, Any], current: dict[str, Any], args: TrainArgs, path: Path) -> None:
    for key, spec in (("data_sha256", args.data), ("replay_data_sha256", args.replay_data)):
        if key not in saved:
            if current.get(key):
                warnings.warn(f"{path} records no content hash of {spec}; it cannot check that the file is "
                              "unchanged since the checkpoint.", stacklevel=3)
                saved[key] = current.get(key)  # accepted: older checkpoints
            continue
        if saved[key] != current.get(key):
            raise CheckpointError(
                f"{spec} has changed since {path} was saved (sha256 {str(saved[key])[:12]}… then, "
                f"{str(current.get(key))[:12]}… now): resuming would train on different rows than the "
                "checkpoint's data order assumes. Restore the file, or start a new run (--overwrite or "
                "another --output-dir)."
            )


# -- the checkpoint's contents ---------------------------------------------------------------------
def check_checkpoint(ckpt, total_steps: int) -> None:
    """Structure and bounds of a loaded checkpoint (see ``checkpoint.Checkpoint``)."""
    where = ckpt.path
    state = ckpt.state
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}/trainer_state.json must hold a JSON object, not a {type(state).__name__}; "
                              "resume from an older checkpoint.")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise CheckpointError(f"{where}/trainer_state.json: step {step!r} is not an integer in [0, {total_steps}] "
                              "(this run's length); the checkpoint is damaged or from another run.")
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"{where}/trainer_state.json: 'history' must be a list of step records; the "
                              "checkpoint is damaged.")
    if not isinstance(state.get("before", {}), dict) or not isinstance(state.get("fingerprint", {}), dict):
        raise CheckpointError(f"{where}/trainer_state.json: 'before' and 'fingerprint' must be objects; the "
                              "checkpoint is damaged.")
    if not isinstance(ckpt.rng, list) or not ckpt.rng or not all(isinstance(r, dict) for r in ckpt.rng):
        raise CheckpointError(f"{where}/rng.pt must hold a list of per-process RNG states; the checkpoint is damaged.")
    if not isinstance(ckpt.hooks, list):
        raise CheckpointError(f"{where}/hooks.pt must hold a list of hook states; the checkpoint is damaged.")
    bad = [k for k, v in ckpt.trainable.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}/trainable.safetensors: non-float or non-finite tensors {bad[:5]}; resume "
                              "from an older checkpoint.")


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, where: Path) -> None:
    """``saved`` is this optimizer's state: same groups, same sizes, per-parameter tensors of the
    parameters' shapes. torch itself checks only the group sizes, and a mismatch surfaces steps later."""
    name = f"{where}/optimizer.pt"
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{name}: not an optimizer state (param_groups, state); the checkpoint is damaged.")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
            not isinstance(g, dict) or len(g.get("params", ())) != len(mine["params"])
            for g, mine in zip(saved["param_groups"], groups)):
        raise CheckpointError(f"{name}: its parameter groups do not match this run's optimizer (from another run or "
                              "another method); resume with the original settings.")
    params = [p for g in groups for p in g["params"]]
    for key, entry in saved["state"].items():
        if not isinstance(key, int) or not 0 <= key < len(params) or not isinstance(entry, dict):
            raise CheckpointError(f"{name}: state entry {key!r} names no parameter of this run's optimizer.")
        for field, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[key].shape:
                raise CheckpointError(
                    f"{name}: {field} of parameter {key} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(params[key].shape)}; the optimizer state is from another run.")


def resume_from(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, hooks: list,
                total_steps: int, fingerprint: dict[str, Any], args: TrainArgs, rank: int = 0):
    """Load checkpoint ``path`` into the run: every check first, then RNG, hooks, parameters, optimizer.
    On any failure the parameters' values and the RNG state are put back before the error propagates."""
    from . import checkpoint as ckpt

    state = ckpt.load_checkpoint(path)
    check_checkpoint(state, total_steps)
    saved_fp = dict(state.state.get("fingerprint", {}))
    check_data_unchanged(saved_fp, fingerprint, args, path)
    ckpt.check_fingerprint(saved_fp, fingerprint, path)
    if not hooks:  # a hook may reshape parameters (AdaLoRA), then the check waits until it has
        check_optimizer_state(optimizer, state.optimizer, path)
    params = dict(model.named_parameters())
    kept = {k: p.detach().clone() for k, p in params.items() if k in state.trainable}
    rng_now = ckpt.rng_state()
    try:
        guarded("rng.pt", path, ckpt.set_rng_state, state.rng[rank] if rank < len(state.rng) else state.rng[0])
        for hook, hook_state in zip(hooks, state.hooks):
            guarded("hooks.pt", path, hook.load_state_dict, hook_state)  # first: a hook may reshape (AdaLoRA)
        check_optimizer_state(optimizer, state.optimizer, path)
        load_trainable(model, state.trainable, path)
        guarded("optimizer.pt", path, optimizer.load_state_dict, state.optimizer)
    except BaseException:
        ckpt.set_rng_state(rng_now)
        with torch.no_grad():
            for k, value in kept.items():
                if params[k].shape == value.shape:
                    params[k].copy_(value)
        raise
    return state


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the checkpoint's trainable tensors into ``model`` after checking names and shapes."""
    params = dict(model.named_parameters())
    problems = [f"{k}: not a parameter of the model" for k in tensors if k not in params]
    problems += [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                 for k, v in tensors.items() if k in params and params[k].shape != v.shape]
    problems += [f"{k}: trainable but not in the checkpoint" for k, p in params.items()
                 if p.requires_grad and k not in tensors]
    if problems:
        raise CheckpointError(f"{path} does not fit this model:\n  " + "\n  ".join(problems[:20]))
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))


def guarded(what: str, where: Path, fn, *args) -> Any:
    """Run ``fn(*args)`` (restoring RNG or hook state from a checkpoint) with the errors torch, numpy and
    Python raise on malformed state reported as a ``CheckpointError``."""
    try:
        return fn(*args)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: {what} cannot be restored ({type(exc).__name__}: {exc}); the checkpoint "
                              "is damaged or from another run — resume from an older one.") from None
