"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): adaptive rank allocation for LoRA.

An adapter kind plus a training-time allocator with a pure budget-schedule function:

* :class:`SVDAdapter` / :func:`inject_adalora` — ΔW = P·diag(λ)·Q in the core adapter contract (§3.1);
* :func:`orth_regularizer`                      — R(P, Q), eq. 4 or the official form (§3.1);
* :class:`RankAllocator`                        — importance scores and a global top-b(t) mask (§3.2);
* :func:`budget_schedule`                       — the cubic budget b(t) (§3.3), pure;
* :func:`shrink`                                — cut the factors to the allocated ranks for real;
* :class:`AdaLoraHook`                          — all of the above, automatic in lorakit's loop;
* :func:`save_adalora` / :func:`load_adalora`   — PEFT's ``ADALORA`` adapter format, both ways.

Example (a loop of your own)::

    from lorakit.variants.adalora import AdaLoraConfig, RankAllocator, inject_adalora, orth_regularizer
    cfg = AdaLoraConfig(init_r=12, target_r=8, tinit=200, tfinal=500, deltaT=10, total_step=3000,
                        target_modules=["q_proj", "v_proj"])
    model = inject_adalora(model, cfg)
    allocator = RankAllocator(model)
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss + cfg.orth_reg_weight * orth_regularizer(allocator.adapters.values())
        loss.backward(); optimizer.step()
        allocator.step(model, step, optimizer)      # importance, mask, final cut
        optimizer.zero_grad()
"""

from .allocator import RankAllocator
from .config import AdaLoraConfig
from .errors import AdaLoraBudgetError, AdaLoraScheduleError, RankPatternError
from .hook import AdaLoraHook
from .io import load_adalora, save_adalora
from .layer import SVDAdapter, inject_adalora, svd_adapters
from .method import AUTO_WARMUPS, adalora_config
from .plot import format_rank_table, plot_rank_heatmap, rank_grid
from .regularizer import orth_regularizer
from .schedule import BudgetStep, budget_schedule
from .shrink import current_ranks, patch_optimizer, shrink

__all__ = [
    "AUTO_WARMUPS",
    "adalora_config",
    "AdaLoraBudgetError",
    "AdaLoraConfig",
    "AdaLoraHook",
    "AdaLoraScheduleError",
    "BudgetStep",
    "RankAllocator",
    "RankPatternError",
    "SVDAdapter",
    "budget_schedule",
    "current_ranks",
    "format_rank_table",
    "inject_adalora",
    "load_adalora",
    "orth_regularizer",
    "patch_optimizer",
    "plot_rank_heatmap",
    "rank_grid",
    "save_adalora",
    "shrink",
    "svd_adapters",
]
