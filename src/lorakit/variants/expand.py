"""LLaMA-Pro block expansion (Wu et al., ACL 2024, arXiv 2401.02415) — a model transform.

§3.2 of the paper: split the N decoder blocks into P groups of N/P; after each group insert a copy of
the group's top block whose *output* projections (attention ``o_proj`` and MLP ``down_proj``) are
zero. Every block is a residual update ``h ← h + attn(norm(h))`` then ``h ← h + mlp(norm(h))``, so
a block whose two output projections are zero adds nothing: the expanded model computes exactly the
original function. Then only the new blocks train (fully, or with LoRA restricted to them through
``LoraConfig(layers_to_transform=new_layers)``) and the original blocks keep what they knew.

    blocks 0 1 2 3   --expand_blocks(model, 2)-->   0 1 [1'] 2 3 [3']     ' = copy, o/down = 0

Norms and the other projections are *copied*, not zeroed: a zero norm (or zero q/k/v/up) would
give the new block's output projections a zero input and so a zero gradient — it could never start
learning. Zeroing the two output projections leaves their gradient ``g xᵀ`` non-zero.

After the insert the attention modules' ``layer_idx`` (which picks the block's slot in the KV cache)
and ``config.num_hidden_layers`` (``n_layer`` for GPT-2; transformers only runs the first
``num_hidden_layers`` blocks) and, where present, ``config.layer_types`` are renumbered, so
``generate`` with a cache, ``save_pretrained`` and ``from_pretrained`` all see an ordinary model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterStateError, ConfigError, UnsupportedModuleError
from ..state import model_state
from ..validate import check_bool


@dataclass(frozen=True)
class BlockLayout:
    """Where a family keeps its blocks and which modules of a block write into the residual stream.

    An output is a module path (its weight and bias are zeroed) or a parameter path (an MoE's stacked
    expert weights, e.g. Mixtral's ``mlp.experts.down_proj``, one (experts, ·, ·) tensor: zeroed whole).
    """

    family: str
    blocks: tuple[str, ...]  # candidate paths of the block ModuleList, e.g. "model.layers"
    outputs: tuple[str, ...]  # paths inside one block whose outputs are added to the residual


_LLAMA_BLOCKS = ("model.layers", "layers")
# First match wins; extend with :func:`register_layout`. For one block path the more specific layout
# (more outputs) comes first: a block is zeroed by the first layout whose outputs it has *all* of, so
# an MoE block with a shared expert never matches the plain-MoE layout, which would leave it live.
LAYOUTS: list[BlockLayout] = [
    # Qwen2-MoE / Qwen3-Next: routed experts (stacked) + one gated shared expert
    BlockLayout("qwen2-moe", _LLAMA_BLOCKS,
                ("self_attn.o_proj", "mlp.experts.down_proj", "mlp.shared_expert.down_proj")),
    # DeepSeek-V2/V3 (MLA attention, routed + shared experts; its first blocks may be dense: llama row)
    BlockLayout("deepseek-moe", _LLAMA_BLOCKS,
                ("self_attn.o_proj", "mlp.experts.down_proj", "mlp.shared_experts.down_proj")),
    # Mixtral, Qwen3-MoE, OLMoE, ...: routed experts only, stacked (transformers >= 5)
    BlockLayout("mixtral", _LLAMA_BLOCKS, ("self_attn.o_proj", "mlp.experts.down_proj")),
    # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo 2, Granite, StableLM, Cohere, ...
    BlockLayout("llama", _LLAMA_BLOCKS, ("self_attn.o_proj", "mlp.down_proj")),
    # Starcoder2 (model.layers, GPT-2-style MLP names)
    BlockLayout("starcoder2", _LLAMA_BLOCKS, ("self_attn.o_proj", "mlp.c_proj")),
    # Phi-1/1.5/2 (parallel attention + MLP on one LayerNorm)
    BlockLayout("phi", _LLAMA_BLOCKS, ("self_attn.dense", "mlp.fc2")),
    # GPT-2 family: Conv1D projections, weight stored (in, out)
    BlockLayout("gpt2", ("transformer.h", "h"), ("attn.c_proj", "mlp.c_proj")),
    # GPT-J, CodeGen (parallel attention + MLP)
    BlockLayout("gptj", ("transformer.h", "h"), ("attn.out_proj", "mlp.fc_out")),
    # Falcon, BLOOM
    BlockLayout("falcon", ("transformer.h", "h"), ("self_attention.dense", "mlp.dense_4h_to_h")),
    # GPT-NeoX, Pythia
    BlockLayout("gpt-neox", ("gpt_neox.layers", "layers"), ("attention.dense", "mlp.dense_4h_to_h")),
    # OPT (pre-LayerNorm configs only: see _check_pre_norm)
    BlockLayout("opt", ("model.decoder.layers", "decoder.layers"), ("self_attn.out_proj", "fc2")),
]


def register_layout(layout: BlockLayout, first: bool = True) -> None:
    """Teach :func:`expand_blocks` another architecture (e.g. GPT-NeoX: ``gpt_neox.layers``,
    ``attention.dense`` + ``mlp.dense_4h_to_h``)."""
    LAYOUTS.insert(0, layout) if first else LAYOUTS.append(layout)


def find_layout(model: nn.Module, blocks: str | None = None,
                outputs: Sequence[str] | None = None) -> tuple[str, BlockLayout]:
    """(path of the block list, layout) for ``model``; explicit ``blocks``/``outputs`` override."""
    if blocks is not None or outputs is not None:
        if isinstance(outputs, str):  # one projection, not its characters
            outputs = (outputs,)
        if not isinstance(blocks, str) or not blocks or not isinstance(outputs, (list, tuple)) or not outputs \
                or not all(isinstance(o, str) and o for o in outputs):
            raise ConfigError(f"blocks={blocks!r:.60}, outputs={outputs!r:.60}: give both blocks= (path of the block "
                              "ModuleList) and outputs= (the output projections inside one block), e.g. "
                              "blocks='model.layers', outputs=('self_attn.o_proj', 'mlp.down_proj').")
        layouts = [BlockLayout("custom", (blocks,), tuple(outputs))]
    else:
        layouts = LAYOUTS
    for layout in layouts:
        for path in layout.blocks:
            layers = _get(model, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0 and \
                    all(_get(layers[0], o) is not None for o in layout.outputs):
                return path, layout
    if blocks is not None:
        raise UnsupportedModuleError(
            f"{type(model).__name__}: {blocks!r} is not a non-empty ModuleList whose blocks contain "
            f"{list(outputs)}; check the paths with print(model)."
        )
    raise UnsupportedModuleError(
        f"{type(model).__name__}: lorakit does not know where this architecture keeps its decoder blocks "
        f"or which projections write into the residual stream (known: "
        f"{', '.join(f'{lay.family} {lay.blocks[0]}' for lay in LAYOUTS)}). Pass them: "
        "expand_blocks(model, n, blocks='path.to.layers', outputs=('attn.out_proj', 'mlp.fc2'))."
    )


def _get(module: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    """The submodule, or else the parameter, at ``path`` (None if neither)."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        pass
    try:
        return module.get_parameter(path)
    except AttributeError:
        return None


def _block_outputs(block: nn.Module, path: str, layout: BlockLayout, where: str) -> tuple[str, ...]:
    """The outputs to zero in ``block``: ``layout``'s, or — for a block of another kind in the same list
    (DeepSeek's dense first blocks before its MoE blocks) — those of the first layout of the same block
    path that the block has all of."""
    if all(_get(block, o) is not None for o in layout.outputs):
        return layout.outputs
    if layout.family != "custom":
        for other in LAYOUTS:
            if path in other.blocks and all(_get(block, o) is not None for o in other.outputs):
                return other.outputs
    raise UnsupportedModuleError(
        f"{where} ({type(block).__name__}) lacks {[o for o in layout.outputs if _get(block, o) is None]}, and no "
        "known layout names every module of it that writes into the residual stream; pass them: "
        "expand_blocks(model, n, blocks=..., outputs=(...)) — a module path or a parameter path each."
    )


def expansion_plan(n_blocks: int, n_new: int) -> list[tuple[int, bool]]:
    """The expanded order as ``(source block, is_copy)`` pairs; raises on a bad ``n_new``.

    >>> expansion_plan(4, 2)
    [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ConfigError(f"n_new={n_new!r}: the number of blocks to add must be an integer >= 1.")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ConfigError(f"n_blocks={n_blocks!r}: the model's block count must be an integer >= 1.")
    if n_blocks % n_new:
        divisors = [d for d in range(1, n_blocks + 1) if n_blocks % d == 0]
        raise ConfigError(
            f"n_new={n_new} does not divide the model's {n_blocks} blocks into equal groups (LLaMA-Pro "
            f"inserts one copy after each group); choose n_new among {divisors}."
        )
    group = n_blocks // n_new
    plan = []
    for i in range(n_blocks):
        plan.append((i, False))
        if (i + 1) % group == 0:
            plan.append((i, True))
    return plan


def expand_blocks(model: nn.Module, n_new: int, *, freeze: bool = True, blocks: str | None = None,
                  outputs: Sequence[str] | None = None) -> list[int]:
    """Insert ``n_new`` identity blocks into ``model`` in place (LLaMA-Pro §3.2); return their indices.

    Args:
        model: a pre-norm causal LM of a family in ``LAYOUTS`` (Llama family and its MoE
            variants, Phi, Starcoder2, GPT-2, GPT-J, Falcon, BLOOM, GPT-NeoX, OPT), or any model whose
            layout ``blocks``/``outputs`` name (module or parameter paths inside one block).
        n_new: blocks to add; must divide the number of blocks.
        freeze: leave only the new blocks trainable (the paper's recipe).

    Returns:
        The indices of the inserted blocks in the expanded model — pass them as
        ``LoraConfig(layers_to_transform=...)`` (or use :func:`lora_config_for_new_blocks`) to train
        them with LoRA instead of fully.
    """
    check_bool("freeze", freeze)
    if model_state(model) is not None:
        raise AdapterStateError(
            "the model already has lorakit adapters; expand the plain model first, then inject "
            "(or call lorakit.merge_and_unload(model) before expanding)."
        )
    path, layout = find_layout(model, blocks, outputs)
    config = getattr(model, "config", None)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedModuleError(
            f"{type(model).__name__} has scale_attn_by_inverse_layer_idx=True: its attention scale depends "
            "on the block index, so moving blocks would change the model after a reload; expansion "
            "supports only models with that option off."
        )
    _check_pre_norm(model, config)
    layers: nn.ModuleList = model.get_submodule(path)
    plan = expansion_plan(len(layers), n_new)
    new_list, new_idx = [], []
    for src, is_copy in plan:
        if not is_copy:
            new_list.append(layers[src])
            continue
        block = copy.deepcopy(layers[src])
        outs = _block_outputs(block, path, layout, f"{path}.{src}")
        for out in outs:
            _zero_output(_get(block, out), f"{path}.{src}.{out}")
        _check_silent(block, outs, getattr(config, "hidden_size", None), f"{path}.{src}")
        new_idx.append(len(new_list))
        new_list.append(block)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(new_list))
    _renumber(new_list)
    if config is not None:
        _update_config(config, plan)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in new_idx:
            for p in new_list[i].parameters():
                p.requires_grad_(True)
    return new_idx


def _zero_output(target: nn.Module | nn.Parameter, where: str) -> None:
    if isinstance(target, nn.Parameter):  # an MoE's stacked expert weights (experts, out, in)
        weight, bias = target, None
    else:
        weight, bias = getattr(target, "weight", None), getattr(target, "bias", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise UnsupportedModuleError(
            f"{where} is a {type(target).__name__} without a floating-point weight (quantized?); expand "
            "the full-precision model, then quantize."
        )
    weight.data.zero_()
    if isinstance(bias, nn.Parameter):
        bias.data.zero_()  # GPT-2's c_proj has a bias: it too must be zero for an exact identity


def _check_pre_norm(model: nn.Module, config) -> None:
    """Refuse post-LayerNorm blocks: h ← LN(h + f(h)) is not h when f = 0, so a zeroed copy would
    change the model (the paper's identity needs pre-norm residual blocks)."""
    post = None
    if getattr(config, "apply_residual_connection_post_layernorm", False):  # BLOOM's option
        post = "apply_residual_connection_post_layernorm=True"
    elif getattr(config, "do_layer_norm_before", True) is False:  # OPT-350m
        post = "do_layer_norm_before=False"
    if post is not None:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has {post}: its blocks normalise after the residual add, so a copied "
            "block with zeroed outputs is not an identity (LLaMA-Pro needs pre-norm blocks); expansion "
            "supports only pre-norm models."
        )


def _check_silent(block: nn.Module, outputs: tuple[str, ...], hidden: int | None, where: str) -> None:
    """For an MoE output (a stacked expert parameter): run the block's MLP on a random input and require
    an exact zero — a part of it no layout names (a shared expert under another name) would leave the
    copy live. MLPs take the hidden states alone; attention needs more, and its outputs are modules."""
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        return
    for out in outputs:
        if "." not in out or not isinstance(_get(block, out), nn.Parameter):
            continue
        name = out.split(".")[0]
        mlp = block.get_submodule(name)
        p = next(mlp.parameters())
        with torch.no_grad():
            y = mlp(torch.randn(1, 3, hidden, dtype=p.dtype, device=p.device))
        y = y[0] if isinstance(y, tuple) else y
        if not isinstance(y, torch.Tensor) or bool(y.ne(0).any()):
            raise UnsupportedModuleError(
                f"{where}.{name} ({type(mlp).__name__}) still writes into the residual stream after its "
                f"known outputs {[o for o in outputs if o.startswith(name + '.')]} were zeroed (a shared "
                "expert under another name?); pass every output: expand_blocks(model, n, blocks=..., outputs=(...))."
            )


def _renumber(blocks: list[nn.Module]) -> None:
    # Attention modules (and some decoder layers) carry their block index: it selects the block's
    # slot in the KV cache, so a stale index would make two blocks share one cache entry.
    for idx, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = idx


def _update_config(config, plan: list[tuple[int, bool]]) -> None:
    old_n = config.num_hidden_layers  # GPT-2's config maps this onto n_layer
    config.num_hidden_layers = len(plan)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == old_n:
        config.layer_types = [types[src] for src, _ in plan]  # a copy keeps its source's kind


def train_blocks(model: nn.Module, indices: Sequence[int]) -> None:
    """Freeze everything except the blocks ``indices`` (e.g. the ones :func:`expand_blocks` returned
    before a save and reload)."""
    path, _ = find_layout(model)
    layers = model.get_submodule(path)
    if not isinstance(indices, Sequence) or isinstance(indices, str) or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError(f"blocks {indices!r}: must be a list of block indices (integers), e.g. the list "
                          "expand_blocks returned.")
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad or not indices:
        raise ConfigError(f"blocks {list(indices)}: the model has blocks 0..{len(layers) - 1}; name at least one.")
    for p in model.parameters():
        p.requires_grad_(False)
    for i in indices:
        for p in layers[i].parameters():
            p.requires_grad_(True)


def lora_config_for_new_blocks(new_layers: Sequence[int], r: int = 8, lora_alpha: float = 16,
                               target_modules: list[str] | str = "all-linear", **kwargs) -> LoraConfig:
    """A ``LoraConfig`` that adapts only the blocks :func:`expand_blocks` inserted."""
    if isinstance(new_layers, (str, bytes)) or not isinstance(new_layers, Sequence) or not new_layers:
        # [] would reach LoraConfig as "no layer filter": every block, old ones included, would get LoRA
        raise ConfigError(f"new_layers={new_layers!r:.60}: give the non-empty list of block indices that "
                          "expand_blocks returned.")
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                      layers_to_transform=list(new_layers), **kwargs)
