"""``AdaLoraConfig``: the settings of one AdaLoRA adapter (Zhang et al., ICLR 2023, arXiv 2303.10512).

Field names are PEFT's (``peft.AdaLoraConfig``), so an ``adapter_config.json`` written by either library
reads in the other. The three phases of training (§3.3) are set by ``tinit``, ``tfinal`` and
``total_step``, counted in optimizer steps::

    step  1 … tinit                 warm-up: all init_r triplets train, nothing is pruned
    step  tinit+1 … T−tfinal−1      budgeting: the total rank b(t) falls from b(0) to b(T) (cubic),
                                    the least important triplets are masked every ``deltaT`` steps
    step  T−tfinal                  final allocation: exactly b(T) triplets are kept, the factors
                                    are cut to them (``shrink``)
    step  T−tfinal+1 … T            fine-tuning of the fixed, smaller adapters

with b(0) = init_r × (number of adapted matrices) and b(T) = target_r × (number of adapted matrices).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import _check_int, validate_shared_fields
from ..errors import AdaLoraBudgetError, AdaLoraScheduleError, ConfigError, RankPatternError
from ..validate import MAX_ALPHA, check_bool, check_opt_str, known_fields

ORTH_REG_FORMS = ("official", "paper")
#: PEFT and the official code divide the update by (ranknum + 1e-5) with ranknum = init_r.
RANKNUM_EPS = 1e-5


@known_fields
@dataclass
class AdaLoraConfig:
    """Settings of one AdaLoRA adapter.

    Attributes:
        init_r: rank of every adapter at the start (b(0) = init_r × matrices), §3.3.
        target_r: average rank at the end (b(T) = target_r × matrices); the allocator decides which
            matrices keep more and which fewer (§3.2).
        tinit, tfinal: optimizer steps of initial warm-up and of final fine-tuning (§3.3, t_i and t_f).
        deltaT: mask every ``deltaT`` steps during budgeting (ΔT in §3.3).
        beta1, beta2: EMA factors of the smoothed sensitivity Ī and of the uncertainty Ū (§3.2).
        orth_reg_weight: γ, the weight of the orthogonal regulariser R(P, Q) (§3.1, eq. 4).
        orth_reg_form: ``"official"`` (default) — mean over all P's and Q's of the *unsquared*
            Frobenius norms ‖PᵀP − I‖, ‖QQᵀ − I‖, as the authors' code and PEFT compute it — or
            ``"paper"`` — the sum over adapters of the *squared* norms, as eq. 4 writes it. See
            docs/ADALORA.md for why "official" is the default.
        total_step: T, the number of optimizer steps of the run. May stay ``None`` when training
            through lorakit's loop (the AdaLoRA hook fills it in from the run's length).
        lora_alpha: α; the update is P·Λ·Q · α / init_r (as PEFT; α ≤ 0 means "scale by 1").
        lora_dropout: dropout on the adapter branch's input.
        target_modules, exclude_modules, layers_to_transform, layers_pattern: which modules to adapt
            (same rules as :class:`lorakit.LoraConfig`). Linear-like layers and convolutions only.
        bias, modules_to_save: as in :class:`lorakit.LoraConfig`.
        init_lora_weights: ``True`` (Λ = 0, P and Q ~ N(0, 0.02²): the model starts unchanged) or
            ``False`` (Λ ~ N(0, 1) too: ΔW ≠ 0, for tests).
        rank_pattern: PEFT's record of the allocation, ``{"<module path>.lora_E": [kept?] * init_r}``;
            written when saving, read when loading (``None`` before any allocation).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    orth_reg_form: str = "official"
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    rank_pattern: dict[str, list[bool]] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_int("init_r", self.init_r, minimum=1)
        _check_int("target_r", self.target_r, minimum=1)
        if self.target_r > self.init_r:
            raise AdaLoraBudgetError(
                f"target_r={self.target_r} is above init_r={self.init_r}: AdaLoRA only prunes, so the final "
                f"budget cannot exceed the initial one. Lower target_r or raise init_r (e.g. init_r = "
                f"{math.ceil(1.5 * self.target_r)}, 1.5 × target_r as in the paper)."
            )
        _check_int("tinit", self.tinit, minimum=0)
        _check_int("tfinal", self.tfinal, minimum=0)
        _check_int("deltaT", self.deltaT, minimum=1)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ConfigError(f"{name}={v!r}: must be in (0, 1); the paper uses 0.85.")
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"orth_reg_weight={w!r}: must be a finite number ≥ 0 (0 turns the regulariser off).")
        if self.orth_reg_form not in ORTH_REG_FORMS:
            raise ConfigError(f"orth_reg_form={self.orth_reg_form!r}: use one of {', '.join(ORTH_REG_FORMS)}.")
        if self.total_step is not None:
            check_schedule(self.total_step, self.tinit, self.tfinal)
        a = self.lora_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= MAX_ALPHA:
            raise ConfigError(f"lora_alpha={a!r}: must be a number in [0, {MAX_ALPHA:g}] (e.g. 2 × init_r; 0 means "
                              "init_r).")
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_opt_str("base_model_name_or_path", self.base_model_name_or_path)
        validate_shared_fields(self)
        if self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r}: use True (Λ = 0, the model starts "
                "unchanged) or False (random Λ, for tests)."
            )
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise RankPatternError(f"rank_pattern={self.rank_pattern!r:.60}: must be a mapping "
                                       f"{{'<module path>.lora_E': [kept?] * init_r}} or null (not a "
                                       f"{type(self.rank_pattern).__name__}).")
            self.rank_pattern = {str(k): _check_pattern_entry(k, v, self.init_r) for k, v in self.rank_pattern.items()}

    # -- derived values ---------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """α / (init_r + 1e-5): fixed for the adapter's life, also after pruning (as PEFT's ``ranknum``)."""
        alpha = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return float(alpha) / (self.init_r + RANKNUM_EPS)

    def with_total_step(self, total_step: int) -> AdaLoraConfig:
        """A copy with ``total_step`` set (validated)."""
        return dataclasses.replace(self, total_step=total_step)

    # -- PEFT's JSON ------------------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The fields PEFT's ``AdaLoraConfig`` reads, with PEFT's names (``orth_reg_form`` is ours)."""
        out = dataclasses.asdict(self)
        out.update(peft_type="ADALORA", inference_mode=True, revision=None, use_rslora=False, use_dora=False,
                   alpha_pattern={})
        if self.orth_reg_form == "official":
            del out["orth_reg_form"]  # PEFT's behaviour; PEFT warns about keys it does not know
        return out

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json") -> AdaLoraConfig:
        """Read PEFT's AdaLoRA ``adapter_config.json``; unknown non-default fields warn."""
        if data.get("peft_type") != "ADALORA":
            raise ConfigError(f"{source}: peft_type is {data.get('peft_type')!r}, not 'ADALORA'; load it with "
                              "lorakit.load_adapter.")
        for flag in ("use_dora", "use_rslora"):
            if data.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported for AdaLoRA adapters.")
        known = {f.name for f in dataclasses.fields(cls)}
        silent = {"peft_type", "inference_mode", "revision", "auto_mapping", "peft_version", "r", "use_dora",
                  "use_rslora", "lora_bias", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config",
                  "layer_replication", "runtime_config", "eva_config", "corda_config", "qalora_group_size",
                  "use_qalora", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
                  "ensure_weight_tying", "arrow_config", "kasa_config", "lora_ga_config", "monteclora_config",
                  "use_bdlora", "velora_config"}
        unknown = sorted(k for k in data if k not in known and k not in silent and data[k] not in (None, False, {}, []))
        if unknown:
            warnings.warn(f"{source}: ignoring fields lorakit does not know: {', '.join(unknown)}.", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["init_lora_weights"] = bool(kwargs.get("init_lora_weights", True))
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise type(exc)(f"{source}: {exc}") from None


def check_schedule(total_step: Any, tinit: int, tfinal: int) -> None:
    """Raise :class:`AdaLoraScheduleError` unless t_i + t_f < T (a budgeting phase exists)."""
    if total_step is None:
        raise AdaLoraScheduleError(
            "total_step is missing: AdaLoRA's budget schedule needs the number of optimizer steps. Set "
            "AdaLoraConfig(total_step=...) or train with lorakit's loop, which fills it in."
        )
    _check_int("total_step", total_step, minimum=1)
    if tinit + tfinal >= total_step:
        raise AdaLoraScheduleError(
            f"total_step={total_step} leaves no budgeting phase after the warm-ups tinit={tinit} + "
            f"tfinal={tfinal}: need tinit + tfinal < total_step. Raise total_step or lower tinit/tfinal "
            f"(e.g. tinit={total_step // 10}, tfinal={total_step // 5})."
        )


def _check_pattern_entry(key: Any, value: Any, init_r: int) -> list[bool]:
    if isinstance(value, Mapping) or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise RankPatternError(f"rank_pattern[{key!r}]={value!r}: must be a list of {init_r} booleans (kept?).")
    flags = [bool(v) for v in value]
    if len(flags) != init_r:
        raise RankPatternError(
            f"rank_pattern[{key!r}] has {len(flags)} entries but init_r={init_r}: the pattern was saved with "
            "another init_r; load it with the adapter_config.json it was saved with."
        )
    return flags
