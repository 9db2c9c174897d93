"""AdaLoRA's adapter kind: the update in SVD form, and its injection (Zhang et al. 2023, §3.1).

    ΔW = P · diag(λ) · Q · scaling          P (fan_out, r)   λ (r,)   Q (r, fan_in)     (eq. 3)

P and Q play the left/right singular vectors (kept near-orthogonal by the regulariser of eq. 4,
``regularizer.py``), λ the singular values. λ starts at zero and P, Q are Gaussian, so the model
starts unchanged. Pruning a triplet (P[:, i], λᵢ, Q[i]) zeroes λᵢ only: P and Q keep training and a
pruned triplet can come back at the next allocation (§3.2). Once the allocation is final the factors
are cut to the kept triplets (:meth:`SVDAdapter.cut_`).

The adapter satisfies the core contract: ``factors()`` hands the host's fused branch
A = λ ⊙ Q (rows scaled) and B = P, so the forward pass runs x → A → B like plain LoRA and never builds
ΔW; ``delta_2d()`` is the dense update for merges and tests. Parameter names are PEFT's
(``lora_A`` = Q, ``lora_E`` = λ as an (r, 1) column, ``lora_B`` = P), which keeps the file format a
plain rename-free copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError, UnsupportedModuleError
from ...inject import add_trainable_copies, check_adapter_name, find_targets, register_adapter
from ...layers.host import LoraLayer
from ...layers.kinds import Geometry, kind_of
from ...state import AdapterRecord, set_submodule
from .config import AdaLoraConfig

KIND = "adalora"
#: (old parameter, new parameter, dim, kept index, shape before) — one per factor of a cut.
Cut = tuple[nn.Parameter, nn.Parameter, int, torch.Tensor, tuple[int, ...]]
#: PEFT's and the official code's initialisation of P and Q.
INIT_STD = 0.02


class SVDAdapter(nn.Module):
    """Triplets (P[:, i], λᵢ, Q[i]) of one adapted matrix; ``kept`` marks those the allocator keeps.

    ``index[i]`` is row i's position among the ``init_r`` triplets the adapter started with, so a
    cut adapter still knows which entries of PEFT's ``rank_pattern`` it holds.
    """

    def __init__(self, geometry: Geometry, init_r: int, scaling: float, dropout: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.fan_in = math.prod(geometry.a_shape[1:])  # in_features, or in_channels·k for a conv
        self.fan_out = geometry.b_shape[0]
        self.a_tail = tuple(geometry.a_shape[1:])  # the kind's layout of one row of A, e.g. (in, kh, kw)
        self.b_tail = tuple(geometry.b_shape[2:])  # (1, 1) for a 2-D conv, () for a linear
        r = init_r
        self.lora_A = nn.Parameter(torch.empty(r, self.fan_in, dtype=dtype, device=device))  # Q (r, in)
        self.lora_E = nn.Parameter(torch.empty(r, 1, dtype=dtype, device=device))  # λ (r, 1)
        self.lora_B = nn.Parameter(torch.empty(self.fan_out, r, dtype=dtype, device=device))  # P (out, r)
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("index", torch.arange(r, device=device), persistent=False)
        self.init_r = init_r
        self.scaling = scaling
        self.dropout = dropout

    @property
    def r(self) -> int:
        """Current number of triplets (rows of Q); ``kept`` tells how many of them are unmasked."""
        return self.lora_E.shape[0]

    @property
    def rank(self) -> int:
        """Triplets the allocator keeps (the effective rank once masked λ's are zero)."""
        return int(self.kept.sum())

    def reset(self, zero_lambda: bool = True) -> None:
        """λ = 0, P, Q ~ N(0, 0.02²) (§3.1); with ``zero_lambda=False`` λ ~ N(0, 1) too (tests)."""
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=INIT_STD)
            nn.init.normal_(self.lora_B, std=INIT_STD)
            if zero_lambda:
                nn.init.zeros_(self.lora_E)
            else:
                nn.init.normal_(self.lora_E)

    # -- the core contract ------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) for the base kind's branch: A = λ ⊙ Q (r, in…), B = P (out, r, 1…)."""
        a = self.lora_A * self.lora_E  # (r, in) · (r, 1): row i scaled by λᵢ
        return a.view(self.r, *self.a_tail), self.lora_B.view(self.fan_out, self.r, *self.b_tail), self.scaling

    def delta_2d(self) -> torch.Tensor:
        """ΔW = P · diag(λ) · Q · scaling as a (fan_out, fan_in) matrix."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    # -- allocation -------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_(self, keep: torch.Tensor) -> None:
        """Keep the triplets where ``keep`` (r,) is True; zero λ of the others (P, Q untouched)."""
        keep = keep.to(device=self.kept.device, dtype=torch.bool)
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        self.kept.copy_(keep)

    @torch.no_grad()
    def cut_(self, keep: torch.Tensor | None = None, *, new_params: bool = True) -> list[Cut]:
        """Physically drop the triplets not in ``keep`` (default: ``kept``); may leave rank 0.

        With ``new_params`` (default) the factors become new ``nn.Parameter`` objects — needed while
        training, because autograd caches a parameter's shape in its gradient accumulator for as long
        as an old graph is alive; :func:`~lorakit.variants.adalora.shrink.patch_optimizer` then moves
        an optimizer over to them. ``new_params=False`` resizes the same objects in place, which is
        only safe before the first forward pass (restoring a checkpoint into a fresh model whose
        optimizer already exists). Returns ``(old, new, dim, index, old shape)`` per factor.
        """
        keep = self.kept if keep is None else keep.to(device=self.kept.device, dtype=torch.bool)
        idx = keep.nonzero().flatten()
        cuts = []
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            old = getattr(self, name)
            shape = tuple(old.shape)
            data = old.detach().index_select(dim, idx)  # Q rows / λ / P columns
            if new_params:
                new = nn.Parameter(data, requires_grad=old.requires_grad)
                setattr(self, name, new)
            else:
                old.data, old.grad, new = data, None, old
            cuts.append((old, new, dim, idx, shape))
        self.index = self.index.index_select(0, idx)
        self.kept = torch.ones(len(idx), dtype=torch.bool, device=self.kept.device)
        return cuts

    def pattern(self) -> list[bool]:
        """PEFT's ``rank_pattern`` entry: which of the ``init_r`` triplets are kept."""
        flags = [False] * self.init_r
        for i in self.index[self.kept].tolist():
            flags[i] = True
        return flags

    def extra_repr(self) -> str:
        return (f"r={self.r}, kept={self.rank}, init_r={self.init_r}, scaling={self.scaling:g}, "
                f"dropout={self.dropout}")


def inject_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add an AdaLoRA adapter named ``adapter_name`` to ``model`` (in place) and return the model.

    Every target gets ``init_r`` triplets; the adapter becomes the active and trainable one and the
    rest of the model is frozen (as :func:`lorakit.inject`). Train it with the AdaLoRA hook (lorakit's
    loop does that for ``--method adalora``) or call ``RankAllocator.step`` after each backward.
    """
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"config must be a lorakit.variants.adalora.AdaLoraConfig, got {type(config).__name__}.")
    check_adapter_name(model, adapter_name)
    plan = []
    for path, module in find_targets(model, config):  # check every target before changing anything
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = module.kind if isinstance(module, LoraLayer) else kind_of(module)
        if kind.name == "embedding":
            raise UnsupportedModuleError(
                f"module {path!r} is an nn.Embedding: AdaLoRA adapts linear-like layers and convolutions "
                "only (as PEFT). Remove it from target_modules, or adapt it with plain LoRA."
            )
        plan.append((path, module, base, kind, kind.geometry(base, config.init_r)))  # refuses grouped convs
    for path, module, base, kind, geometry in plan:
        ref = next(base.parameters(), None)
        adapter = SVDAdapter(geometry, config.init_r, config.scaling, float(config.lora_dropout),
                             device=ref.device if ref is not None else None)
        adapter.reset(zero_lambda=bool(config.init_lora_weights))
        host = module if isinstance(module, LoraLayer) else LoraLayer(module, kind)
        host.add_module_adapter(adapter_name, adapter)
        if host is not module:
            set_submodule(model, path, host)
    add_trainable_copies(model, config.modules_to_save or [], adapter_name)
    register_adapter(model, adapter_name, AdapterRecord(config=config, trainable=True, kind=KIND))
    return model


def svd_adapters(model: nn.Module, adapter_name: str) -> dict[str, SVDAdapter]:
    """Module path → the AdaLoRA adapter ``adapter_name`` of that layer, in model order."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora:
            adapter = module.lora[adapter_name]
            if isinstance(adapter, SVDAdapter):
                out[path] = adapter
    return out
