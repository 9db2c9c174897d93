"""The decision on every field of PEFT 0.21's ``LoraConfig`` that its ``LoHaConfig`` / ``LoKrConfig`` do
not have, when such a field appears in a LOHA / LOKR ``adapter_config.json`` (a hand-edited file, or a
tool that wrote LoRA's field names). docs/PEFT_FIELDS.md shows the same table.

PEFT itself drops every such key with one generic warning ("Unexpected keyword arguments … these are
ignored") and loads the plain LoHa / LoKr. lorakit does the same for the settings that only acted while
a LoRA adapter was created or trained (the weights file is complete without them) — but names them —
and refuses the ones that, when set, say the file means something else: other tensors (DoRA's
magnitude, a bias, trainable tokens), other maths (rsLoRA's α/√r, aLoRA) or another model
(layer_replication). Loading those as plain LoHa / LoKr would give outputs the writer did not get.

A field at PEFT ``LoraConfig``'s default value (``use_dora: false``, ``lora_dropout: 0.0``, …) says
nothing and passes silently; ``lora_alpha`` passes when it equals the file's ``alpha``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import ConfigError

Status = Literal["warned", "refused"]

# field → (status, PEFT LoraConfig's default values (any of them = unset), why)
_RUNTIME_DEFAULT = ({"ephemeral_gpu_offload": False},)
LORA_ONLY_FIELDS: dict[str, tuple[Status, tuple, str]] = {
    # -- settings of creating / training a LoRA adapter: the weights are in the file --------------------
    "lora_dropout": ("warned", (0, 0.0), "LoRA's dropout acts only in training; LoHa/LoKr's are rank_dropout "
                                         "and module_dropout"),
    "init_lora_weights": ("warned", (True,), "LoRA's initialisation; LoHa/LoKr's is init_weights, and a file's "
                                             "weights are loaded as they are"),
    "loftq_config": ("warned", ({}, None), "settings of LoRA's LoftQ initialisation"),
    "eva_config": ("warned", (None, {}), "settings of LoRA's EVA initialisation"),
    "corda_config": ("warned", (None, {}), "settings of LoRA's CorDA initialisation"),
    "lora_ga_config": ("warned", (None, {}), "settings of LoRA's LoRA-GA initialisation"),
    "fan_in_fan_out": ("warned", (False,), "lorakit reads the weight layout from the module type"),
    "runtime_config": ("warned", (None, {}, *_RUNTIME_DEFAULT), "runtime-only options of LoRA layers"),
    "megatron_config": ("warned", (None, {}), "how PEFT builds LoRA layers for Megatron-LM"),
    "megatron_core": ("warned", (None, "megatron.core"), "used only with megatron_config"),
    "qalora_group_size": ("warned", (16, None), "used only with use_qalora"),
    # -- set, they say the file means other tensors, other maths or another model ----------------------
    "lora_alpha": ("refused", (), "LoHa/LoKr read their α from 'alpha'; rename lora_alpha to alpha (PEFT would "
                                  "ignore lora_alpha and scale by alpha)"),
    "use_dora": ("refused", (False, None), "DoRA (a magnitude vector over LoRA's factors) is a LoRA option; "
                                           "LoHa/LoKr have no magnitude — set use_dora to false"),
    "use_rslora": ("refused", (False, None), "rsLoRA's α/√r scaling is a LoRA option; LoHa/LoKr scale by α/r — "
                                             "set use_rslora to false (fold √r into alpha if it was meant)"),
    "bias": ("refused", ("none", None), "LoHa/LoKr adapters carry no bias tensors in PEFT — set bias to 'none'"),
    "lora_bias": ("refused", (False, None), "a bias on LoRA's B factor; LoHa/LoKr have none — set it to false"),
    "layer_replication": ("refused", (None, []), "PEFT duplicates decoder layers before adapting them; the "
                                                 "model lorakit is given has the original layers — remove it"),
    "target_parameters": ("refused", (None, []), "LoRA on MoE expert parameters is a LoRA option; save it as "
                                                 "peft_type LORA"),
    "trainable_token_indices": ("refused", (None, [], {}), "trainable token rows are a LoRA option; save them "
                                                           "with peft_type LORA"),
    "alora_invocation_tokens": ("refused", (None, []), "activated LoRA applies the update only after its "
                                                       "invocation tokens; LoHa/LoKr apply it everywhere"),
    "use_qalora": ("refused", (False, None), "QA-LoRA (pooled-input LoRA for GPTQ models)"),
    "use_bdlora": ("refused", (None, False, {}), "BD-LoRA (block-diagonal LoRA factors)"),
    "ensure_weight_tying": ("refused", (False, None), "ties lm_head's LoRA to the embedding's LoRA"),
    "arrow_config": ("refused", (None, {}), "Arrow routing between LoRA experts"),
    "kasa_config": ("refused", (None, {}), "KaSA (singular-value LoRA)"),
    "velora_config": ("refused", (None, {}), "VeLoRA (compressed LoRA activations)"),
    "monteclora_config": ("refused", (None, {}), "MonteCLoRA (a mixture of LoRA updates)"),
}


def _is_default(value: Any, defaults: tuple) -> bool:
    # type-exact: 0 == False and 1 == True must not make a set flag look unset
    return any(type(value) is type(d) and value == d for d in defaults)


def check_lora_only_fields(data: Mapping[str, Any], source: str, peft_type: str, alpha: Any) -> None:
    """Refuse (one ``ConfigError`` naming every field) or warn about the LoRA-only fields of a LOHA / LOKR
    file ``source`` that are set; ``alpha`` is the file's own α (``lora_alpha`` may repeat it)."""
    refused, warned = [], []
    for name, (status, defaults, why) in LORA_ONLY_FIELDS.items():
        if name not in data:
            continue
        value = data[name]
        if name == "lora_alpha":
            same = (not isinstance(value, bool) and isinstance(value, (int, float))
                    and not isinstance(alpha, bool) and isinstance(alpha, (int, float))
                    and math.isclose(value, alpha))
            if same:
                continue
        elif _is_default(value, defaults):
            continue
        (refused if status == "refused" else warned).append(f"{name}={value!r}: {why}")
    if refused:
        lines = "\n  ".join(refused)
        raise ConfigError(f"{source}: peft_type {peft_type} with LoRA-only field(s) that change what the file "
                          f"means:\n  {lines}\nFix or remove them (docs/PEFT_FIELDS.md, 'LoHa / LoKr files').")
    if warned:
        warnings.warn(f"{source}: peft_type {peft_type} ignores the LoRA-only field(s) " + "; ".join(warned)
                      + " (PEFT ignores them too).", stacklevel=3)


__all__ = ["LORA_ONLY_FIELDS", "check_lora_only_fields"]
