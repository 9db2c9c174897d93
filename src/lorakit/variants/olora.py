"""O-LoRA: orthogonal subspaces for continual learning (Wang et al., EMNLP 2023 Findings,
arXiv 2310.14152) — an adapter kind plus a loss term.

Tasks arrive one after the other. For task t every adapted layer holds the frozen factors of the
tasks before it and a fresh trainable pair (A_t, B_t)::

    y = W x + [B_past | B_t] · s · [A_past ; A_t] x          A_past: (R, in), A_t: (r, in)
      = W x + Σ_{i<t} s_i B_i A_i x  +  s B_t A_t x          (one fused rank-(R + r) branch)

§3.2 of the paper constrains the new *down-projection* A_t to be orthogonal to the past ones —
``A_i A_tᵀ = 0`` — through the loss term

    L = L_task + λ1 Σ_layers Σ_{i<t} overlap(A_i, A_t)  (+ λ2 Σ_layers ‖A_t‖² + ‖B_t‖²)

where ``overlap`` sums either the squared entries of ``A_i A_tᵀ`` (the paper's Eq. 4) or their
absolute values (the authors' code, ``torch.abs(torch.mm(lora_A, loranew_A.T)).sum()``, with
λ1 = 0.5). lorakit defaults to the code's ``"abs"`` with λ1 = 0.5 — the setting the published
numbers were produced with — and offers ``"square"``. λ2 defaults to 0 (the code's default too;
note its L2 term is ``‖·‖`` unsquared; lorakit's ``l2="norm"`` gives that, ``"square"`` ‖·‖²).

After a task, :func:`next_task` appends the new factors to the past ones (the paper's §3.3
"after training on task t, merge"): A_past ← [A_past; A_t], B_past ← [B_past | s·B_t]. The scaling is
folded into the stored past B, so the sum of updates stays exact even if tasks used different
scalings. No task id is needed at inference: every past update is always on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..adapter_kinds.olora import OLORA, OLoraAdapter
from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterNotFoundError, ConfigError
from ..hooks import BaseHook
from ..inject import inject
from ..io import PREFIX, read_adapter_config, read_adapter_weights, save_adapter
from ..state import lora_layers, require_adapter

KIND = OLORA.name
Overlap = Literal["abs", "square"]


# -- attaching and advancing ------------------------------------------------------------------------
def add_olora(model: nn.Module, config: LoraConfig, adapter_name: str = KIND) -> nn.Module:
    """Add an O-LoRA adapter (no past tasks yet) to the modules ``config`` targets; it becomes the
    active, trainable adapter and everything else is frozen except what ``modules_to_save`` and
    ``bias`` ask to train (the one ``inject`` path, ``kind=OLORA``). Returns ``model``."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a lorakit.LoraConfig (r, lora_alpha, target_modules, ...), "
                          f"got {type(config).__name__}.")
    if config.use_dora or config.fused_slices:  # OLORA builds plain factor pairs: both were silently dropped
        raise ConfigError("O-LoRA adapters are plain LoRA factors (past + new); use_dora / fused_slices do not "
                          "apply to them. Drop them from the config.")
    return inject(model, config, adapter_name, kind=OLORA)


def olora_adapters(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, OLoraAdapter]]:
    """(layer path, adapter) of every O-LoRA adapter (of ``adapter_name`` if given)."""
    for path, host in lora_layers(model):
        for name, adapter in host.lora.items():
            if isinstance(adapter, OLoraAdapter) and (adapter_name is None or name == adapter_name):
                yield path, adapter


def next_task(model: nn.Module, adapter_name: str = KIND) -> int:
    """Freeze the current task's factors into the past and start a fresh pair; returns tasks done.

    Call it between tasks. The fresh factors reuse the same ``nn.Parameter`` objects (re-initialised),
    so build a new optimizer for the next task — stale Adam moments would otherwise leak across tasks.
    """
    adapters = [a for _, a in olora_adapters(model, adapter_name)]
    if not adapters:
        raise AdapterNotFoundError(f"the model has no O-LoRA adapter named {adapter_name!r}; "
                                   "add one with lorakit.variants.olora.add_olora(model, config).")
    for adapter in adapters:
        adapter.consolidate()
    return len(adapters[0].past_ranks)


# -- the loss term ----------------------------------------------------------------------------------
def overlap(past_a: torch.Tensor, new_a: torch.Tensor, mode: Overlap = "abs") -> torch.Tensor:
    """Σ over the entries of ``A_past · A_newᵀ`` (R × r) of |·| (``"abs"``) or (·)² (``"square"``).

    ``past_a``: (R, in…), ``new_a``: (r, in…); kernels are flattened into ``in``.
    """
    if past_a.shape[0] == 0:
        return new_a.new_zeros(())
    o = past_a.flatten(1).to(new_a.dtype) @ new_a.flatten(1).T  # (R, in) @ (in, r) -> (R, r)
    if mode == "abs":
        return o.abs().sum()
    if mode == "square":
        return o.square().sum()
    raise ConfigError(f"overlap mode {mode!r}: use 'abs' (the authors' code) or 'square' (the paper's Eq. 4).")


def check_loss_options(owner: str, lambda_orth: Any, lambda_l2: Any, mode: Any, l2: Any) -> None:
    """λ1, λ2 finite and ≥ 0 (a NaN λ turns every step's loss into NaN, a negative one rewards overlap),
    ``mode`` and ``l2`` one of their names; ``owner`` starts the message."""
    for name, v in (("lambda_orth", lambda_orth), ("lambda_l2", lambda_l2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{owner} {name}={v!r}: must be a finite number >= 0 (the paper uses 0.5 for λ1).")
    if mode not in ("abs", "square"):
        raise ConfigError(f"{owner} overlap={mode!r}: use 'abs' (the authors' code) or 'square' (the paper's Eq. 4).")
    if l2 not in ("square", "norm"):
        raise ConfigError(f"{owner} l2={l2!r}: use 'square' (‖·‖²) or 'norm' (‖·‖, the authors' code).")


def olora_loss(model: nn.Module, lambda_orth: float = 0.5, lambda_l2: float = 0.0,
               mode: Overlap = "abs", l2: Literal["square", "norm"] = "square",
               adapter_name: str | None = None) -> torch.Tensor | None:
    """λ1 Σ_layers overlap(A_past, A_t) + λ2 Σ_layers r2(A_t) + r2(B_t); None when there is nothing."""
    check_loss_options("olora_loss", lambda_orth, lambda_l2, mode, l2)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"olora_loss: model must be a torch.nn.Module with an O-LoRA adapter, "
                          f"got {type(model).__name__}.")
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise ConfigError(f"olora_loss: adapter_name={adapter_name!r} must be an adapter name (str) or None.")
    terms = []
    for _, ad in olora_adapters(model, adapter_name):
        if lambda_orth and ad.past_rank:
            terms.append(lambda_orth * overlap(ad.past_A, ad.lora_A, mode))
        if lambda_l2:
            if l2 == "square":
                terms.append(lambda_l2 * (ad.lora_A.square().sum() + ad.lora_B.square().sum()))
            else:
                terms.append(lambda_l2 * (ad.lora_A.norm() + ad.lora_B.norm()))
    return torch.stack(terms).sum() if terms else None


@dataclass
class OLoraHook(BaseHook):
    """The training loop's hook (``lorakit.hooks.TrainHook``): adds :func:`olora_loss` to every
    micro-batch's loss and logs it. ``lambda_orth`` is λ1, ``lambda_l2`` is λ2, ``overlap`` picks |·|
    or (·)², ``l2`` the norm form. (Written out instead of subclassing ``BaseHook`` so that importing
    this module never imports the training package.)
    """

    lambda_orth: float = 0.5
    lambda_l2: float = 0.0
    overlap: Overlap = "abs"
    l2: Literal["square", "norm"] = "square"
    adapter_name: str | None = None

    def __post_init__(self) -> None:
        check_loss_options("OLoraHook", self.lambda_orth, self.lambda_l2, self.overlap, self.l2)

    def on_train_start(self, ctx) -> None:
        if next(olora_adapters(ctx.model, self.adapter_name), None) is None:
            raise AdapterNotFoundError(
                "OLoraHook: the model has no O-LoRA adapter"
                + (f" named {self.adapter_name!r}" if self.adapter_name else "")
                + "; add one with lorakit.variants.olora.add_olora before training."
            )

    def extra_loss(self, ctx) -> torch.Tensor | None:
        loss = olora_loss(ctx.model, self.lambda_orth, self.lambda_l2, self.overlap, self.l2, self.adapter_name)
        if loss is not None:
            ctx.log["olora_loss"] = float(loss.detach())
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {}  # the past factors live in the model's state dict (buffers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# -- export -----------------------------------------------------------------------------------------
def export_lora(model: nn.Module, path: str | Path, adapter_name: str = KIND) -> Path:
    """Write the O-LoRA adapter (past + current tasks, plus its ``modules_to_save`` copies and biases)
    as one plain PEFT LoRA adapter of rank R + r — what ``lorakit.save_adapter`` does for this kind.

    The concatenated factors *are* a LoRA adapter; lora_alpha is set so that α/(R + r) = s, so PEFT
    and ``lorakit.load_adapter`` reproduce the summed update exactly.
    """
    if not any(True for _ in olora_adapters(model, adapter_name)):
        require_adapter(model, adapter_name)
        raise AdapterNotFoundError(f"adapter {adapter_name!r} has no O-LoRA layers to export.")
    return save_adapter(model, path, adapter_name)


def load_past(model: nn.Module, path: str | Path, adapter_name: str = KIND) -> int:
    """Load a LoRA adapter directory (e.g. the previous task's :func:`export_lora`, or any PEFT LoRA
    adapter) as the *past* factors of the O-LoRA adapter; returns the loaded rank of the first layer.

    This is how continual learning runs as separate ``lorakit train --method olora`` runs: each run
    saves past + current as one flat adapter, and the next run reads it back as its past.
    """
    raw = read_adapter_config(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{path}: peft_type {raw.get('peft_type')!r}; O-LoRA's past must be a LoRA adapter.")
    flat = LoraConfig.from_peft_dict(raw, source=str(Path(path)))
    weights = read_adapter_weights(path)
    layers = list(olora_adapters(model, adapter_name))
    if not layers:
        raise AdapterNotFoundError(f"the model has no O-LoRA adapter {adapter_name!r}; call add_olora first.")
    problems, plan = [], []
    for layer, ad in layers:
        a = weights.get(f"{PREFIX}{layer}.lora_A.weight")
        b = weights.get(f"{PREFIX}{layer}.lora_B.weight")
        if a is None or b is None:
            problems.append(f"{layer}: no lora_A/lora_B in the file")
        elif a.shape[1:] != ad.lora_A.shape[1:] or b.shape[0] != ad.lora_B.shape[0] or a.shape[0] != b.shape[1]:
            problems.append(f"{layer}: file has A {tuple(a.shape)}, B {tuple(b.shape)}; the layer needs "
                            f"A (R, {', '.join(map(str, ad.lora_A.shape[1:]))}), B ({ad.lora_B.shape[0]}, R)")
        else:
            plan.append((ad, a, b, flat.scaling_for(layer)))
    # a pair for a module the O-LoRA adapter does not target would be dropped: that task's update lost
    targeted = {layer for layer, _ in layers}
    problems += [f"{key[len(PREFIX):-len('.lora_A.weight')]}: in the file, but the O-LoRA adapter does not target it"
                 for key in sorted(weights) if key.startswith(PREFIX) and key.endswith(".lora_A.weight")
                 and key[len(PREFIX):-len(".lora_A.weight")] not in targeted]
    if problems:
        raise AdapterFileError(f"{path}: cannot be O-LoRA's past for this model:\n  " + "\n  ".join(problems[:20])
                               + "\nTrain every task of a sequence with the same target_modules.")
    with torch.no_grad():
        for ad, a, b, s in plan:
            ad.past_A = a.to(ad.past_A.device, ad.past_A.dtype).clone()
            ad.past_B = (b * s).to(ad.past_B.device, ad.past_B.dtype).clone()
            ad.past_ranks = [a.shape[0]]
    return plan[0][1].shape[0]


# -- `lorakit train --method olora` (the method itself is in lorakit.train.methods) -------------------
OPTIONS = ("lambda_orth", "lambda_l2", "overlap", "l2", "past")
