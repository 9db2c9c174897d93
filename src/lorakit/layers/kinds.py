"""Base kinds: what LoRA needs to know about each kind of module it can wrap.

A *kind* answers these questions about a base module: does it match, what are the shapes of A and B,
how does the fused LoRA branch run on its input, how does the base's own operation run with another
weight (``apply_weight``, for delta-based adapters), what is its weight as a ``(fan_out, fan_in)``
matrix (``weight_2d``), and how does a dense update ΔW (always a 2-D ``(fan_out, fan_in)`` matrix from
an adapter's ``delta_2d``, ``layers/protocol.py``) map onto the base's own weight layout. Nothing here
knows about adapters' lifecycle; the host (``host.py``) does that.

Dispatch: a base module may name its own kind (a class attribute ``lora_base_kind``, e.g. lorakit's
``QuantLinear``), so a new base type is one small file and nothing registers itself at import time;
otherwise the static first-match list ``KINDS`` decides. Facts about a kind (``embedding``,
``transposed``, ``linear``) are attributes of the kind object — never tests on its name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterStateError, ConfigError, UnsupportedModuleError
from .branch import fusion_enabled, lora_linear_branch, lora_linear_fused
from .dropout import apply_mask
from .embed_scale import check_scaled_forward, embed_scale


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight (in, out), y = x @ W + b. Matched by name so that lorakit
    # does not import transformers for plain PyTorch models.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


@dataclass(frozen=True)
class Geometry:
    """Shapes of the LoRA factors for one base module and rank r."""

    a_shape: tuple[int, ...]  # e.g. (r, in_features)
    b_shape: tuple[int, ...]  # e.g. (out_features, r); (out, r/b_groups, 1…) for a grouped conv's B
    #: B is a grouped 1×…×1 conv over the r rank channels (PEFT's LoRA on a grouped conv): output group j
    #: reads rank channels [j·r/g, (j+1)·r/g) only, so as a matrix B is block-diagonal (see block_diagonal).
    b_groups: int = 1


def block_diagonal(b_2d: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped B (fan_out, r/groups) as the dense (fan_out, r) matrix it applies: row block j (the
    fan_out/groups rows of output group j) sits in column block j, zeros elsewhere."""
    if groups == 1:
        return b_2d
    return torch.block_diag(*b_2d.chunk(groups, dim=0))


class BaseKind:
    """Interface of a kind; see the module docstring. Subclasses override what differs."""

    name = "base"
    #: True when A is the "input side" that starts random (B = 0); Embedding flips this (A = 0).
    zero_b = True
    #: the input is token ids and the weight a lookup table (no dropout; PEFT's lora_embedding_* keys).
    embedding = False
    #: the weight is stored (fan_in, fan_out), as GPT-2's Conv1D (PEFT's ``fan_in_fan_out``).
    transposed = False
    #: a linear projection: selected by ``target_modules="all-linear"``.
    linear = False
    #: the weight can take ``W += ΔW`` in place (False for quantized bases and grouped convolutions).
    in_place = True
    #: B is a grouped conv (``Geometry.b_groups`` > 1 possible): the LoRA update is a dense convolution
    #: across the base's groups, which its grouped weight cannot hold (no merge; DoRA / AdaLoRA refuse).
    grouped = False

    def matches(self, module: nn.Module) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def geometry(self, module: nn.Module, r: int) -> Geometry:  # pragma: no cover - interface
        raise NotImplementedError

    def branch(self, module: nn.Module, base_out: torch.Tensor, x: torch.Tensor, a, b, scaling: float,
               mask: torch.Tensor | None = None):
        """Return ``base_out + scaling · B(A(x ⊙ mask))`` (may reuse ``base_out``'s storage); ``mask``
        is the dropout mask (None: no dropout)."""
        raise NotImplementedError  # pragma: no cover - interface

    def can_fuse(self, module: nn.Module, x: torch.Tensor) -> bool:
        """True when :meth:`fused` may stand in for calling ``module`` and then :meth:`branch`."""
        return False

    def fused(self, module: nn.Module, x: torch.Tensor, a, b, scaling: float, mask=None) -> torch.Tensor:
        """``module(x) + scaling · B(A(x ⊙ mask))`` as one op; only where :meth:`can_fuse` said so."""
        raise NotImplementedError  # pragma: no cover - interface

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight in the base's own layout (a view of the parameter where one exists)."""
        return module.weight

    def to_layout(self, module: nn.Module, delta_2d: torch.Tensor) -> torch.Tensor:
        """Map ΔW from ``(fan_out, fan_in)`` onto the layout of :meth:`weight`."""
        return delta_2d

    def weight_2d(self, module: nn.Module) -> torch.Tensor:
        """The dense weight as a ``(fan_out, fan_in)`` matrix (the layout of ``delta_2d``)."""
        return self.weight(module)

    def apply_weight(self, module: nn.Module, x: torch.Tensor, weight_2d: torch.Tensor) -> torch.Tensor:
        """The base's own operation on ``x`` with weight ``weight_2d`` (fan_out, fan_in) and no bias —
        how a delta-based adapter (LoHa, LoKr) runs ΔW x. Linear-like: x Wᵀ."""
        return x.to(weight_2d.dtype) @ weight_2d.T

    def add_to_weight(self, module: nn.Module, delta: torch.Tensor) -> None:
        """W ← W + delta in place (delta already in the base layout). Quantized kinds refuse."""
        w = module.weight
        w.data.add_(delta.to(w.dtype))

    def bias(self, module: nn.Module):
        return getattr(module, "bias", None)


class LinearKind(BaseKind):
    """``nn.Linear``: weight (out, in); A (r, in), B (out, r)."""

    name = "linear"
    linear = True

    def matches(self, module):
        return isinstance(module, nn.Linear)

    def dims(self, module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def geometry(self, module, r):
        fan_in, fan_out = self.dims(module)
        return Geometry((r, fan_in), (fan_out, r))

    def branch(self, module, base_out, x, a, b, scaling, mask=None):
        return lora_linear_branch(base_out, x, a, b, scaling, mask)

    def can_fuse(self, module, x):
        # Only a plain nn.Linear, computing exactly F.linear(x, W, b): not a subclass (bitsandbytes,
        # Conv1D), not one with hooks of its own, an instance-level forward (accelerate's offload
        # hooks) or global module hooks (whatever they do must still see the base module run), not a
        # parametrized or distributed (DTensor) weight, and x already in W's dtype and device with
        # autocast off (else F.linear's casts would differ from the fused op's).
        if type(module) is not nn.Linear or "forward" in module.__dict__ or not fusion_enabled():
            return False
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _global_hooks()):
            return False
        w = module.weight
        return (type(w) is nn.Parameter or type(w) is torch.Tensor) and x.dtype == w.dtype \
            and x.device == w.device and not torch.is_autocast_enabled(x.device.type)

    def fused(self, module, x, a, b, scaling, mask=None):
        return lora_linear_fused(x, module.weight, module.bias, a, b, scaling, mask)


def _global_hooks() -> bool:
    """Any module hook registered for every module (``nn.modules.module.register_module_*_hook``)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


class Conv1DKind(LinearKind):
    """GPT-2's ``Conv1D``: weight stored transposed, (in, out). Same factors as Linear."""

    name = "conv1d_gpt2"
    transposed = True

    def matches(self, module):
        return _is_hf_conv1d(module)

    def dims(self, module):
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out

    def to_layout(self, module, delta_2d):
        return delta_2d.T  # (out, in) -> (in, out)

    def weight_2d(self, module):
        return module.weight.T  # (in, out) -> (out, in)


class EmbeddingKind(BaseKind):
    """``nn.Embedding``: weight (num, dim); A (r, num) starts at zero, B (dim, r) normal (as PEFT).

    The branch looks rows of Aᵀ up (an embedding of width r) and projects them with B, so ΔW as a
    ``(fan_out=dim, fan_in=num)`` matrix is B·A and the weight layout is its transpose.
    """

    name = "embedding"
    zero_b = False
    embedding = True

    def matches(self, module):
        return isinstance(module, nn.Embedding)

    def geometry(self, module, r):
        check_scaled_forward(module)
        return Geometry((r, module.num_embeddings), (module.embedding_dim, r))

    def branch(self, module, base_out, x, a, b, scaling, mask=None):
        # ids carry no dropout. (..., ) ids -> (..., r) -> (..., dim)
        after_a = F.embedding(x, a.T.to(base_out.dtype), module.padding_idx, module.max_norm,
                              module.norm_type, module.scale_grad_by_freq, module.sparse)
        out = (after_a @ b.T.to(base_out.dtype)) * scaling
        s = embed_scale(module)  # the forward's own row scale (Gemma's √d), as on the base path
        if s is not None:
            out = out * (s.to(out.dtype) if isinstance(s, torch.Tensor) else s)
        return base_out + out

    def to_layout(self, module, delta_2d):
        return delta_2d.T

    def weight_2d(self, module):
        return module.weight.T  # (num, dim) -> (dim, num)

    def apply_weight(self, module, x, weight_2d):
        # ids (...) -> rows of ΔWᵀ (..., dim)
        return F.embedding(x, weight_2d.T, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)


class ConvKind(BaseKind):
    """``nn.Conv1d/2d/3d`` (groups = 1): A is a conv with the base's kernel, stride, padding and
    dilation, in → r channels; B a 1×…×1 conv, r → out. ΔW = B·A over the flattened kernel."""

    name = "conv"
    _fns = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def matches(self, module):
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def geometry(self, module, r):
        if module.groups != 1:  # kind_of() gives grouped convs GroupedConvKind; a caller naming this kind
            raise UnsupportedModuleError(  # for one (loralib's Conv layers) is refused
                f"{type(module).__name__} with groups={module.groups}: this LoRA layer takes groups=1 "
                "convolutions only; wrap it with lorakit.inject (PEFT's grouped-conv LoRA) instead."
            )
        _check_padding_mode(module)
        k = tuple(module.kernel_size)
        ones = (1,) * len(k)
        return Geometry((r, module.in_channels, *k), (module.out_channels, r, *ones))

    def branch(self, module, base_out, x, a, b, scaling, mask=None):
        conv = self._fns[a.dim() - 2]
        dt = base_out.dtype
        x = apply_mask(x, mask)
        # (N, in, *L) -A-> (N, r, *L') -B-> (N, out, *L'); B is grouped (groups = module.groups) only
        # on GroupedConvKind, whose geometry made B (out, r/groups, 1…).
        xa = conv(x.to(dt), a.to(dt), None, module.stride, module.padding, module.dilation)
        return base_out + conv(xa, b.to(dt), groups=module.groups) * scaling

    def to_layout(self, module, delta_2d):
        return delta_2d.reshape(module.weight.shape)

    def weight_2d(self, module):
        return module.weight.flatten(1)  # (out, in/groups, *k) -> (out, in/groups·k)

    def apply_weight(self, module, x, weight_2d):
        w = weight_2d.reshape(module.weight.shape)
        return self._fns[w.dim() - 2](x.to(w.dtype), w, None, module.stride, module.padding, module.dilation,
                                      module.groups)


def _check_padding_mode(module: nn.Module) -> None:
    if module.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"{type(module).__name__} with padding_mode={module.padding_mode!r}: only 'zeros' is "
            "supported; remove this module from target_modules."
        )


class GroupedConvKind(ConvKind):
    """``nn.Conv1d/2d/3d`` with groups = G > 1 (depthwise when G = in_channels), in PEFT's form:

    A is a dense conv with the base's kernel, stride, padding and dilation, in → r channels (r, in, *k);
    B a grouped 1×…×1 conv, r → out in G groups (out, r/G, 1…), so r must be a multiple of G (PEFT's
    rule; depthwise: of the channel count). The update is therefore a dense conv
    ΔW = s·block_diagonal(B)·A (out, in·k) that reads every input channel — it has no place in the
    base's grouped weight (out, in/G, *k), so it is never merged (PEFT refuses too); the adapter runs
    as a branch, ``unload`` removes it. (PEFT's A also drops the base's dilation, which breaks its
    forward on dilated convs; lorakit keeps it, as for groups = 1.)
    """

    name = "grouped_conv"
    grouped = True
    in_place = False

    def matches(self, module):
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1

    def geometry(self, module, r):
        _check_padding_mode(module)
        g = module.groups
        if r % g:
            fix = g * max(1, round(r / g))
            raise ConfigError(
                f"{type(module).__name__} with groups={g}: LoRA rank r={r} is not a multiple of groups (PEFT's "
                f"rule: lora_B is a grouped conv over the r rank channels). Set r (or rank_pattern for this "
                f"module) to a multiple of {g}, e.g. {fix}, or remove the module from target_modules."
            )
        k = tuple(module.kernel_size)
        return Geometry((r, module.in_channels, *k), (module.out_channels, r // g, *(1,) * len(k)), b_groups=g)

    def _refuse_merge(self, module):
        return AdapterStateError(
            f"cannot merge a LoRA update into {type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"groups={module.groups}): on a grouped convolution LoRA's A reads every input channel, so its update "
            f"is a dense conv that the grouped weight (out, in/groups, k…) cannot hold (PEFT refuses too). Keep "
            "the adapter unmerged (it runs beside the base), or lorakit.unload(model) to remove it."
        )

    def to_layout(self, module, delta_2d):
        raise self._refuse_merge(module)

    def add_to_weight(self, module, delta):
        raise self._refuse_merge(module)


KINDS: tuple[BaseKind, ...] = (LinearKind(), Conv1DKind(), EmbeddingKind(), GroupedConvKind(), ConvKind())


def kind_of(module: nn.Module) -> BaseKind | None:
    """The base kind of ``module``: its own ``lora_base_kind`` if its class names one, else the first
    match in ``KINDS``; None when LoRA cannot wrap it."""
    own = getattr(type(module), "lora_base_kind", None)
    if isinstance(own, BaseKind):
        return own
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


def supported_type_names() -> Sequence[str]:
    return ("nn.Linear", "transformers Conv1D", "nn.Embedding", "nn.Conv1d/2d/3d (also grouped)", "lorakit QuantLinear")


def init_factors(a: torch.Tensor, b: torch.Tensor, zero_b: bool, mode: bool | str) -> None:
    """LoRA's initialisation (Hu et al. §4.1): one factor random, the other zero, so ΔW = 0 at start.

    Linear-like kinds (``zero_b``): A Kaiming-uniform (a=√5, as nn.Linear) or, with "gaussian",
    N(0, (1/r)²); B = 0. Embedding: A = 0, B ~ N(0, 1) (PEFT's choice).
    ``mode=False`` makes the zero factor random too (ΔW ≠ 0), for tests.
    """
    r = a.shape[0]
    with torch.no_grad():
        if zero_b:
            if mode == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if mode is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)
        else:
            nn.init.normal_(b)
            if mode is False:
                nn.init.normal_(a)
            else:
                nn.init.zeros_(a)
