"""The rank allocator (§3.2–3.3): importance scores against a naive per-parameter loop, the global
top-b mask, the final budget, the physical cut with the optimizer's state following it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.variants.adalora import (
    AdaLoraBudgetError,
    AdaLoraConfig,
    RankAllocator,
    inject_adalora,
    shrink,
    svd_adapters,
)

from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def make(**kw):
    base = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=8,
                target_modules=TARGETS, init_lora_weights=False)
    base.update(kw)
    return inject_adalora(tiny_llama(), AdaLoraConfig(**base))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (2, 9), generator=g)


class NaiveScores:
    """Ī, Ū and S written out element by element with Python floats (the reference)."""

    def __init__(self, b1, b2):
        self.b1, self.b2, self.ipt, self.unc = b1, b2, {}, {}

    def update(self, named):  # name → (weights, grads) as nested lists
        for name, (w, g) in named.items():
            for i in range(len(w)):
                for j in range(len(w[0])):
                    sens = abs(w[i][j] * g[i][j])
                    ipt = self.b1 * self.ipt.get((name, i, j), 0.0) + (1 - self.b1) * sens
                    self.ipt[(name, i, j)] = ipt
                    self.unc[(name, i, j)] = self.b2 * self.unc.get((name, i, j), 0.0) + (1 - self.b2) * abs(sens - ipt)

    def s(self, name, i, j):
        return self.ipt[(name, i, j)] * self.unc[(name, i, j)]

    def triplet(self, path, i, d_out, d_in):
        return (self.s(f"{path}.E", i, 0)
                + sum(self.s(f"{path}.B", j, i) for j in range(d_out)) / d_out  # P's column i
                + sum(self.s(f"{path}.A", i, j) for j in range(d_in)) / d_in)  # Q's row i


def test_importance_matches_naive_loop():
    model = make()
    alloc = RankAllocator(model)
    naive = NaiveScores(0.85, 0.85)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for it in range(3):
        ids = batch(it)
        model(input_ids=ids, labels=ids).loss.backward()
        snap = {}
        for path, ad in alloc.adapters.items():
            for role, key in (("lora_A", "A"), ("lora_E", "E"), ("lora_B", "B")):
                p = getattr(ad, role)
                snap[f"{path}.{key}"] = (p.detach().double().tolist(), p.grad.double().tolist())
        naive.update(snap)
        alloc.update_importance()
        opt.step()
        opt.zero_grad()
    scores = alloc.scores()
    for path, ad in alloc.adapters.items():
        for role, key in (("lora_A", "A"), ("lora_E", "E"), ("lora_B", "B")):
            rows, cols = getattr(ad, role).shape
            want = torch.tensor([[naive.ipt[(f"{path}.{key}", i, j)] for j in range(cols)] for i in range(rows)], dtype=torch.float64)
            torch.testing.assert_close(alloc.ema_ipt[path][role].double(), want, rtol=1e-4, atol=1e-12)
            want = torch.tensor([[naive.unc[(f"{path}.{key}", i, j)] for j in range(cols)] for i in range(rows)], dtype=torch.float64)
            torch.testing.assert_close(alloc.ema_unc[path][role].double(), want, rtol=1e-4, atol=1e-12)
        want = torch.tensor([naive.triplet(path, i, ad.fan_out, ad.fan_in) for i in range(ad.r)], dtype=torch.float64)
        torch.testing.assert_close(scores[path].double(), want, rtol=1e-4, atol=1e-15)
    # the mask keeps exactly the b highest scores over all matrices
    flat = sorted(((float(v), p, i) for p, s in scores.items() for i, v in enumerate(s)), reverse=True)
    ranks = alloc.mask(5)
    assert sum(ranks.values()) == 5
    kept = {(p, i) for _, p, i in flat[:5]}
    for path, ad in alloc.adapters.items():
        assert {i for i in range(ad.r) if ad.kept[i]} == {i for p, i in kept if p == path}
        assert all(ad.lora_E[i].item() == 0 for i in range(ad.r) if not ad.kept[i])


def test_training_ends_at_target_budget_with_cut_factors():
    model = make(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    alloc = RankAllocator(model)
    n = len(alloc.adapters)
    assert (alloc.init_budget, alloc.target_budget) == (6 * n, 2 * n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in range(1, 13):
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        b = alloc.step(model, t, opt)
        opt.zero_grad()
        if b.mask:
            assert alloc.total_rank() == b.budget
        if t == 9:  # the final allocation: cut
            assert alloc.shrunk and b.phase == "final"
            before = {p: ad.lora_A.detach().clone() for p, ad in svd_adapters(model, "default").items()}
    ranks = {p: ad.r for p, ad in svd_adapters(model, "default").items()}
    assert sum(ranks.values()) == alloc.target_budget == 2 * n  # kept rank == target budget, physically
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in trainable} == {id(p) for p in in_opt}  # the optimizer follows the cut
    for p in in_opt:
        assert opt.state[p]["exp_avg"].shape == p.shape
    for path, ad in svd_adapters(model, "default").items():
        assert not torch.equal(ad.lora_A.detach(), before[path])  # still training after the cut


def test_cut_slices_adam_state_and_removes_rank_zero(ids):
    model = make()
    ads = svd_adapters(model, "default")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    paths = list(ads)
    keep = {paths[0]: [False, True, False, True], paths[1]: [False] * 4}
    for p in paths[2:]:
        keep[p] = [True] * 4
    old = {p: (ads[p].lora_B, opt.state[ads[p].lora_B]["exp_avg"].clone()) for p in paths}
    for p in paths:
        ads[p].mask_(torch.tensor(keep[p]))
    want = model(input_ids=ids).logits
    ranks = shrink(model, "default", opt)
    assert ranks[paths[0]] == 2 and ranks[paths[1]] == 0
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    assert isinstance(model.get_submodule(paths[1]), nn.Linear)  # rank 0: adapter removed, layer unwrapped
    new = svd_adapters(model, "default")
    torch.testing.assert_close(opt.state[new[paths[0]].lora_B]["exp_avg"], old[paths[0]][1][:, [1, 3]])
    assert old[paths[1]][0] not in opt.state and all(old[paths[1]][0] is not q for g in opt.param_groups
                                                     for q in g["params"])
    assert model._lorakit.adapters["default"].config.rank_pattern[f"{paths[1]}.lora_E"] == [False] * 4
    opt.step()  # the patched optimizer still steps


def test_without_optimizer_masks_persistently():
    model = make(tinit=0, tfinal=2, total_step=4)
    alloc = RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(UserWarning, match="only masked"):
        for t in range(1, 5):
            ids = batch(t)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            alloc.step(model, t)
            opt.zero_grad()
    assert not alloc.shrunk and alloc.total_rank() == alloc.target_budget
    for ad in alloc.adapters.values():
        assert ad.r == 4 and torch.all(ad.lora_E[~ad.kept] == 0)  # re-masked after the last step


def test_budget_above_current_ranks_is_refused():
    model = make(init_r=4, target_r=3)
    for ad in svd_adapters(model, "default").values():
        ad.cut_(torch.tensor([True, True, False, False]))
    with pytest.raises(AdaLoraBudgetError, match="lower target_r"):
        RankAllocator(model)
