"""Per-architecture facts lorakit shares with PEFT 0.21, keyed by transformers' ``config.model_type``.

* :data:`DEFAULT_TARGETS` / :func:`default_targets` — what ``target_modules=None`` adapts: PEFT's
  ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` (``peft/utils/constants.py``), copied as data
  so that a config without targets selects the same modules in both libraries and lorakit does not
  import PEFT. A model type missing here has no default: name the targets.
* :func:`peft_unreachable` — modules whose weights a model's fused kernels read directly, so a LoRA
  branch on them would be skipped on that path: Mamba-style mixers hand ``out_proj.weight`` and
  ``conv1d.weight`` to ``mamba_inner_fn`` / ``causal_conv1d_fn`` (PEFT refuses them too, in
  ``tuners_utils._check_lora_target_modules_mamba``). On MoE model types whose experts transformers 5
  stores as stacked 3-D parameters, PEFT rewrites every target NAME of the old per-expert Linear layers
  (``gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` / ``w2`` / ``w3``, the router ``gate``)
  into ``target_parameters`` (``peft/utils/transformers_weight_conversion.py``,
  ``_convert_peft_config_moe``), whether the name is short, a full path or the leaf a regex matched — so
  a dense Linear of that name (a shared expert, a first-k-dense layer) can never be a PEFT target there.
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError

_QV = ("q_proj", "v_proj")
_QUERY_VALUE = ("query", "value")

#: model_type → PEFT's default ``target_modules`` (a tuple of names, or one whole-path regex string).
DEFAULT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "bart": _QV, "gpt2": ("c_attn",), "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"), "opt": _QV, "gptj": _QV, "gpt_neox": ("query_key_value",),
    "gpt_neo": _QV, "bert": _QUERY_VALUE, "roberta": _QUERY_VALUE, "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE, "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "layoutlm": _QUERY_VALUE, "llama": _QV, "llama4": _QV, "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",), "mpt": ("Wqkv",), "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",), "falcon": ("query_key_value",), "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",), "mistral": _QV, "mixtral": _QV, "stablelm": _QV,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"), "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": _QV, "qwen3": _QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"), "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

# Mamba-style mixers: their CUDA fast path reads these modules' weights, not their forward.
_FUSED_KERNEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
_FUSED_KERNEL_MODULES = frozenset({"out_proj", "conv1d"})


# transformers 5.24's model types whose MoE checkpoints convert like Mixtral's or Qwen2-MoE's
# (transformers.conversion_mapping._MODEL_TO_CONVERSION_PATTERN, plus PEFT's own "mixtral" entry), and
# the names PEFT then moves from target_modules to target_parameters (_MOE_TARGET_MODULE_MAPPING).
_MIXTRAL_LIKE = frozenset({"mixtral", "minimax", "minimax_m2"})
_QWEN2_MOE_LIKE = frozenset({
    "Dots3NoteTextModel", "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
    "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "qwen3_moe",
    "beam", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen3_next", "hunyuan_v1_moe",
    "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "UnlimitedOcrTextModel"})
_MOE_RENAMED = {
    **dict.fromkeys(_MIXTRAL_LIKE, {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj",
                                    "w2": "down_proj"}),
    **dict.fromkeys(_QWEN2_MOE_LIKE, {"gate": "gate.weight", "gate_proj": "gate_up_proj",
                                      "up_proj": "gate_up_proj", "down_proj": "down_proj"}),
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_targets(model: nn.Module) -> list[str] | str:
    """PEFT's default ``target_modules`` for ``model``'s type (what ``target_modules=None`` means)."""
    mtype = model_type(model)
    targets = DEFAULT_TARGETS.get(mtype) if isinstance(mtype, str) else None
    if targets is None:
        what = f"model_type {mtype!r}" if mtype else f"a {type(model).__name__} (no config.model_type)"
        raise ConfigError(
            f"target_modules is not set and {what} has no default targets (PEFT's table has none either): "
            "give target_modules — a list of module names (e.g. ['q_proj', 'v_proj']), a regex matching whole "
            "module paths, or 'all-linear'."
        )
    return targets if isinstance(targets, str) else sorted(targets)


def moe_parameter_name(model: nn.Module, name: str) -> str | None:
    """The stacked expert parameter PEFT reads target name ``name`` as on ``model`` (None: not an MoE
    expert name there): ``gate_proj`` → ``gate_up_proj`` on Qwen3-MoE, ``w2`` → ``down_proj`` on Mixtral."""
    mtype = model_type(model)
    return _MOE_RENAMED.get(mtype, {}).get(name) if isinstance(mtype, str) else None


def peft_unreachable(model: nn.Module, path: str) -> str | None:
    """Why module ``path`` of ``model`` cannot take a LoRA adapter PEFT would read alike (None: it can):
    fused kernels bypass it, or PEFT rewrites its name into an MoE expert parameter."""
    mtype = model_type(model)
    name = path.rpartition(".")[2]
    renamed = moe_parameter_name(model, name)
    if renamed is not None:
        return (f"module {path!r}: on a {mtype} model PEFT reads the target name {name!r} as the MoE experts' "
                f"parameter {renamed!r} (transformers 5 stacks the experts), so an adapter on this dense module "
                "could not be loaded by PEFT. Adapt the experts with target_parameters=['experts.gate_up_proj', "
                "'experts.down_proj'], and leave this module out (exclude_modules).")
    if mtype not in _FUSED_KERNEL_TYPES or name not in _FUSED_KERNEL_MODULES:
        return None
    return (f"module {path!r}: a {mtype} model's fused kernels read {name}.weight directly, so a LoRA update "
            f"there would be skipped on GPU (PEFT refuses it too). Remove {name!r} from target_modules (adapt "
            "e.g. in_proj, x_proj, dt_proj), or add it to exclude_modules.")
