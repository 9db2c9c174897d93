"""The budget schedule b(t) (§3.3) at every step against the formula, PEFT's schedule, and bad input."""

from __future__ import annotations

import warnings

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


# b(t) worked out by hand from §3.3 (b(t) = b_T + ⌊(b_0 − b_T)(1 − (t − t_i)/(T − t_i − t_f))³⌋ between the
# warm-ups), e.g. for (24, 8, t_i=2, t_f=2, T=10): t=3: 16·(5/6)³ = 9.26 → 17; t=4: 16·(2/3)³ = 4.74 → 12;
# t=5: 16/8 = 2 → 10; t=6: 16/27 → 8; the final allocation (mask) at T − t_f = 8, fine-tuning after.
HAND = {
    (24, 8, 2, 2, 10, 1): {t: (b, m) for t, b, m in zip(
        range(1, 11), [24, 24, 17, 12, 10, 8, 8, 8, 8, 8], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])},
    # t=51: 400·(149/150)³ = 392.05 → 1192; t=60: 400·(14/15)³ = 325.2 → 1125 (60 mod 10 = 0: mask);
    # t=125: 400/8 = 50 → 850 (no mask: 125 mod 10 ≠ 0); t=199: 400/150³ → 800; t=200 = T − t_f: final.
    (1200, 800, 50, 100, 300, 10): {50: (1200, 0), 51: (1192, 0), 60: (1125, 1), 125: (850, 0), 199: (800, 0),
                                    200: (800, 1), 201: (800, 0), 300: (800, 0)},
    # t_i = t_f = 0, T = 25, ΔT = 3: t=1: 24·(24/25)³ = 21.23 → 33 (no mask); t=3: 24·(22/25)³ = 16.36 → 28.
    (36, 12, 0, 0, 25, 3): {1: (33, 0), 2: (30, 0), 3: (28, 1), 6: (22, 1), 24: (12, 1), 25: (12, 1)},
}


@pytest.mark.parametrize("case", list(HAND))
def test_matches_hand_computed_budgets(case):
    b0, bT, ti, tf, T, dT = case
    for t, (budget, mask) in HAND[case].items():
        got = budget_schedule(t, init_budget=b0, target_budget=bT, tinit=ti, tfinal=tf, total_step=T, deltaT=dT)
        assert (got.budget, got.mask) == (budget, bool(mask)), t


@given(b0=st.integers(1, 500), frac=st.floats(0, 1), ti=st.integers(0, 50), tf=st.integers(0, 50),
       extra=st.integers(1, 200), dT=st.integers(1, 20))
@settings(max_examples=60, deadline=None)
def test_properties_of_the_schedule(b0, frac, ti, tf, extra, dT):
    """What §3.3 says, checked without restating the implementation: b_0 through the warm-up, within one
    of the real-valued cubic (floored) while budgeting, b_T from T − t_f on; never increasing; masks
    every ΔT steps while budgeting and once at T − t_f."""
    bT = int(b0 * frac)
    T = ti + tf + extra
    budgets = []
    for t in range(1, T + 2):
        got = budget_schedule(t, init_budget=b0, target_budget=bT, tinit=ti, tfinal=tf, total_step=T, deltaT=dT)
        budgets.append(got.budget)
        if t <= ti:
            assert (got.budget, got.mask, got.phase) == (b0, False, "warmup")
        elif t < T - tf:
            real = bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3
            assert got.budget <= real + 1e-9 < got.budget + 1
            assert got.mask == (t % dT == 0) and got.phase == "budgeting"
        else:
            assert got.budget == bT and got.mask == (t == T - tf)
    assert budgets == sorted(budgets, reverse=True)


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
