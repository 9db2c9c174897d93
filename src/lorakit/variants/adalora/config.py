"""``AdaLoraConfig`` lives with the AdaLoRA adapter kind in the core (``lorakit.adapter_kinds``)."""

from ...adapter_kinds.adalora_config import (
    ORTH_REG_FORMS,
    AdaLoraConfig,
    _check_pattern_entry,
    check_schedule,
)

__all__ = ["ORTH_REG_FORMS", "AdaLoraConfig", "_check_pattern_entry", "check_schedule"]
