"""AdaLoRA's adapter kind (Zhang et al., ICLR 2023, arXiv 2303.10512, §3.1): the update in SVD form.

    ΔW = P · diag(λ) · Q · scaling          P (fan_out, r)   λ (r,)   Q (r, fan_in)     (eq. 3)

P and Q play the left/right singular vectors (kept near-orthogonal by the regulariser of eq. 4,
``lorakit.variants.adalora.regularizer``), λ the singular values. λ starts at zero and P, Q are
Gaussian, so the model starts unchanged. Pruning a triplet (P[:, i], λᵢ, Q[i]) zeroes λᵢ only: P and Q
keep training and a pruned triplet can come back at the next allocation (§3.2). Once the allocation
is final the factors are cut to the kept triplets (:meth:`SVDAdapter.cut_`). The training-time parts
(rank allocator, budget schedule, hook) are in ``lorakit.variants.adalora``.

On the adapter protocol: ``factors()`` hands the host's fused branch A = λ ⊙ Q (rows scaled) and
B = P, so the forward pass runs x → A → B like plain LoRA and never builds ΔW; ``delta_2d()`` is the
dense update. File (``peft_type: "ADALORA"``, PEFT's format both ways)::

    base_model.model.<path>.lora_A      Q (k, fan_in)      k = kept rank of that matrix
    base_model.model.<path>.lora_E      λ (k, 1)
    base_model.model.<path>.lora_B      P (fan_out, k)

``adapter_config.json`` carries ``init_r`` and, once ranks were allocated, PEFT's ``rank_pattern``
``{"<path>.lora_E": [kept?] * init_r}``; the tensors hold only the kept triplets (PEFT's
``resize_state_dict_by_rank_pattern``). A matrix allocated rank 0 is still listed, with all-False
flags and (0, fan_in) / (0, 1) / (fan_out, 0) tensors, which is what PEFT writes and reads. Loading
builds every target at ``init_r``, cuts it to its pattern, copies the tensors after the core checked
every shape, and removes the rank-0 adapters.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

from ..errors import RankPatternError
from ..layers.host import LoraLayer
from ..layers.kinds import BaseKind, Geometry, kind_of
from ..layers.protocol import Adapter, AdapterKind, base_device
from ..state import layer_adapters, lora_layers, model_state, set_submodule
from .adalora_config import AdaLoraConfig

#: (old parameter, new parameter, dim, kept index, shape before) — one per factor of a cut.
Cut = tuple[nn.Parameter, nn.Parameter, int, torch.Tensor, tuple[int, ...]]
#: PEFT's and the official code's initialisation of P and Q.
INIT_STD = 0.02
_KEY = re.compile(r"\.lora_([AEB])(?:\.[^.]+)?$")


class SVDAdapter(Adapter):
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

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = P · diag(λ) · Q · scaling as a (fan_out, fan_in) matrix."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        """PEFT's keys: ``lora_A`` (Q), ``lora_E`` (λ), ``lora_B`` (P); only the kept triplets (a
        masked triplet's λ is 0), so after a final cut these are the parameters themselves."""
        if bool(self.kept.all()):
            return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}
        idx = self.kept.nonzero().flatten()
        return {"lora_A": self.lora_A.detach().index_select(0, idx),
                "lora_E": self.lora_E.detach().index_select(0, idx),
                "lora_B": self.lora_B.detach().index_select(1, idx)}

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



def svd_adapters(model: nn.Module, adapter_name: str) -> dict[str, SVDAdapter]:
    """Module path → the AdaLoRA adapter ``adapter_name`` of that layer, in model order."""
    return {path: host.lora[adapter_name] for path, host in lora_layers(model)
            if adapter_name in host.lora and isinstance(host.lora[adapter_name], SVDAdapter)}


class AdaLoraKind(AdapterKind):
    name = "adalora"
    peft_type = "ADALORA"
    config_type = AdaLoraConfig

    def refuses(self, base_kind, base):
        if base_kind.embedding:
            return ("AdaLoRA adapts linear-like layers and convolutions only (as PEFT). Remove it from "
                    "target_modules, or adapt it with plain LoRA")
        if base_kind.grouped:
            return (f"AdaLoRA is not supported on grouped convolutions (groups={base.groups}). Remove it from "
                    "target_modules, or adapt it with plain LoRA")
        return None

    def create(self, base_kind, base, path, config: AdaLoraConfig) -> SVDAdapter:
        adapter = SVDAdapter(base_kind.geometry(base, config.init_r), config.init_r, config.scaling,
                             float(config.lora_dropout), device=base_device(base))
        adapter.reset(zero_lambda=bool(config.init_lora_weights))
        return adapter

    def file_config(self, model, adapter_name, config: AdaLoraConfig) -> AdaLoraConfig:
        pattern = dict(config.rank_pattern or {})  # keeps adapters removed by shrink (rank 0)
        for path, ad in svd_adapters(model, adapter_name).items():
            pattern[f"{path}.lora_E"] = ad.pattern()
        out = copy.copy(config)
        full = all(sum(flags) == config.init_r for flags in pattern.values())
        out.rank_pattern = None if full else {k: pattern[k] for k in sorted(pattern)}
        return out

    def file_extra_tensors(self, model, adapter_name, config: AdaLoraConfig) -> dict[str, torch.Tensor]:
        # A removed (rank-0) adapter is still in the file, with zero-size tensors, as PEFT writes it.
        live = svd_adapters(model, adapter_name)
        out = {}
        for key in config.rank_pattern or {}:
            path = key.removesuffix(".lora_E")
            if path in live:
                continue
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            kind = module.kind if isinstance(module, LoraLayer) else kind_of(base)
            geometry = kind.geometry(base, 1)
            fan_in, fan_out = math.prod(geometry.a_shape[1:]), geometry.b_shape[0]
            pre = f"base_model.model.{path}"
            out.update({f"{pre}.lora_A": torch.zeros(0, fan_in), f"{pre}.lora_E": torch.zeros(0, 1),
                        f"{pre}.lora_B": torch.zeros(fan_out, 0)})
        return out

    def file_paths(self, model, adapter_name, config: AdaLoraConfig) -> set[str]:
        removed = {key.removesuffix(".lora_E") for key in config.rank_pattern or {}}
        return set(svd_adapters(model, adapter_name)) | removed

    def before_load(self, model, adapter_name, config: AdaLoraConfig, source: str) -> None:
        """Cut every freshly injected adapter (init_r triplets) to the file's rank_pattern."""
        adapters = svd_adapters(model, adapter_name)
        pattern, problems = {}, []
        for key, flags in (config.rank_pattern or {}).items():
            path = _KEY.sub("", key) if _KEY.search(key) else key
            if path not in adapters:
                problems.append(f"{key}: this model has no adapted module {path!r}")
                continue
            pattern[path] = flags
        if problems:
            raise RankPatternError(
                f"{source}: the rank_pattern does not fit this model ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems[:20])
                + "\nLoad the adapter into the base model it was trained on (same module names and target_modules)."
            )
        config.rank_pattern = {f"{p}.lora_E": f for p, f in pattern.items()} or None
        for path, flags in pattern.items():
            adapters[path].cut_(torch.tensor(flags, dtype=torch.bool))

    def after_load(self, model, adapter_name) -> None:
        """Remove the adapters allocated rank 0 (the pattern keeps them listed for the file)."""
        for path, host, ad in layer_adapters(model, adapter_name, SVDAdapter):
            if ad.r == 0:
                host.remove_adapter(adapter_name)
                if len(host.lora) == 0:
                    set_submodule(model, path, host.base_layer)
        st = model_state(model)
        if st is not None and adapter_name in st.adapters:  # record the allocation, as shrink() does
            cfg = st.adapters[adapter_name].config
            pattern = dict(cfg.rank_pattern or {})
            pattern.update({f"{p}.lora_E": ad.pattern() for p, ad in svd_adapters(model, adapter_name).items()})
            cfg.rank_pattern = pattern


ADALORA = AdaLoraKind()
