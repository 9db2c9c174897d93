"""Combine several LoRA adapters into a new one.

With weights wᵢ and updates ΔWᵢ = sᵢ·Bᵢ·Aᵢ, per adapted layer:

``cat``     exact: A = [A₁; A₂; …] (rows stacked), B = [c₁B₁, c₂B₂, …] (columns), cᵢ = wᵢ·sᵢ/s, so
            s·B·A = Σ wᵢ ΔWᵢ exactly; rank Σ rᵢ. s is the first adapter's scaling, so one adapter
            with weight 1 is copied bit for bit.
``svd``     truncated SVD of the dense Σ wᵢ ΔWᵢ to ``svd_rank`` (default: the largest rᵢ):
            B = U_k·√Σ_k, A = √Σ_k·V_kᵀ with s = 1. The best rank-k approximation (Eckart–Young).
``linear``  same-rank factor mixing: A = Σ sgn(wᵢ)·√|wᵢsᵢ/s|·Aᵢ, B = Σ √|wᵢsᵢ/s|·Bᵢ with s the first
            adapter's scaling. Then s·B·A = Σᵢ Σⱼ ±√|wᵢsᵢwⱼsⱼ|·Bᵢ·Aⱼ: the diagonal terms are
            Σ wᵢ ΔWᵢ and the cross terms Bᵢ·Aⱼ (i ≠ j) come on top, so it is exact only for one adapter
            (or factors whose cross products vanish). Cheap and keeps the rank; prefer ``cat``.

Layers adapted by only some of the inputs count the others as ΔW = 0 (``linear`` needs every input
on every layer, with equal ranks).

On a grouped convolution (G groups, B a grouped conv: output group j reads rank rows j of A only) each
output group is its own low-rank pair, so ``cat`` stacks A's rows group by group and ``svd`` takes the
SVD of each group's rows of Σ wᵢ ΔWᵢ to svd_rank/G (the best approximation of that form, block by
block); svd_rank must then be a multiple of G.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from ._txn import all_or_nothing
from .adapter_kinds.lora import new_lora_adapter
from .config import LoraConfig
from .errors import ConfigError
from .inject import check_adapter_name, register_adapter
from .state import AdapterRecord, lora_layers, require_adapter, trainable_copies

METHODS = ("cat", "svd", "linear")


@all_or_nothing
def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], new_name: str,
                     method: str = "cat", svd_rank: int | None = None) -> nn.Module:
    """Add adapter ``new_name`` = the weighted combination of ``adapters`` (see the module docstring)."""
    if method not in METHODS:
        raise ConfigError(f"combine method {method!r}: use one of {', '.join(METHODS)}.")
    if isinstance(adapters, str):  # one name, as set_adapter / merge take it ("ab" is not ['a', 'b'])
        adapters = [adapters]
    try:
        adapters, weights = list(adapters), list(weights)
    except TypeError:
        raise ConfigError(f"adapters={adapters!r:.60}, weights={weights!r:.60}: give a list of adapter names and "
                          "a list of as many weights.") from None
    weights = [_weight(i, w) for i, w in enumerate(weights)]
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    configs = [require_adapter(model, n) for n in adapters]
    for name, rec in zip(adapters, configs):
        if rec.kind != "lora":
            raise ConfigError(f"adapter {name!r} is a {rec.kind} adapter; combine works on plain LoRA adapters.")
    for _, host in trainable_copies(model):
        owners = [n for n in adapters if n in host.modules_to_save]
        if owners:
            raise ConfigError(
                f"adapters {owners} train full copies of modules (modules_to_save); such copies cannot be "
                "combined. Combine adapters without modules_to_save."
            )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigError(f"svd_rank={svd_rank!r}: must be a positive integer.")
    check_adapter_name(model, new_name)

    first: LoraConfig = configs[0].config
    rslora = first.use_rslora
    ranks, alphas = {}, {}
    for path, host in lora_layers(model):
        present = [(host.lora[n], w) for n, w in zip(adapters, weights) if n in host.lora]
        if not present:
            continue
        a, b, s = _combine_layer(path, host, present, len(adapters), method, svd_rank, weights)
        r = a.shape[0]
        new = host.add(new_name, new_lora_adapter(host.kind, host.base_layer, r, _alpha_for(s, r, rslora), s,
                                                  float(first.lora_dropout)))
        with torch.no_grad():
            new.lora_A.copy_(a.reshape(new.lora_A.shape))
            new.lora_B.copy_(b.reshape(new.lora_B.shape))
        _check_finite(path, (new.lora_A, new.lora_B), weights, method)  # in the adapter's dtype (fp16 overflows)
        ranks[path], alphas[path] = r, new.alpha

    paths = sorted(ranks)
    r0, a0 = ranks[paths[0]], alphas[paths[0]]
    config = LoraConfig(
        r=r0, lora_alpha=a0, lora_dropout=first.lora_dropout, target_modules=paths, use_rslora=rslora,
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != a0},
        task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path,
    )
    register_adapter(model, new_name, AdapterRecord(config=config, trainable=False), activate_it=False)
    return model


def _weight(i: int, w) -> float:
    """A finite real weight: a NaN/inf would make every factor of the new adapter NaN/inf."""
    if isinstance(w, bool):  # True would read as 1.0
        raise ConfigError(f"weights[{i}]={w!r}: must be a number, not a bool.")
    try:
        v = float(w)
    except (TypeError, ValueError):
        raise ConfigError(f"weights[{i}]={w!r:.40}: must be a number (got a {type(w).__name__}).") from None
    if not math.isfinite(v):
        raise ConfigError(f"weights[{i}]={w!r}: must be a finite number.")
    return v


def _check_finite(path: str, tensors, weights: list[float], method: str) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):  # e.g. weights=[1e300]: inf factors
        raise ConfigError(f"combine_adapters at {path}: weights {weights} give inf/NaN values (method {method!r}); "
                          "use smaller weights.")


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    return scaling * (math.sqrt(r) if rslora else r)


def _combine_layer(path, host, present, n_inputs, method, svd_rank, weights):
    s0 = float(present[0][0].scaling)
    g = present[0][0].b_groups  # 1, or a grouped conv's G (B: (out, r/G)); the same for every adapter here
    if method == "cat":
        # A (r_i, fan_in) as G row blocks; the new A holds block j of every input, then block j + 1, …
        # (g = 1: plain row stacking), matching B's columns stacked per output row.
        a = torch.cat([ad.lora_A.detach().flatten(1).unflatten(0, (g, -1)) for ad, _ in present], dim=1).flatten(0, 1)
        b = torch.cat([ad.lora_B.detach().flatten(1) * (w * ad.scaling / s0) if (w * ad.scaling / s0) != 1.0
                       else ad.lora_B.detach().flatten(1) for ad, w in present], dim=1)
        return a, b, s0
    if method == "linear":
        ranks = {ad.r for ad, _ in present}
        if len(present) != n_inputs or len(ranks) != 1:
            raise ConfigError(
                f"combine method 'linear' needs every adapter on every layer with equal ranks; at {path} "
                f"{len(present)} of {n_inputs} adapters are present with ranks {sorted(ranks)}. Use 'cat' or 'svd'."
            )
        a = sum(math.copysign(math.sqrt(abs(w * ad.scaling / s0)), w) * ad.lora_A.detach().flatten(1)
                for ad, w in present)
        b = sum(math.sqrt(abs(w * ad.scaling / s0)) * ad.lora_B.detach().flatten(1) for ad, w in present)
        return a, b, s0
    dense = sum(w * ad.delta_2d().detach().float() for ad, w in present)  # (fan_out, fan_in)
    _check_finite(path, (dense,), weights, method)  # the SVD of an inf matrix fails inside torch
    if svd_rank is not None and svd_rank % g:
        raise ConfigError(f"combine method 'svd' at {path}: a grouped convolution (groups={g}) needs svd_rank "
                          f"a multiple of {g} (its B is a grouped conv over the rank channels); got {svd_rank}.")
    # one SVD per output group's rows (g = 1: the whole matrix), each to rank k/g
    blocks = dense.chunk(g, dim=0)  # g × (fan_out/g, fan_in)
    k = min((svd_rank or max(ad.r for ad, _ in present)) // g, *blocks[0].shape)
    a_parts, b_parts = [], []
    for block in blocks:
        u, sv, vh = torch.linalg.svd(block, full_matrices=False)
        root = sv[:k].sqrt()
        a_parts.append(root[:, None] * vh[:k])  # (k, fan_in)
        b_parts.append(u[:, :k] * root)  # (fan_out/g, k)
    return torch.cat(a_parts), torch.cat(b_parts), 1.0
