"""lorakit's decision on every field of PEFT 0.21's ``LoraConfig`` — the one table to flip when a
feature lands (docs/PEFT_FIELDS.md shows the same table to users).

Each field is

* ``implemented`` — read and honoured (the same maths as PEFT);
* ``ignored`` — read and deliberately not used, for the reason given (metadata, runtime-only options,
  the settings of an initialisation whose result is already in the weights file);
* ``refused`` — a feature lorakit does not implement: a file that *uses* it (the field is set to
  anything but its off value) is refused with the feature's name, because loading it as plain LoRA
  would give wrong outputs or fail later with an unhelpful "unexpected tensor".

``init_lora_weights`` gets a decision per value (:data:`INIT_DECISIONS`): initialisations that only
choose the starting factors load like plain LoRA; those that also rewrite the base weights (PiSSA,
OLoRA, CorDA, LoftQ, LoRA-GA) need the residual base model they produced and are refused for now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

Status = Literal["implemented", "ignored", "refused"]
# Another helper implements these; until it lands they are refused here (flip the status to enable).
_PENDING = "not implemented in lorakit yet (planned with the adapter-contract work)"


@dataclass(frozen=True)
class Decision:
    status: Status
    reason: str
    feature: str = ""  # the feature's name, for refusals


def _i(reason: str) -> Decision:
    return Decision("implemented", reason)


def _ign(reason: str) -> Decision:
    return Decision("ignored", reason)


def _ref(feature: str, reason: str) -> Decision:
    return Decision("refused", reason, feature)


PEFT_FIELDS: dict[str, Decision] = {
    # -- metadata -------------------------------------------------------------------------------
    "peft_type": _i("must be 'LORA' (AdaLoRA files go to lorakit.variants.adalora)"),
    "task_type": _i("carried through save/load; with SEQ_CLS, inject adds the model's 'classifier' / 'score' "
                    "to modules_to_save (as PEFT), and a file's names load leniently (only names present in "
                    "the model are kept)"),
    "base_model_name_or_path": _i("carried; written from model.config._name_or_path when unset"),
    "auto_mapping": _ign("PEFT's custom-model class mapping; lorakit is given the model object"),
    "peft_version": _ign("informational"),
    "revision": _ign("hub revision of the base model; lorakit is given the model object"),
    "inference_mode": _ign("lorakit.load_adapter(trainable=...) decides; written as true"),
    # -- the LoRA update ------------------------------------------------------------------------
    "r": _i("rank (Hu et al. §4.1)"),
    "lora_alpha": _i("α; scaling α/r"),
    "use_rslora": _i("scaling α/√r (Kalajdzievski 2023)"),
    "lora_dropout": _i("dropout on the LoRA branch input"),
    "rank_pattern": _i("per-module rank; overlapping keys: the most specific key wins (see below)"),
    "alpha_pattern": _i("per-module α; same precedence as rank_pattern"),
    "init_lora_weights": _i("True / False / 'gaussian' at creation; other values per INIT_DECISIONS"),
    "fan_in_fan_out": _i("lorakit reads the layout from the layer type (GPT-2 Conv1D); written true "
                         "when a Conv1D is adapted"),
    "bias": _i("'none' / 'all' / 'lora_only'"),
    # -- which modules --------------------------------------------------------------------------
    "target_modules": _i("list (exact path or '.'-suffix), whole-path regex, or 'all-linear'"),
    "exclude_modules": _i("same forms as target_modules"),
    "layers_to_transform": _i("PEFT's layer-index rule (peft_rules.layer_index)"),
    "layers_pattern": _i("PEFT's layer-index rule (peft_rules.layer_index)"),
    "modules_to_save": _i("trainable copies; never a LoRA target inside one; names that match no "
                          "module are skipped when reading a file, refused in a user's own config"),
    # -- options that change nothing lorakit computes ---------------------------------------------
    "runtime_config": _ign("runtime-only (ephemeral GPU offload of DoRA's weight norm)"),
    "megatron_config": _ign("how PEFT builds LoRA for Megatron-LM parallel layers; same maths, and "
                            "lorakit adapts the torch modules it is given"),
    "megatron_core": _ign("module name used with megatron_config"),
    "loftq_config": _i("LoftQ's settings (loftq_bits=4 NF4, loftq_iter) for lorakit.quant.loftq_inject"),
    "eva_config": _ign("settings of the EVA initialisation; the trained factors are in the file"),
    "corda_config": _ign("settings of init_lora_weights='corda' (refused through that value)"),
    "lora_ga_config": _ign("settings of init_lora_weights='lora_ga' (refused through that value)"),
    "qalora_group_size": _ign("only used with use_qalora (refused)"),
    # -- features lorakit does not implement (refused by name when set) ----------------------------
    "use_dora": _i("DoRA: adapter_kinds/dora.py (magnitude vector, detached column norm)"),
    "trainable_token_indices": _i("trainable embedding rows: adapter_kinds/trainable_tokens.py"),
    "target_parameters": _i("LoRA on 3-D expert parameters (MoE): adapter_kinds/expert_params.py"),
    "alora_invocation_tokens": _ref("aLoRA, activated LoRA (alora_invocation_tokens)",
                                    "the update applies only after the invocation tokens; plain LoRA "
                                    "would apply it everywhere"),
    "layer_replication": _ref("layer replication (layer_replication)",
                              "PEFT duplicates decoder layers before adapting them; the base model "
                              "lorakit is given has the original layer count"),
    "ensure_weight_tying": _ref("weight tying of adapters (ensure_weight_tying)",
                                "PEFT ties lm_head's adapter to embed_tokens' adapter; save the adapter "
                                "with ensure_weight_tying=False"),
    "lora_bias": _ref("LoRA-B bias (lora_bias)", "a trainable bias on lora_B"),
    "use_qalora": _ref("QA-LoRA (use_qalora)", "pooled-input adapters for GPTQ models"),
    "monteclora_config": _ref("MonteCLoRA (monteclora_config)", "a Monte-Carlo mixture of low-rank updates"),
    "use_bdlora": _ref("BD-LoRA (use_bdlora)", "block-diagonal factors for tensor parallelism"),
    "arrow_config": _ref("Arrow routing (arrow_config)", "routes between a library of LoRA experts"),
    "kasa_config": _ref("KaSA (kasa_config)", "knowledge-aware singular-value adaptation"),
    "velora_config": _ref("VeLoRA (velora_config)", "rank-1 compressed activations in the LoRA branch"),
}

# init_lora_weights values (strings; True/False are plain LoRA). Values starting with "pissa" share
# PiSSA's decision ("pissa_niter_16").
INIT_DECISIONS: dict[str, Decision] = {
    "gaussian": _i("B = 0, Gaussian A"),
    "eva": _ign("data-driven A at creation; the base is unchanged, the factors are in the file"),
    "orthogonal": _ign("orthogonal A and B at creation; the base is unchanged"),
    "mica": _ign("B from the base's minor singular vectors at creation; the base is unchanged"),
    "pissa": _i("run at inject (adapter_kinds/weight_inits.py; the base becomes W - BA); a file's "
                "factors load against the residual base they were trained on — convert them to a plain "
                "LoRA of the original weights with lorakit.init_conversion.save_as_lora"),
    "olora": _i("run at inject (QR of W; the base becomes the residual); files as for pissa"),
    "loftq": _i("lorakit.quant.loftq_inject on NF4 bases (alternating quantize / SVD); files as for pissa"),
    "corda": _ref("CorDA initialisation (init_lora_weights='corda')", "it rewrites the base weights"),
    "lora_ga": _ref("LoRA-GA initialisation (init_lora_weights='lora_ga')", "it rewrites the base weights"),
}

_OFF_VALUES = (None, False, {}, [], "")


def _is_set(value: Any) -> bool:
    return not any(value is off or (type(value) is type(off) and value == off) for off in _OFF_VALUES)


def init_decision(value: Any) -> Decision | None:
    if not isinstance(value, str):
        return None
    key = "pissa" if value.startswith("pissa") else value
    return INIT_DECISIONS.get(key)


def check_peft_fields(data: Mapping[str, Any], source: str) -> list[str]:
    """Refuse a PEFT config that uses a feature lorakit does not implement, naming every such feature;
    return the fields this table does not know (a newer PEFT's), for the caller to warn about."""
    refused = [(name, d) for name, d in PEFT_FIELDS.items()
               if d.status == "refused" and name in data and _is_set(data[name])]
    init = data.get("init_lora_weights", True)
    d = init_decision(init)
    if isinstance(init, str) and d is None:
        raise ConfigError(
            f"{source}: init_lora_weights={init!r} is not a value lorakit knows; use True, False or 'gaussian'."
        )
    if d is not None and d.status == "refused":
        refused.append(("init_lora_weights", d))
    if refused:
        lines = "\n  ".join(f"{d.feature}: {d.reason}" for _, d in refused)
        raise ConfigError(
            f"{source}: this adapter uses PEFT feature(s) lorakit does not implement:\n  {lines}\n"
            "Loading it as plain LoRA would give wrong outputs; use PEFT for this adapter "
            "(docs/PEFT_FIELDS.md lists every PEFT LoraConfig field and lorakit's decision)."
        )
    return sorted(k for k in data if k not in PEFT_FIELDS and _is_set(data[k]))
