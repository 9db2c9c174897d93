"""AdaLoRA's orthogonal regulariser R(P, Q) (Zhang et al. 2023, §3.1, eq. 4).

P and Q only *play* singular vectors; the penalty keeps them near-orthonormal so that λ keeps the
meaning of a singular value and pruning one triplet removes one direction. Two forms:

* ``"paper"``    — eq. 4 as written, summed over the adapted matrices k:
                   R = Σ_k ‖P_kᵀP_k − I‖²_F + ‖Q_kQ_kᵀ − I‖²_F
* ``"official"`` — what the authors' code (``compute_orth_regu``) and PEFT compute: the unsquared
                   Frobenius norms, averaged over all 2K matrices:
                   R = (1 / 2K) Σ_k ‖P_kᵀP_k − I‖_F + ‖Q_kQ_kᵀ − I‖_F

The loss is L = task loss + γ · R (γ = ``orth_reg_weight``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .layer import SVDAdapter


def orth_regularizer(adapters: Iterable[SVDAdapter], form: str = "official") -> torch.Tensor | None:
    """R(P, Q) over ``adapters`` in the given form; ``None`` when there is nothing to regularise."""
    terms: list[torch.Tensor] = []
    for ad in adapters:
        if ad.r == 0:
            continue
        p, q = ad.lora_B, ad.lora_A  # P (out, r), Q (r, in)
        eye = torch.eye(ad.r, dtype=p.dtype, device=p.device)
        dev_p = p.T @ p - eye  # (r, r)
        dev_q = q @ q.T - eye  # (r, r)
        if form == "paper":
            terms.append(dev_p.square().sum() + dev_q.square().sum())
        else:
            terms += [torch.linalg.matrix_norm(dev_p), torch.linalg.matrix_norm(dev_q)]
    if not terms:
        return None
    total = torch.stack(terms).sum()
    return total if form == "paper" else total / len(terms)
