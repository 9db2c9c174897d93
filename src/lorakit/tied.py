"""Merging into a tied weight is refused.

Models such as Llama with ``tie_word_embeddings`` (or T5, GPT-2) share one parameter between the input
embedding and ``lm_head``. Merging an adapter of ``lm_head`` adds ΔW to that shared tensor, so the
input embedding changes too and the merged model no longer computes what the unmerged one did
(PEFT only warns). lorakit refuses before touching any weight and says how to untie.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import AdapterStateError
from .state import lora_layers


def check_merge_untied(model: nn.Module, names: Sequence[str]) -> None:
    """Raise ``AdapterStateError`` if merging ``names`` would write into a weight that another module
    of ``model`` also uses."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for path, host in lora_layers(model):
        pending = [n for n in names if n in host.lora and n not in host.merged]
        if not pending:
            continue
        if all(getattr(host.lora[n], "merges_into_tied_weight", False) for n in pending):
            continue  # the kind writes one update meant for every tied user (trainable tokens' rows)
        w = host.base_layer.__dict__.get("_parameters", {}).get("weight")
        if w is None:
            continue
        others = [n for n in owners.get(id(w), []) if not n.startswith(path + ".")]
        if others:
            raise AdapterStateError(
                f"cannot merge into {path!r}: its weight is tied to {', '.join(others)}, so merging would change "
                "that module too (merged and unmerged outputs would differ). Keep the adapter unmerged, or untie "
                f"first: `m = model.get_submodule({path!r}); m.weight = torch.nn.Parameter(m.weight.detach().clone())` "
                "(and set model.config.tie_word_embeddings = False before saving the merged model)."
            )
