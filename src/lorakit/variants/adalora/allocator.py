"""AdaLoRA's rank allocator: importance scores and the global top-b(t) mask (Zhang et al. 2023, §3.2–3.3).

For every entry w of P, λ and Q, after each backward:

    I(w)  = |w · ∂L/∂w|                               sensitivity
    Ī(w) ← β1 · Ī(w) + (1 − β1) · I(w)                smoothed sensitivity
    Ū(w) ← β2 · Ū(w) + (1 − β2) · |I(w) − Ī(w)|       uncertainty (with the updated Ī)
    s(w)  = Ī(w) · Ū(w)

and the score of triplet i of a matrix with P (d1, r), Q (r, d2):

    S_i = s(λ_i) + (1/d1) Σ_j s(P_ji) + (1/d2) Σ_j s(Q_ij)

At a masking step the b(t) highest-scoring triplets over *all* adapted matrices keep their λ and the
others' λ are set to zero (``budget_schedule`` gives b(t)). The selection is an exact top-b, so the
total kept rank is b(t) (the authors' code and PEFT threshold with ``kthvalue`` and ``<=``, which
drops every triplet tied at the threshold). At the final allocation the adapters are cut
(:func:`shrink`) when an optimizer is at hand to follow the change; otherwise the final mask is
re-applied after every step, as PEFT does.

Use it through the training hook (automatic) or, in a loop of your own, with one call::

    loss.backward(); optimizer.step()
    allocator.step(model, global_step, optimizer)   # global_step = 1, 2, …, T; before zero_grad()
    optimizer.zero_grad()
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...state import require_adapter
from .config import AdaLoraConfig, check_schedule
from .errors import AdaLoraBudgetError
from .layer import KIND, SVDAdapter, svd_adapters
from .schedule import BudgetStep, budget_schedule
from .shrink import shrink

ROLES = ("lora_A", "lora_E", "lora_B")  # Q, λ, P


class RankAllocator:
    """Tracks Ī, Ū for adapter ``adapter_name`` of ``model`` and masks to the budget schedule."""

    def __init__(self, model: nn.Module, adapter_name: str = "default", config: AdaLoraConfig | None = None,
                 *, cut: bool = True, remove_empty: bool = True):
        """``cut``: cut the factors at the final allocation (when an optimizer is at hand);
        ``remove_empty``: remove adapters cut to rank 0 (else leave zero-size stubs)."""
        rec = require_adapter(model, adapter_name)
        if rec.kind != KIND:
            raise ConfigError(f"adapter {adapter_name!r} is a {rec.kind} adapter; the rank allocator needs an "
                              "AdaLoRA adapter (lorakit.variants.adalora.inject_adalora).")
        self.config = config or rec.config
        check_schedule(self.config.total_step, self.config.tinit, self.config.tfinal)
        self.adapter_name = adapter_name
        self.adapters: dict[str, SVDAdapter] = svd_adapters(model, adapter_name)
        self.init_budget = sum(ad.r for ad in self.adapters.values())  # b(0)
        self.target_budget = self.config.target_r * len(self.adapters)  # b(T)
        if self.target_budget > self.init_budget:
            raise AdaLoraBudgetError(
                f"target budget b(T) = target_r {self.config.target_r} × {len(self.adapters)} matrices = "
                f"{self.target_budget} is above the initial budget b(0) = {self.init_budget} (the adapters' "
                "current ranks): lower target_r, or start from a fresh adapter with a larger init_r."
            )
        self.ema_ipt: dict[str, dict[str, torch.Tensor]] = {}  # path → role → Ī
        self.ema_unc: dict[str, dict[str, torch.Tensor]] = {}  # path → role → Ū
        self.cut, self.remove_empty = cut, remove_empty
        self.finalized = False  # the final allocation happened
        self.shrunk = False  # … and the factors were cut
        self._warned = False

    # -- the schedule -----------------------------------------------------------------------------
    def schedule(self, step: int) -> BudgetStep:
        c = self.config
        return budget_schedule(step, init_budget=self.init_budget, target_budget=self.target_budget,
                               tinit=c.tinit, tfinal=c.tfinal, total_step=c.total_step, deltaT=c.deltaT)

    # -- importance (§3.2) ------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current gradients into Ī and Ū; call after backward, before zero_grad."""
        b1, b2 = self.config.beta1, self.config.beta2
        for path, ad in self.adapters.items():
            ipt, unc = self.ema_ipt.setdefault(path, {}), self.ema_unc.setdefault(path, {})
            for role in ROLES:
                p = getattr(ad, role)
                sens = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)  # I
                if role not in ipt:
                    ipt[role], unc[role] = torch.zeros_like(p), torch.zeros_like(p)
                ipt[role].mul_(b1).add_(sens, alpha=1 - b1)
                unc[role].mul_(b2).add_((sens - ipt[role]).abs_(), alpha=1 - b2)

    def scores(self) -> dict[str, torch.Tensor]:
        """Module path → S (r,), the triplet scores; zeros before the first importance update."""
        out = {}
        for path, ad in self.adapters.items():
            if path not in self.ema_ipt:
                out[path] = torch.zeros(ad.r, device=ad.lora_E.device)
                continue
            s = {role: self.ema_ipt[path][role] * self.ema_unc[path][role] for role in ROLES}
            out[path] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return out

    @torch.no_grad()
    def mask(self, budget: int) -> dict[str, int]:
        """Keep the ``budget`` highest-scoring triplets over all matrices; returns path → rank."""
        scores = self.scores()
        paths = list(scores)
        flat = torch.cat([scores[p].float().cpu() for p in paths])  # (Σ r,)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel()), sorted=False).indices] = True
        ranks, start = {}, 0
        for path in paths:
            ad = self.adapters[path]
            ad.mask_(keep[start:start + ad.r])
            ranks[path] = ad.rank
            start += ad.r
        return ranks

    # -- one training step ------------------------------------------------------------------------
    def step(self, model: nn.Module, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> BudgetStep:
        """Update the importance from the current gradients, then mask / finalize per the schedule.

        ``global_step`` counts optimizer steps done including this one (1 … T). Call it after
        ``optimizer.step()`` and before ``optimizer.zero_grad()``; pass the optimizer so the final
        allocation can cut the factors (without it the final mask is re-applied every step).
        """
        if not self.finalized and global_step <= self.config.total_step - self.config.tfinal:
            self.update_importance()
        return self.allocate(model, global_step, optimizer)

    def allocate(self, model: nn.Module, global_step: int,
                 optimizer: torch.optim.Optimizer | None = None) -> BudgetStep:
        """The masking half of :meth:`step` (the hook calls it after ``optimizer.step()``)."""
        b = self.schedule(global_step)
        if self.finalized:
            if not self.shrunk:  # λ's of pruned triplets moved during the step: zero them again
                for ad in self.adapters.values():
                    ad.mask_(ad.kept)
            return b
        if b.phase in ("final", "fine-tune"):
            if self.cut and optimizer is None and not self._warned:
                self._warned = True
                warnings.warn(
                    "AdaLoRA: the allocation is final but no optimizer was passed, so the factors are only "
                    "masked (not cut). Pass the optimizer to RankAllocator.step, or call "
                    "lorakit.variants.adalora.shrink(model) after training.", stacklevel=3)
            self.finalize(model, optimizer, cut=self.cut and optimizer is not None)
        elif b.mask:
            self.mask(b.budget)
        return b

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 cut: bool = True) -> dict[str, int]:
        """The final allocation: mask to b(T) (once), then, with ``cut``, cut the factors to it
        (``optimizer``'s state follows). Idempotent; returns path → rank."""
        if not self.finalized:
            self.mask(self.target_budget)
            self.finalized = True
            self.ema_ipt.clear()
            self.ema_unc.clear()
        if cut and not self.shrunk:
            shrink(model, self.adapter_name, optimizer, remove_empty=self.remove_empty)
            self.adapters = svd_adapters(model, self.adapter_name)
            self.shrunk = True
        return {path: ad.rank for path, ad in self.adapters.items()}

    def total_rank(self) -> int:
        return sum(ad.rank for ad in self.adapters.values())

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"ema_ipt": self.ema_ipt, "ema_unc": self.ema_unc, "finalized": self.finalized,
                "shrunk": self.shrunk, "init_budget": self.init_budget,
                "kept": {p: ad.kept.clone() for p, ad in self.adapters.items()},
                "index": {p: ad.index.tolist() for p, ad in self.adapters.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's allocator; adapters must already have the checkpoint's shapes
        (:func:`restore_shapes`)."""
        self.ema_ipt = {p: dict(v) for p, v in state["ema_ipt"].items()}
        self.ema_unc = {p: dict(v) for p, v in state["ema_unc"].items()}
        self.finalized, self.shrunk = bool(state["finalized"]), bool(state["shrunk"])
        self.init_budget = int(state.get("init_budget", self.init_budget))
        for path, kept in state.get("kept", {}).items():
            ad = self.adapters.get(path)
            if ad is not None and ad.r == kept.numel():
                ad.mask_(kept)


def restore_shapes(model: nn.Module, adapter_name: str, index: dict[str, list[int]]) -> None:
    """Cut fresh adapters to the triplets a checkpoint kept (``index``: path → original positions),
    so that the checkpoint's tensors and optimizer state fit before they are loaded. In place (the
    parameters stay the objects an optimizer already holds): call it before the first forward pass."""
    for path, ad in svd_adapters(model, adapter_name).items():
        if path in index and ad.r != len(index[path]):
            wanted = set(index[path])
            ad.cut_(torch.tensor([i in wanted for i in ad.index.tolist()], dtype=torch.bool), new_params=False)
