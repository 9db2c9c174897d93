"""AdaLoRA's global budget scheduler (Zhang et al. 2023, §3.3), as a pure function of the step.

With t the number of optimizer steps done *including* the current one (1, 2, …, T), b(0) the initial
and b(T) the target total rank::

    b(t) = b(0)                                                     t ≤ t_i             (warm-up)
    b(t) = b(T) + ⌊(b(0) − b(T)) · (1 − (t − t_i) / (T − t_i − t_f))³⌋   t_i < t < T − t_f   (budgeting)
    b(t) = b(T)                                                     t ≥ T − t_f         (final)

During budgeting the allocator masks every ΔT steps (t mod ΔT = 0); at t = T − t_f it masks to b(T)
for the last time and the allocation is frozen. The phases and the rounding down are those of the
authors' code and PEFT (``budget_schedule``); here the cube is computed in exact rational arithmetic,
so the floor never depends on float rounding.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

from ...errors import AdaLoraBudgetError
from ...validate import check_int
from .config import check_schedule


class BudgetStep(NamedTuple):
    budget: int  # b(t): total number of triplets kept over all adapted matrices
    mask: bool  # whether the allocator masks to ``budget`` at this step
    phase: str  # "warmup" | "budgeting" | "final" (the last mask) | "fine-tune" (frozen afterwards)


def budget_schedule(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int = 1) -> BudgetStep:
    """b(t) and whether to mask at optimizer step ``step`` (1-based), per §3.3 (see module docstring)."""
    for name, value, low in (("step", step, 0), ("init_budget", init_budget, 0), ("target_budget", target_budget, 0),
                             ("tinit", tinit, 0), ("tfinal", tfinal, 0), ("deltaT", deltaT, 1)):
        check_int(f"budget_schedule {name}", value, minimum=low)  # '3' or 1.5 was a TypeError in the arithmetic
    if target_budget > init_budget:
        raise AdaLoraBudgetError(f"budget_schedule: target_budget={target_budget} is above init_budget={init_budget}; "
                                 "AdaLoRA only prunes — give a target at most the initial budget.")
    check_schedule(total_step, tinit, tfinal)
    end = total_step - tfinal  # the step of the final allocation
    if step <= tinit:
        return BudgetStep(init_budget, False, "warmup")
    if step >= end:
        return BudgetStep(target_budget, step == end, "final" if step == end else "fine-tune")
    c = 1 - Fraction(step - tinit, end - tinit)
    budget = target_budget + int((init_budget - target_budget) * c**3)  # int() = floor: the term is ≥ 0
    return BudgetStep(budget, step % deltaT == 0, "budgeting")
