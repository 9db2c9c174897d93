"""AdaLoRA as a training hook: the rank allocator runs by itself in lorakit's loop.

PEFT leaves ``update_and_allocate`` to the user; a loop that forgets it trains a plain SVD-form LoRA
at full rank with no warning. Here the loop calls the hook (``lorakit.hooks``):

* ``on_train_start``  builds the :class:`RankAllocator` (``total_step`` from the run's length if the
                      config leaves it out);
* ``extra_loss``      adds γ · R(P, Q), the orthogonal regulariser (§3.1, eq. 4);
* ``after_backward``  folds |w·∇w| into Ī and Ū (§3.2) — gradients of the pre-step weights, as in
                      the paper's Algorithm 1;
* ``after_step``      masks to b(t) per the schedule (§3.3); at t = T − t_f (or at the run's last step,
                      whichever comes first) makes the final allocation and cuts the factors, slicing
                      the optimizer's state in place (``ctx.optimizer`` stays the same object);
* ``on_train_end``    removes rank-0 adapters, prints the rank table and writes
                      ``adalora_ranks.png`` / ``adalora_ranks.json`` into ``ctx.output_dir``.

During training, adapters cut to rank 0 stay as zero-size stubs (no compute) so that parameter names,
and with them the loop's checkpoints, stay stable; ``state_dict`` records the cut so that a resumed
run reshapes a fresh model before the checkpoint's tensors are loaded. With several processes (DDP)
the factors are only masked during training (DDP's gradient buckets are fixed at wrap time) and cut
at the end.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ...hooks import BaseHook, HookContext
from ...state import require_adapter
from .allocator import RankAllocator, restore_shapes
from .config import check_schedule
from .plot import format_rank_table, write_rank_report
from .regularizer import orth_regularizer
from .shrink import current_ranks, shrink


class AdaLoraHook(BaseHook):
    """Runs AdaLoRA's allocator and regulariser for adapter ``adapter_name`` inside the training loop.

    Args:
        model: the model, when known at construction (``--method adalora`` passes it): lets
            ``load_state_dict`` reshape the adapters before a checkpoint is loaded into them.
        auto_warmups: ``(a, b)``: when the config has no ``total_step``, also set t_i = ⌊a·T⌋ and
            t_f = ⌊b·T⌋ from the run's length T.
        report / verbose: write the rank heatmap + JSON at the end / print the rank table.
    """

    def __init__(self, adapter_name: str = "default", *, model: nn.Module | None = None,
                 auto_warmups: tuple[float, float] | None = None, report: bool = True, verbose: bool = True):
        self.adapter_name = adapter_name
        self.model = model
        self.auto_warmups = auto_warmups
        self.report = report
        self.verbose = verbose
        self.allocator: RankAllocator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._t: int | None = None  # the step whose gradients after_backward read (1-based)

    def on_train_start(self, ctx: HookContext) -> None:
        self.model = ctx.model
        config = require_adapter(ctx.model, self.adapter_name).config
        total = int(ctx.total_steps)
        if config.total_step is None:
            if self.auto_warmups is not None:
                config.tinit, config.tfinal = (math.floor(f * total) for f in self.auto_warmups)
            check_schedule(total, config.tinit, config.tfinal)
            config.total_step = total  # also saved with the adapter (PEFT requires it)
        elif config.total_step > total:
            warnings.warn(
                f"AdaLoRA: total_step={config.total_step} is longer than this run ({total} steps); the final "
                "allocation will be forced at the run's last step. Set total_step to the run's length (or leave "
                "it out) for the schedule of §3.3.", stacklevel=2)
        accelerator = ctx.extra.get("accelerator")
        distributed = accelerator is not None and getattr(accelerator, "num_processes", 1) > 1
        if self._pending_state is not None:
            restore_shapes(ctx.model, self.adapter_name, self._pending_state.get("index", {}))
        self.allocator = RankAllocator(ctx.model, self.adapter_name, config, cut=not distributed, remove_empty=False)
        if self._pending_state is not None:
            self.allocator.load_state_dict(self._pending_state)
            self._pending_state = None

    def extra_loss(self, ctx: HookContext) -> torch.Tensor | None:
        alloc = self.allocator
        if alloc is None or alloc.config.orth_reg_weight == 0:
            return None
        reg = orth_regularizer(alloc.adapters.values(), alloc.config.orth_reg_form)
        if reg is None:
            return None
        ctx.log["adalora/orth_reg"] = float(reg.detach())
        return alloc.config.orth_reg_weight * reg

    def after_backward(self, ctx: HookContext) -> None:
        alloc = self.allocator
        self._t = ctx.step + 1
        if alloc is not None and not alloc.finalized and self._t <= alloc.config.total_step - alloc.config.tfinal:
            alloc.update_importance()

    def after_step(self, ctx: HookContext) -> None:
        alloc = self.allocator
        if alloc is None:
            return
        t = self._t if self._t is not None else ctx.step + 1
        self._t = None
        b = alloc.allocate(ctx.model, t, ctx.optimizer)  # a cut slices ctx.optimizer's state in place
        if t >= ctx.total_steps and not alloc.finalized:  # the run ends before T − t_f: finalize now
            alloc.finalize(ctx.model, ctx.optimizer, cut=alloc.cut)
        ctx.log["adalora/budget"] = float(b.budget)
        ctx.log["adalora/rank"] = float(alloc.total_rank())

    def on_train_end(self, ctx: HookContext) -> None:
        alloc = self.allocator
        if alloc is None:
            return
        alloc.finalize(ctx.model, ctx.optimizer, cut=True)  # no-op when the schedule already did it
        shrink(ctx.model, self.adapter_name, ctx.optimizer, remove_empty=True)  # drop rank-0 stubs
        ranks = current_ranks(ctx.model, self.adapter_name)
        if self.verbose:
            print(format_rank_table(ranks, f"AdaLoRA final ranks (target budget {alloc.target_budget})"))
        if self.report and ctx.output_dir is not None:
            c = alloc.config
            write_rank_report(ranks, ctx.output_dir, extra={
                "init_r": c.init_r, "target_r": c.target_r, "init_budget": alloc.init_budget,
                "target_budget": alloc.target_budget, "total_step": c.total_step, "tinit": c.tinit,
                "tfinal": c.tfinal, "deltaT": c.deltaT})

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict() if self.allocator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.model is not None:  # reshape now: the loop loads the checkpoint's tensors next
            restore_shapes(self.model, self.adapter_name, state.get("index", {}))
        if self.allocator is not None:
            self.allocator.load_state_dict(state)
        else:
            self._pending_state = state  # the allocator is built in on_train_start
