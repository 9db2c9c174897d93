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

from torch import nn

from ..config import LoraConfig
from ..errors import AdapterStateError, ConfigError, UnsupportedModuleError
from ..state import model_state
from ..validate import check_bool


@dataclass(frozen=True)
class BlockLayout:
    """Where a family keeps its blocks and which modules of a block write into the residual stream."""

    family: str
    blocks: tuple[str, ...]  # candidate paths of the block ModuleList, e.g. "model.layers"
    outputs: tuple[str, ...]  # paths inside one block whose outputs are added to the residual


# First match wins; extend with :func:`register_layout`.
LAYOUTS: list[BlockLayout] = [
    # Llama, Mistral, Qwen2/3, Gemma, Phi-3, ... (decoder layer = self_attn + mlp)
    BlockLayout("llama", ("model.layers", "layers"), ("self_attn.o_proj", "mlp.down_proj")),
    # GPT-2 family: Conv1D projections, weight stored (in, out)
    BlockLayout("gpt2", ("transformer.h", "h"), ("attn.c_proj", "mlp.c_proj")),
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


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


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
        model: a Llama-family (``model.layers``, ``o_proj``/``down_proj``) or GPT-2-family
            (``transformer.h``, ``attn.c_proj``/``mlp.c_proj``) causal LM, or any model whose layout
            ``blocks``/``outputs`` name.
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
    layers: nn.ModuleList = model.get_submodule(path)
    plan = expansion_plan(len(layers), n_new)
    new_list, new_idx = [], []
    for src, is_copy in plan:
        if not is_copy:
            new_list.append(layers[src])
            continue
        block = copy.deepcopy(layers[src])
        for out in layout.outputs:
            _zero_output(block.get_submodule(out), f"{path}.{src}.{out}")
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


def _zero_output(module: nn.Module, where: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise UnsupportedModuleError(
            f"{where} is a {type(module).__name__} without a floating-point weight (quantized?); expand "
            "the full-precision model, then quantize."
        )
    weight.data.zero_()
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter):
        bias.data.zero_()  # GPT-2's c_proj has a bias: it too must be zero for an exact identity


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
