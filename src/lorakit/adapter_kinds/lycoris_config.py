"""``LoHaConfig`` / ``LoKrConfig``: settings of the LyCORIS adapter kinds, with PEFT's field names (so an
``adapter_config.json`` with ``peft_type`` LOHA / LOKR reads in either library), validated on construction.

Not implemented (refused with the fix): rank/module dropout during training and Tucker-decomposed
convolutions (``use_effective_conv2d``); loading a PEFT file that set the dropouts keeps the weights and
drops the (training-only) dropouts with a warning. LoRA-only fields in a LOHA / LOKR file (``use_dora``,
``lora_dropout``, ``layer_replication``, …) are refused or warned about per field (``lycoris_fields``).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import _check_int, _check_number, _check_regex, validate_shared_fields
from ..errors import ConfigError
from ..validate import check_bool, check_number, check_opt_str, check_pattern_map, known_fields
from .lycoris_fields import LORA_ONLY_FIELDS, check_lora_only_fields


@known_fields
@dataclass
class LycorisConfig:
    """Fields shared by LoHa and LoKr (PEFT's ``LycorisConfig``).

    Attributes:
        r, alpha: rank and α; the update is scaled by α/r (LoKr: see ``scale_rule``).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in
            :class:`lorakit.LoraConfig`. Linear and Conv2d bases only.
        rank_pattern, alpha_pattern: ``{regex: value}`` per module (PEFT's rule: the regex matches
            the end of the module path after a ``.``).
        init_weights: True (ΔW = 0 at start) or False (random; for tests).
        rank_dropout, module_dropout: must be 0 (not implemented).
        use_effective_conv2d: must be False (Tucker convolutions are not implemented).
    """

    peft_type: ClassVar[str] = "?"
    lora_dropout: ClassVar[float] = 0.0  # the shared validation and bias handling read these
    bias: ClassVar[str] = "none"

    r: int = 8
    alpha: float = 8.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_int("r", self.r, minimum=1)
        _check_number("alpha", self.alpha)
        validate_shared_fields(self)
        for name in ("rank_dropout", "module_dropout"):  # [] or "0" read as "off" before
            check_number(name, getattr(self, name), 0.0, 1.0, high_open=True, example=", e.g. 0.0")
        if self.rank_dropout or self.module_dropout:
            raise ConfigError(f"rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}: "
                              f"{self.peft_type} dropouts are not implemented in lorakit; set them to 0.")
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        if self.use_effective_conv2d:
            raise ConfigError("use_effective_conv2d=True (Tucker-decomposed convolutions) is not implemented; "
                              "set it to False (convolutions use the flattened (out, in·k·k) layout).")
        # a real bool or a known string: 1 == True and 0.0 == False would pass a plain `in`
        if not isinstance(self.init_weights, (bool, str)) or self.init_weights not in self._inits():
            raise ConfigError(f"init_weights={self.init_weights!r}: use one of {self._inits()}.")
        self.rank_pattern = check_pattern_map("rank_pattern", self.rank_pattern,
                                              lambda n, v: _check_int(n, v, minimum=1) or v)
        self.alpha_pattern = check_pattern_map("alpha_pattern", self.alpha_pattern,
                                               lambda n, v: _check_number(n, v) or v)
        for key in (*self.rank_pattern, *self.alpha_pattern):
            _check_regex(f"pattern key {key!r}", key)
        check_opt_str("base_model_name_or_path", self.base_model_name_or_path)

    def _inits(self) -> tuple:
        return (True, False)

    def rank_for(self, path: str) -> int:
        return int(_pattern(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        return float(_pattern(self.alpha_pattern, path, self.alpha))

    _lorakit_only: ClassVar[tuple[str, ...]] = ()

    def to_peft_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._lorakit_only}
        out.update(peft_type=self.peft_type, inference_mode=True, revision=None, task_type=None)
        return out

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json"):
        """Read a PEFT ``adapter_config.json`` with ``peft_type`` LOHA / LOKR. LoRA-only fields
        (``use_dora``, ``lora_dropout``, …) are refused or warned about by ``lycoris_fields``; fields
        nothing knows (a newer PEFT's) are ignored with a warning, as PEFT does."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: must hold a JSON object of {cls.peft_type} settings, not a "
                              f"{type(data).__name__}; save the adapter again.")
        peft_type = data.get("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(f"{source}: peft_type is {peft_type!r}, not {cls.peft_type!r}; read it with "
                              "lorakit.load_adapter, which picks the adapter kind from peft_type.")
        known = {f.name for f in dataclasses.fields(cls)} - set(cls._lorakit_only)
        check_lora_only_fields(data, source, cls.peft_type, data.get("alpha", cls.alpha))
        unknown = sorted(k for k in data if k not in known and k not in LORA_ONLY_FIELDS
                         and k not in _PEFT_METADATA)
        if unknown:
            warnings.warn(f"{source}: ignoring fields lorakit does not know for {cls.peft_type} (written by a "
                          f"newer PEFT?): {', '.join(unknown)}.", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("rank_dropout") or kwargs.get("module_dropout"):
            warnings.warn(f"{source}: rank_dropout/module_dropout only act in training and are not implemented; "
                          "the adapter loads without them.", stacklevel=2)
            kwargs["rank_dropout"] = kwargs["module_dropout"] = 0.0
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


#: PEFT's fields of every config (metadata lorakit does not use: it is given the model object).
_PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "revision", "auto_mapping", "peft_version"})


@known_fields
@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa (``lorakit.adapter_kinds.loha``)."""

    peft_type: ClassVar[str] = "LOHA"


@known_fields
@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr (``lorakit.adapter_kinds.lokr``).

    Attributes:
        decompose_both: also factor W1 into w1_a·w1_b (when r < max(out_l, in_m)/2).
        decompose_factor: LyCORIS' dimension factor (-1: the most balanced split).
        scale_rule: "peft" (s = α/r always, PEFT's LoKr) or "lycoris" (s = 1 when both factors are full,
            LyCORIS' and ComfyUI's rule). Not a PEFT field; files are written so PEFT gets the same ΔW.
    """

    peft_type: ClassVar[str] = "LOKR"
    _lorakit_only: ClassVar[tuple[str, ...]] = ("scale_rule",)

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    scale_rule: str = "peft"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("decompose_both", self.decompose_both)
        check_bool("rank_dropout_scale", self.rank_dropout_scale)
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or (
                self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ConfigError(f"decompose_factor={self.decompose_factor!r}: use -1 (balanced) or a positive integer.")
        if self.scale_rule not in ("peft", "lycoris"):
            raise ConfigError(f"scale_rule={self.scale_rule!r}: use 'peft' (α/r) or 'lycoris' (1 when both factors "
                              "are full).")

    def _inits(self) -> tuple:
        return (True, False, "lycoris")


def _pattern(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", path):
            return value
    return default
