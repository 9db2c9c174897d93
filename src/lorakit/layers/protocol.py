"""The adapter protocol: what every adapter kind provides, so that one host layer, one ``inject`` and
one adapter-file path serve them all (the idea of torchtune's ``AdapterModule``, made explicit).

Two objects make an adapter kind, both in ONE small file under ``lorakit/adapter_kinds/``:

* an :class:`Adapter` — the ``nn.Module`` that sits in ``LoraLayer.lora[name]`` on one layer;
* an :class:`AdapterKind` — the stateless description the core asks at injection and file time
  (its config type, PEFT ``peft_type``, which bases it can wrap, how to build an adapter, how its
  file config is written), listed in the static table ``lorakit.adapter_kinds.ADAPTER_KINDS``.

What the host (``LoraLayer``) asks an :class:`Adapter`
------------------------------------------------------
``delta_2d(base_weight=None) -> Tensor``
    THE formula of the kind: ΔW as a ``(fan_out, fan_in)`` matrix (kernels flattened into fan_in),
    such that merging is ``W ← W + ΔW``. Merge, export, combination and tests use it; nothing else
    may restate the formula. A kind whose ΔW depends on the frozen weight (DoRA) sets
    ``needs_base_weight = True`` and receives W0 as a ``(fan_out, fan_in)`` fp32 matrix.
``unmerge_delta_2d(merged_weight) -> Tensor``
    what ``unmerge`` subtracts; default ``delta_2d()``. DoRA overrides it (W0 is recovered from the
    merged weight with the norm cached at merge time, as PEFT does).
``forward_into(kind, base, base_out, x, mask) -> Tensor``
    the layer output with this adapter's contribution, given the base kind object (``kind``), the
    wrapped base module, the base output ``base(x)`` (which it may reuse in place), the input ``x``
    and the dropout mask for ``x`` (``None``: no dropout). The default is the fused factor branch
    ``kind.branch(base, base_out, x, A, B, s, mask)`` built from :meth:`Adapter.factors`; other
    forms override it:

    * DoRA (Liu et al. 2024, §4.1/§4.3): ``y = m/‖W0 + sBA‖_c ⊙ (W0 x + s B A x) + bias`` — take
      ``base_out − bias`` as W0 x (``kind.bias(base)``), W0 from ``kind.weight_2d(base)``, detach the
      column norm (§4.3), add the fused branch, rescale, put the bias back;
    * LoHa / LoKr: build ``ΔW = self.delta_2d()`` and add ``kind.apply_weight(base, x ⊙ mask, ΔW)``
      (the base's own op — linear / conv / embedding lookup — with weight ΔW and no bias);
    * a sliced adapter on a fused projection (qkv in one Linear): compute its factors' output and add
      it to the output columns it owns only (``base_out[..., sl] += ...``).
``fuses_with_base`` / ``forward_fused(kind, base, x, mask)``
    a kind on the default factor branch needs nothing here: when it is a layer's only live adapter
    and the base kind can fuse (``kind.can_fuse``: a plain ``nn.Linear``), the host runs the base
    product and the branch as one autograd node (``branch.lora_linear_fused``, the same formula with
    two memory passes fewer). A kind that overrides ``forward_into`` is never fused.
``dropout: float``
    the dropout probability on this adapter's input; the host draws the mask (a fresh
    per-projection mask, PEFT's semantics) and never for a base whose ``kind.embedding`` is True.
``peft_tensors(kind) -> dict[str, Tensor]``
    the adapter's tensors in the file, keyed by the suffix after the module path, with PEFT's
    names: ``lora_A.weight``/``lora_B.weight`` (``lora_embedding_A``/``_B`` on an embedding),
    ``lora_A``/``lora_E``/``lora_B`` (AdaLoRA), ``lora_magnitude_vector`` (DoRA), ``hada_w1_a`` …
    (LoHa), ``lokr_w1`` … (LoKr). Saving writes them; loading checks the file's shapes against them.
``load_peft_tensors(kind, tensors)``
    copy a file's tensors (same suffixes, shapes already checked) into the adapter; the default
    copies into the tensors :meth:`peft_tensors` returned, so a kind whose file tensors are its
    parameters needs nothing more.
``factors() -> (A, B, scaling)``
    only for the default :meth:`forward_into`: the rank-r factors of the fused branch.

What the core asks an :class:`AdapterKind`
------------------------------------------
``name``, ``peft_type``, ``config_type``; ``accepts_config(config)`` (is this config for me, e.g.
DoRA: a ``LoraConfig`` with ``use_dora``), ``accepts_file(raw)`` (does this ``adapter_config.json``
belong to me); ``config_from_file(raw, source)``; ``refuses(base_kind, base) -> str | None`` (why it
cannot wrap that base; ``inject`` turns it into an ``UnsupportedModuleError`` naming the module and
the fix); ``create(base_kind, base, path, config) -> Adapter``; ``file_config(model, name, config)``
(the config object written to the file), ``file_extra_tensors(model, name, config)`` and
``file_paths(model, name, config)`` (the modules its ``target_modules`` must select);
``before_load(model, name, config, source)`` and ``after_load(model, name)``.

Everything around adapters — target matching, ``modules_to_save``, bias modes, ``layers_to_transform``,
rank/alpha patterns, activation, freezing, merging, the file's key normalisation and all-or-nothing
loading — is done once by the core for every kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # typing only: the host and the base kinds are in this package
    from .kinds import BaseKind


class Adapter(nn.Module):
    """Base class of every adapter module; see the module docstring for the contract."""

    #: dropout probability on the adapter's input (the host draws the mask).
    dropout: float = 0.0
    #: True when ``delta_2d`` needs the frozen weight W0 (DoRA).
    needs_base_weight: bool = False

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must define delta_2d()")

    def unmerge_delta_2d(self, merged_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.delta_2d()

    def attach(self, kind: BaseKind, base: nn.Module) -> None:
        """Called once by ``inject`` when the adapter is put on its layer, after every check passed: the
        place where an initialisation changes the base (PiSSA/OLoRA leave the residual W − s·B0A0)."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} uses the default forward_into() but defines no factors()")

    def forward_into(self, kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """``base_out`` + this adapter's update of ``x`` (default: the fused factor branch)."""
        a, b, s = self.factors()
        if a.shape[0] == 0:  # rank 0 (an AdaLoRA matrix pruned away) adds nothing
            return base_out
        return kind.branch(base, base_out, x, a, b, s, mask)

    @property
    def fuses_with_base(self) -> bool:
        """True for kinds on the default factor branch: the host may then run the base op and this
        adapter as one node (:meth:`forward_fused`) when it is the layer's only live adapter."""
        return type(self).forward_into is Adapter.forward_into

    def forward_fused(self, kind: BaseKind, base: nn.Module, x: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """``base(x)`` + this adapter's update, in one op (``kind.fused``); the host calls it only when
        :attr:`fuses_with_base` and ``kind.can_fuse(base, x)`` hold. The same formula as forward_into."""
        a, b, s = self.factors()
        if a.shape[0] == 0:
            return base(x)
        return kind.fused(base, x, a, b, s, mask)

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must define peft_tensors()")

    @torch.no_grad()
    def load_peft_tensors(self, kind: BaseKind, tensors: dict[str, torch.Tensor]) -> None:
        own = self.peft_tensors(kind)
        for suffix, value in tensors.items():
            target = own[suffix]
            target.copy_(value.to(dtype=target.dtype, device=target.device))


class AdapterKind:
    """Stateless description of an adapter kind; one instance per kind in ``ADAPTER_KINDS``."""

    name: str = "?"
    peft_type: str = "?"
    config_type: type = object

    def accepts_config(self, config: Any) -> bool:
        return type(config) is self.config_type

    def accepts_file(self, raw: dict) -> bool:
        return raw.get("peft_type", "LORA") == self.peft_type

    def config_from_file(self, raw: dict, source: str) -> Any:
        return self.config_type.from_peft_dict(raw, source=source)

    def refuses(self, base_kind: BaseKind, base: nn.Module) -> str | None:
        """Why this kind cannot wrap ``base`` (a sentence with the fix), or None."""
        return None

    def create(self, base_kind: BaseKind, base: nn.Module, path: str, config: Any) -> Adapter:  # pragma: no cover
        raise NotImplementedError

    def file_config(self, model: nn.Module, adapter_name: str, config: Any) -> Any:
        """The config object whose ``to_peft_dict()`` goes into ``adapter_config.json``."""
        return config

    def file_extra_tensors(self, model: nn.Module, adapter_name: str, config: Any) -> dict[str, torch.Tensor]:
        """Tensors (full PEFT keys) the file holds beyond the adapters' ``peft_tensors``."""
        return {}

    def file_paths(self, model: nn.Module, adapter_name: str, config: Any) -> set[str] | None:
        """Module paths the file's ``target_modules`` must select; None: the adapted ones."""
        return None

    def before_load(self, model: nn.Module, adapter_name: str, config: Any, source: str) -> None:
        """Reshape the freshly injected adapters to the file (e.g. AdaLoRA's rank_pattern)."""

    def after_load(self, model: nn.Module, adapter_name: str) -> None:
        """Tidy up once the tensors are in (e.g. drop AdaLoRA's rank-0 adapters)."""

    def __repr__(self) -> str:
        return f"<adapter kind {self.name}>"


def base_device(base: nn.Module) -> torch.device | None:
    """Device of a base module (a quantized base may hold only buffers)."""
    ref = next(iter([*base.parameters(), *base.buffers()]), None)
    return ref.device if ref is not None else None
