"""``LoraConfig``: the settings of one LoRA adapter, validated on construction.

Field names follow PEFT's ``LoraConfig`` for the concepts both share, so an ``adapter_config.json``
written by either library reads in the other. Hu et al. 2021 (arXiv 2106.09685) §4.1 defines the
update ΔW = B·A scaled by α/r; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by α/√r instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError
from .validate import (
    MAX_ALPHA,
    MAX_RANK,
    check_bool,
    check_int,
    check_int_list,
    check_number,
    check_opt_str,
    check_pattern_map,
    check_str_list,
)

InitKind = Literal["kaiming", "gaussian"]
BIAS_CHOICES = ("none", "all", "lora_only")
COMMON_LAYER_PATTERNS = ("layers", "h", "blocks", "layer", "block")


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    Attributes:
        r: rank of the update (Hu et al. §4.1); ``rank_pattern`` overrides it per module.
        lora_alpha: α; the update is scaled by α/r (or α/√r with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input (never on the base path).
        target_modules: which modules to adapt: a list of names (exact module path, or a suffix that
            matches after a ``.``), a regex string (must match the whole module path), or
            ``"all-linear"`` (every Linear / GPT-2 Conv1D except the output embedding and a
            classification head).
        exclude_modules: the same forms, removed from the targets.
        fan_in_fan_out: kept for PEFT compatibility; lorakit reads the layout from the layer type
            (GPT-2's Conv1D stores its weight as (in, out)) and writes True when it adapted a Conv1D.
        bias: ``"none"``, ``"all"`` (every bias trains and is saved) or ``"lora_only"`` (the biases of
            adapted layers train and are saved).
        modules_to_save: modules trained in full next to the adapter (e.g. a classifier head).
        use_rslora: scale by α/√r (rank-stabilized LoRA).
        init_lora_weights: ``True`` (B = 0, A Kaiming-uniform), ``"gaussian"`` (B = 0, A ~ N(0, 1/r))
            or ``False`` (A and B both random — ΔW ≠ 0; for tests only).
        rank_pattern / alpha_pattern: ``{regex: value}``; a key matches a module when it matches the
            end of its path after a ``.`` (PEFT's rule).
        layers_to_transform: only adapt modules inside these layer indices (``layers.<i>.`` style).
        layers_pattern: the name of the layer list (default: any of layers, h, blocks, layer, block).
        task_type, base_model_name_or_path: carried into the file for PEFT.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        # Strict types first, bounds before any allocation: r = 2**31 must fail here, not in torch.empty.
        check_int("r", self.r, minimum=1, maximum=MAX_RANK)
        _check_number("lora_alpha", self.lora_alpha)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("use_rslora", self.use_rslora)
        validate_shared_fields(self)
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r}: use True (B=0, Kaiming A), "
                "'gaussian' (B=0, Gaussian A) or False (random A and B, for tests)."
            )
        self.rank_pattern = check_pattern_map(
            "rank_pattern", self.rank_pattern, lambda n, v: check_int(n, v, minimum=1, maximum=MAX_RANK))
        self.alpha_pattern = check_pattern_map("alpha_pattern", self.alpha_pattern, _check_number)
        for key in (*self.rank_pattern, *self.alpha_pattern):
            _check_regex(f"pattern key {key!r}", key)
        check_opt_str("task_type", self.task_type)
        check_opt_str("base_model_name_or_path", self.base_model_name_or_path)

    # -- per-module values ------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def scaling_for(self, module_path: str) -> float:
        """α/r (Hu et al. §4.1) or α/√r under rsLoRA."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT's JSON --------------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The fields PEFT's ``LoraConfig.from_pretrained`` reads, with PEFT's names."""
        out = dataclasses.asdict(self)
        out.update(peft_type="LORA", inference_mode=True, revision=None, lora_bias=False, use_dora=False)
        if isinstance(out["init_lora_weights"], str):
            out["init_lora_weights"] = "gaussian"
        return out

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read a PEFT ``adapter_config.json``; fields a newer PEFT added are ignored with a warning."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: must hold a JSON object of LoRA settings, not a {type(data).__name__}; "
                              "save the adapter again.")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(
                f"{source}: peft_type is {peft_type!r}; lorakit.load_adapter reads LoRA adapters "
                "(peft_type 'LORA'). AdaLoRA adapters load with lorakit.variants.adalora."
            )
        for flag in ("use_dora", "lora_bias"):
            if data.get(flag):
                raise ConfigError(f"{source}: {flag}=true is a PEFT variant lorakit does not implement.")
        known = {f.name for f in dataclasses.fields(cls)}
        # Fields PEFT writes that mean nothing to us, or carry their default: ignored silently.
        silent = {
            "peft_type", "inference_mode", "revision", "auto_mapping", "peft_version", "use_dora",
            "lora_bias", "megatron_config", "megatron_core", "loftq_config", "layer_replication",
            "runtime_config", "eva_config", "corda_config", "qalora_group_size", "use_qalora",
            "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
            "ensure_weight_tying", "arrow_config", "kasa_config", "lora_ga_config", "monteclora_config",
            "use_bdlora", "velora_config",
        }
        unknown = sorted(k for k in data if k not in known and k not in silent and data[k] not in (None, False, {}, []))
        if unknown:
            warnings.warn(
                f"{source}: ignoring fields lorakit does not know (written by a newer PEFT?): "
                f"{', '.join(unknown)}.",
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("init_lora_weights"), str) and kwargs["init_lora_weights"] != "gaussian":
            kwargs["init_lora_weights"] = True  # pissa/olora/loftq inits only matter at creation
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc} Fix the field or save the adapter again.") from None


# -- helpers ----------------------------------------------------------------------------------
def validate_shared_fields(cfg: Any) -> None:
    """Check and normalise the fields every LoRA-family config shares (LoraConfig, AdaLoraConfig):
    lora_dropout, target_modules, exclude_modules, bias, modules_to_save, layers_to_transform,
    layers_pattern."""
    check_number("lora_dropout", cfg.lora_dropout, 0.0, 1.0, high_open=True, example=", e.g. 0.05")
    cfg.target_modules = _norm_targets("target_modules", cfg.target_modules)
    cfg.exclude_modules = _norm_targets("exclude_modules", cfg.exclude_modules)
    if cfg.target_modules is None:
        raise ConfigError(
            "target_modules is not set: give a list of module names (e.g. ['q_proj', 'v_proj']), "
            "a regex matching whole module paths, or 'all-linear'."
        )
    if not isinstance(cfg.bias, str) or cfg.bias not in BIAS_CHOICES:
        raise ConfigError(f"bias={cfg.bias!r}: must be one of {', '.join(BIAS_CHOICES)}.")
    modules = check_str_list("modules_to_save", cfg.modules_to_save or None)
    cfg.modules_to_save = [modules] if isinstance(modules, str) else modules
    cfg.layers_to_transform = check_int_list("layers_to_transform", cfg.layers_to_transform)
    pattern = check_str_list("layers_pattern", cfg.layers_pattern or None)
    cfg.layers_pattern = [pattern] if isinstance(pattern, str) else pattern


def _check_int(name: str, value: Any, minimum: int) -> None:
    check_int(name, value, minimum=minimum)


def _check_number(name: str, value: Any) -> None:
    return check_number(name, value, 0.0, MAX_ALPHA, low_open=True, example=" (e.g. 2·r)")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{name} is not a valid regular expression: {exc}.") from None


def _norm_targets(name: str, value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            _check_regex(name, value)
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError(f"{name}={value!r}: use a list of module names, a regex string or 'all-linear'.")
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}={value!r}: must be a non-empty list of non-empty module names.")
    return sorted(set(value))


def _pattern_value(patterns: Mapping[str, Any], module_path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_path):
            return value
    return default
