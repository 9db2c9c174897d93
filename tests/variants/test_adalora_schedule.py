"""The budget schedule b(t) (§3.3) at every step against the formula, PEFT's schedule, and bad input."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.errors import LorakitError
from lorakit.variants.adalora import AdaLoraConfig, AdaLoraScheduleError, budget_schedule
from lorakit.variants.adalora.errors import AdaLoraBudgetError

CASES = [  # (b0, bT, tinit, tfinal, T, deltaT)
    (24, 8, 2, 2, 10, 1),
    (96, 64, 10, 30, 100, 1),
    (1200, 800, 50, 100, 300, 10),
    (36, 12, 0, 0, 25, 3),
    (7, 7, 1, 1, 5, 1),
]


def reference(t, b0, bT, ti, tf, T, dT):
    """§3.3 written out: warm-up, cubic decrease (floored), final; mask every ΔT and at T − t_f."""
    if t <= ti:
        return b0, False
    if t >= T - tf:
        return bT, t == T - tf
    frac = 1 - Fraction(t - ti, T - ti - tf)
    return bT + int((b0 - bT) * frac**3), t % dT == 0


@pytest.mark.parametrize("case", CASES)
def test_every_step_matches_the_formula(case):
    b0, bT, ti, tf, T, dT = case
    budgets = []
    for t in range(1, T + 1):
        got = budget_schedule(t, init_budget=b0, target_budget=bT, tinit=ti, tfinal=tf, total_step=T, deltaT=dT)
        assert (got.budget, got.mask) == reference(t, b0, bT, ti, tf, T, dT), t
        # the real-valued formula, before flooring, is within [b, b + 1)
        if ti < t < T - tf:
            real = bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3
            assert got.budget <= real + 1e-9 < got.budget + 1
        budgets.append(got.budget)
    assert budgets == sorted(budgets, reverse=True)  # never increases
    assert budgets[-1] == bT and budget_schedule(T - tf, init_budget=b0, target_budget=bT, tinit=ti, tfinal=tf,
                                                 total_step=T).phase == "final"


@given(b0=st.integers(1, 500), frac=st.floats(0, 1), ti=st.integers(0, 50), tf=st.integers(0, 50),
       extra=st.integers(1, 200), dT=st.integers(1, 20))
@settings(max_examples=60, deadline=None)
def test_property_matches_formula(b0, frac, ti, tf, extra, dT):
    bT = int(b0 * frac)
    T = ti + tf + extra
    for t in range(1, T + 2):
        got = budget_schedule(t, init_budget=b0, target_budget=bT, tinit=ti, tfinal=tf, total_step=T, deltaT=dT)
        assert (got.budget, got.mask) == reference(t, b0, bT, ti, tf, T, dT)


def test_agrees_with_peft_schedule():
    peft_layer = pytest.importorskip("peft.tuners.adalora.layer")
    for b0, bT, ti, tf, T, dT in CASES:
        alloc = peft_layer.RankAllocator.__new__(peft_layer.RankAllocator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from peft import AdaLoraConfig as PeftConfig

            alloc.peft_config = PeftConfig(tinit=ti, tfinal=tf, total_step=T, deltaT=dT, target_modules=["x"])
        alloc.init_bgt, alloc.target_bgt = b0, bT
        for t in range(1, T - tf + 1):  # up to the final allocation; PEFT then re-masks every step
            ours = budget_schedule(t, init_budget=b0, target_budget=bT, tinit=ti, tfinal=tf, total_step=T, deltaT=dT)
            budget, mask = alloc.budget_schedule(t)
            # at t = T − t_f PEFT's update_and_allocate forces the mask (force_mask=True)
            assert (ours.budget, ours.mask) == (budget, mask or t == T - tf), (t, b0, bT)


def test_phases():
    kw = dict(init_budget=20, target_budget=10, tinit=2, tfinal=3, total_step=10)
    phases = [budget_schedule(t, **kw).phase for t in range(1, 11)]
    assert phases == ["warmup"] * 2 + ["budgeting"] * 4 + ["final"] + ["fine-tune"] * 3


@pytest.mark.parametrize("kw, fix", [
    (dict(total_step=None), "total_step is missing"),
    (dict(total_step=10, tinit=5, tfinal=5), r"need tinit \+ tfinal < total_step"),
    (dict(total_step=4, tinit=4, tfinal=0), "Raise total_step"),
])
def test_bad_schedule_names_the_fix(kw, fix):
    args = dict(init_budget=10, target_budget=5, tinit=0, tfinal=0)
    args.update(kw)
    with pytest.raises(AdaLoraScheduleError, match=fix) as exc:
        budget_schedule(3, **args)
    assert isinstance(exc.value, LorakitError)
    if kw["total_step"] is not None:
        with pytest.raises(AdaLoraScheduleError):
            AdaLoraConfig(target_modules=["q"], total_step=kw["total_step"], tinit=kw["tinit"], tfinal=kw["tfinal"])


def test_target_above_initial_budget_is_refused():
    with pytest.raises(AdaLoraBudgetError, match="Lower target_r or raise init_r"):
        AdaLoraConfig(init_r=4, target_r=6, target_modules=["q"], total_step=10)
