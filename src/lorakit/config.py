"""``LoraConfig``: the settings of one LoRA adapter, validated on construction.

Field names follow PEFT's ``LoraConfig`` for the concepts both share, so an ``adapter_config.json``
written by either library reads in the other. Hu et al. 2021 (arXiv 2106.09685) §4.1 defines the
update ΔW = B·A scaled by α/r; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by α/√r instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .config_slices import FusedSlices, normalize_fused_slices
from .errors import ConfigError
from .peft_fields import check_peft_fields
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
    known_fields,
)

InitKind = Literal["kaiming", "gaussian"]
BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_WEIGHT_INIT = re.compile(r"^(pissa|pissa_niter_\d+|olora)$")
_LOFTQ_KEYS = ("loftq_bits", "loftq_iter")  # the fields of PEFT's LoftQConfig
COMMON_LAYER_PATTERNS = ("layers", "h", "blocks", "layer", "block")


@known_fields
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
            classification head), or None: PEFT's default for the model's ``config.model_type``
            (``peft_defaults.DEFAULT_TARGETS``, e.g. q_proj and v_proj for Llama), resolved by inject.
        exclude_modules: the same forms, removed from the targets.
        fan_in_fan_out: kept for PEFT compatibility; lorakit reads the layout from the layer type
            (GPT-2's Conv1D stores its weight as (in, out)) and writes True when it adapted a Conv1D.
        bias: ``"none"``, ``"all"`` (every bias trains and is saved) or ``"lora_only"`` (the biases of
            adapted layers train and are saved).
        modules_to_save: modules trained in full next to the adapter (e.g. a classifier head).
        use_rslora: scale by α/√r (rank-stabilized LoRA).
        init_lora_weights: ``True`` (B = 0, A Kaiming-uniform), ``"gaussian"`` (B = 0, A ~ N(0, 1/r)),
            ``False`` (A and B both random — ΔW ≠ 0; for tests only), or an init from the weight that
            CHANGES the base weights (adapter_kinds/weight_inits.py): ``"pissa"`` / ``"pissa_niter_N"``
            (principal singular triplets), ``"olora"`` (QR); ``"loftq"`` (NF4 bases, through
            ``lorakit.quant.loftq``, with ``loftq_config``).
        use_dora: DoRA (Liu et al. 2024): a trainable magnitude per output channel on top of the
            LoRA direction (adapter_kinds/dora.py).
        loftq_config: ``{"loftq_bits": 4, "loftq_iter": N}`` for ``init_lora_weights="loftq"``.
        target_parameters: parameters to adapt directly, e.g. MoE expert weights stored as 3-D tensors
            (``["experts.gate_up_proj", "experts.down_proj"]``; adapter_kinds/expert_params.py).
            ``target_modules`` may then be empty.
        trainable_token_indices: train only these rows of the input embedding (a list of token ids), or
            ``{embedding module name: [ids]}`` (adapter_kinds/trainable_tokens.py).
        rank_pattern / alpha_pattern: ``{regex: value}``; a key matches a module when it matches the
            end of its path after a ``.`` (PEFT's rule). When several keys match, the most specific
            (covering the longest end of the path) wins, whatever the keys' order; inject warns.
        layers_to_transform: only adapt modules inside these layer indices. The index is PEFT's: the
            first numbered segment of the path (T5 ``encoder.block.1.layer.0…`` → 1).
        layers_pattern: the name(s) of the layer list, e.g. ``"layers"`` (regexes, as in PEFT).
        task_type, base_model_name_or_path: carried into the file for PEFT.
        fused_slices: ``{module name: [True, False, True]}`` — LoRA on chosen output slices of a fused
            projection only (loralib's ``MergedLinear``; ``config_slices.py``). lorakit-only field.
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
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    fused_slices: dict[str, FusedSlices] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Strict types first, bounds before any allocation: r = 2**31 must fail here, not in torch.empty.
        check_int("r", self.r, minimum=1, maximum=MAX_RANK)
        _check_number("lora_alpha", self.lora_alpha)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("use_rslora", self.use_rslora)
        validate_shared_fields(self, targets_optional=True)
        init = self.init_lora_weights  # a real bool or a known string: 1 or 1.0 is not True here
        if not (isinstance(init, bool) or (isinstance(init, str) and (init in ("gaussian", "loftq")
                                                                       or _WEIGHT_INIT.match(init)))):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r}: use True (B=0, Kaiming A), "
                "'gaussian' (B=0, Gaussian A), False (random A and B, for tests), 'pissa', "
                "'pissa_niter_N' (N an integer, e.g. 'pissa_niter_4'), 'olora' or 'loftq'."
            )
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora={self.use_dora!r}: must be True or False.")
        if self.loftq_config is not None and not isinstance(self.loftq_config, Mapping):
            raise ConfigError(f"loftq_config={self.loftq_config!r:.60}: must be a mapping such as "
                              "{'loftq_bits': 4, 'loftq_iter': 1} (got a "
                              f"{type(self.loftq_config).__name__}).")
        self.loftq_config = dict(self.loftq_config or {})
        unknown = [k for k in self.loftq_config if k not in _LOFTQ_KEYS]
        if unknown:  # {'loftq_itr': 5} ran one iteration, silently
            hint = difflib.get_close_matches(str(unknown[0]), _LOFTQ_KEYS, 1)
            raise ConfigError(f"loftq_config key {unknown[0]!r}: not a LoftQ setting"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; use {' and '.join(_LOFTQ_KEYS)} (PEFT's LoftQConfig).")
        if self.init_lora_weights == "loftq":
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            if bits != 4:
                raise ConfigError(f"loftq_config loftq_bits={bits!r}: lorakit's LoftQ quantizes to NF4; use 4.")
            _check_int("loftq_config loftq_iter", iters, minimum=1)
            self.loftq_config = {"loftq_bits": 4, "loftq_iter": iters}
        self.rank_pattern = check_pattern_map(
            "rank_pattern", self.rank_pattern, lambda n, v: check_int(n, v, minimum=1, maximum=MAX_RANK))
        self.alpha_pattern = check_pattern_map("alpha_pattern", self.alpha_pattern, _check_number)
        for key in (*self.rank_pattern, *self.alpha_pattern):
            _check_regex(f"pattern key {key!r}", key)
        check_opt_str("task_type", self.task_type)
        check_opt_str("base_model_name_or_path", self.base_model_name_or_path)
        self.fused_slices = normalize_fused_slices(self.fused_slices, self.target_modules)
        if self.fused_slices and (self.use_dora or isinstance(self.init_lora_weights, str)
                                  and self.init_lora_weights != "gaussian"):
            # the sliced kind is plain LoRA factors on chosen output slices: DoRA / PiSSA were dropped silently
            what = "use_dora=True" if self.use_dora else f"init_lora_weights={self.init_lora_weights!r}"
            raise ConfigError(f"fused_slices and {what} exclude each other: fused slices are plain LoRA factors on "
                              "chosen output slices of a fused projection (loralib's MergedLinear). Drop one of them.")

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
        out.update(peft_type="LORA", inference_mode=True, revision=None, lora_bias=False)
        if out["init_lora_weights"] not in (True, False, "gaussian"):
            # pissa/olora/loftq changed the base when the adapter was made; a reader that ran them again
            # on load (PEFT does) would change the residual base a second time. The file's factors are final.
            out["init_lora_weights"] = True
        if not out["fused_slices"]:
            del out["fused_slices"]  # a lorakit-only field: written only when used
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
        # Every PEFT field has a decision in peft_fields.PEFT_FIELDS: features lorakit lacks are
        # refused by name; fields no decision covers (a newer PEFT's) are ignored with a warning.
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in check_peft_fields(data, source) if k not in known]
        if unknown:
            warnings.warn(
                f"{source}: ignoring fields lorakit does not know (written by a newer PEFT?): "
                f"{', '.join(unknown)}.",
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("init_lora_weights") not in (True, False, "gaussian"):
            # pissa/olora/loftq only matter when an adapter is created: a file's factors are loaded
            # into the (residual) base it was trained on, which is never changed again.
            kwargs["init_lora_weights"] = True
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc} Fix the field or save the adapter again.") from None


# -- helpers ----------------------------------------------------------------------------------
def validate_shared_fields(cfg: Any, targets_optional: bool = False) -> None:
    """Check and normalise the fields every LoRA-family config shares (LoraConfig, AdaLoraConfig):
    lora_dropout, target_modules, exclude_modules, bias, modules_to_save, layers_to_transform,
    layers_pattern. ``targets_optional``: ``target_modules=None`` means PEFT's default targets for the
    model's type, resolved at inject (``peft_defaults.default_targets``)."""
    check_number("lora_dropout", cfg.lora_dropout, 0.0, 1.0, high_open=True, example=", e.g. 0.05")
    _norm_extra_targets(cfg)
    if cfg.target_modules in (None, [], ()) and (getattr(cfg, "target_parameters", None)
                                                 or getattr(cfg, "trainable_token_indices", None)):
        cfg.target_modules = []  # only parameters / token rows are adapted (PEFT writes [])
    else:
        cfg.target_modules = _norm_targets("target_modules", cfg.target_modules)
    cfg.exclude_modules = _norm_targets("exclude_modules", cfg.exclude_modules)
    if cfg.target_modules is None and not targets_optional:
        raise ConfigError(
            "target_modules is not set: give a list of module names (e.g. ['q_proj', 'v_proj']), "
            "a regex matching whole module paths, or 'all-linear'."
        )
    task = getattr(cfg, "task_type", None)
    if task is not None and task not in TASK_TYPES:  # PEFT refuses it on load, and SEQ_CLS changes targets
        raise ConfigError(f"task_type={task!r}: use one of {', '.join(TASK_TYPES)} (PEFT's TaskType), or None.")
    if not isinstance(cfg.bias, str) or cfg.bias not in BIAS_CHOICES:
        raise ConfigError(f"bias={cfg.bias!r}: must be one of {', '.join(BIAS_CHOICES)}.")
    modules = check_str_list("modules_to_save", cfg.modules_to_save or None)
    cfg.modules_to_save = [modules] if isinstance(modules, str) else modules
    cfg.layers_to_transform = check_int_list("layers_to_transform", cfg.layers_to_transform)
    pattern = check_str_list("layers_pattern", cfg.layers_pattern or None)
    cfg.layers_pattern = [pattern] if isinstance(pattern, str) else pattern
    for pat in cfg.layers_pattern or []:  # compiled as peft_rules.layer_index composes it
        _check_regex(f"layers_pattern {pat!r}", rf"(?:^|.*?\.){pat}\.(\d+)\.")


def _norm_extra_targets(cfg: Any) -> None:
    params = getattr(cfg, "target_parameters", None)
    if params is not None:
        if isinstance(params, str):
            params = [params]
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, str) and p for p in params):
            raise ConfigError(f"target_parameters={params!r}: give a list of parameter names, e.g. "
                              "['experts.gate_up_proj', 'experts.down_proj'].")
        cfg.target_parameters = list(params) or None
    tokens = getattr(cfg, "trainable_token_indices", None)
    if tokens is not None:
        items = tokens.items() if isinstance(tokens, dict) else [("the input embedding", tokens)]
        for name, idx in items:
            if not isinstance(idx, (list, tuple)) or not idx or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
                raise ConfigError(f"trainable_token_indices for {name}: {idx!r} — give a non-empty list of token "
                                  "ids (integers ≥ 0), e.g. [32000, 32001].")
        cfg.trainable_token_indices = ({k: list(v) for k, v in tokens.items()} if isinstance(tokens, dict)
                                       else list(tokens))


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
    if isinstance(value, str) and not value.strip():  # a regex that matches nothing (or everything)
        raise ConfigError(f"{name}={value!r}: give module names (e.g. ['q_proj', 'v_proj']), a regex matching "
                          "whole module paths, or 'all-linear'.")
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
    key = pattern_key(patterns, module_path)
    return default if key is None else patterns[key]


def _coverage(key: str, module_path: str) -> int:
    """How many path segments ``key`` needs: the segment count of the SHORTEST ``.``-bounded end of
    ``module_path`` that the regex matches in full (0: no match). PEFT's test ``(.*\\.)?(key)$``."""
    rx = re.compile(key)
    starts = [i + 1 for i, c in enumerate(module_path) if c == "."][::-1] + [0]  # shortest end first
    # pos= keeps '^' anchored at the real start of the path (re's documented behaviour).
    return next((module_path.count(".", i) + 1 for i in starts if rx.fullmatch(module_path, i)), 0)


def _literal_chars(key: str) -> int:
    """Characters of ``key`` that must appear as written (escapes count, wildcards and classes do not)."""
    escaped = len(re.findall(r"\\.", key))
    rest = re.sub(r"\\.|\[[^\]]*\]|\{[^}]*\}", "", key)
    return escaped + len(re.sub(r"[.*+?()|^$]", "", rest))


def pattern_key(patterns: Mapping[str, Any], module_path: str) -> str | None:
    """The rank/alpha pattern key that applies to ``module_path``: among the keys that match, the MOST
    SPECIFIC — first the one that needs more path segments ("layers.1.self_attn.q_proj" beats
    "q_proj"), then the one with more literal characters ("v_proj" beats ".*_proj"), then the
    alphabetically smaller. The winner does not depend on the keys' order, so it survives a JSON round
    trip (both libraries write keys sorted; PEFT itself takes the first match in dict order, so its
    meaning can change after save → load)."""
    ranked = [((_coverage(k, module_path), _literal_chars(k)), k) for k in patterns]
    ranked = [(score, k) for score, k in ranked if score[0]]
    if not ranked:
        return None
    best = max(score for score, _ in ranked)
    return min(k for score, k in ranked if score == best)


def pattern_overlaps(patterns: Mapping[str, Any], paths: list[str]) -> dict[str, list[str]]:
    """module path → the pattern keys matching it, for the paths matched by more than one key."""
    out = {}
    for path in paths:
        hits = [k for k in patterns if _coverage(k, path)]
        if len(hits) > 1:
            out[path] = hits
    return out


def warn_pattern_overlaps(config: Any, paths: list[str]) -> None:
    """Warn once per pattern dict when several keys match one adapted module (the most specific wins),
    and, as PEFT does, when a key matches no adapted module (a typo would otherwise go unnoticed)."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name, None) or {}
        unused = sorted(k for k in patterns if paths and not any(_coverage(k, p) for p in paths))
        if unused:
            warnings.warn(f"{field_name}: key(s) {unused} match no adapted module and were ignored; a key "
                          "matches the end of a module path (e.g. 'q_proj' or 'layers.0.mlp.up_proj').",
                          stacklevel=3)
        overlaps = pattern_overlaps(patterns, paths)
        if overlaps:
            path, keys = next(iter(overlaps.items()))
            warnings.warn(
                f"{field_name}: {len(overlaps)} module(s) match several keys, e.g. {path!r} matches "
                f"{sorted(keys)}; the most specific key wins ({pattern_key(patterns, path)!r}). Use keys "
                "that do not overlap to make the choice explicit.",
                stacklevel=3,
            )
