"""lorakit: parameter-efficient fine-tuning with LoRA and its family.

    import lorakit
    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...  # train: only the LoRA factors require grad
    lorakit.save_adapter(model, "out/adapter")      # PEFT's on-disk format
    model = lorakit.merge_and_unload(model)          # the plain model, zero inference overhead
"""

import difflib
import inspect

from ._threads import apply_omp_defaults

apply_omp_defaults()  # before anything imports torch: see _threads.py (OpenMP spin-waiting on busy CPUs)

from .adapter_kinds.lycoris_config import LoHaConfig, LoKrConfig  # noqa: E402
from .adapters import (  # noqa: E402
    active_adapters,
    delete_adapter,
    disabled,
    list_adapters,
    merge,
    merge_and_unload,
    merged_adapters,
    per_row_adapters,
    set_adapter,
    set_trainable,
    unload,
    unmerge,
)
from .combine import combine_adapters  # noqa: E402
from .config import LoraConfig  # noqa: E402
from .errors import LorakitError, QuantizationError  # noqa: E402
from .inject import inject  # noqa: E402
from .io import load_adapter, save_adapter  # noqa: E402
from .summary import TrainableSummary, print_trainable_parameters, trainable_parameters  # noqa: E402


def quantize_model(model, quant_type: str = "nf4", **kwargs):
    """Replace the model's Linear layers by frozen 4-bit/8-bit ``QuantLinear`` (QLoRA); see
    :func:`lorakit.quant.quantize_model`. Imported lazily: quantization code loads only when used."""
    from .quant import quantize_model as _quantize_model

    options = list(inspect.signature(_quantize_model).parameters)[2:]  # after model, quant_type
    for k in kwargs:
        if k not in options:  # a typo would be a bare TypeError
            hint = difflib.get_close_matches(k, options, 1)
            raise QuantizationError(f"quantize_model: unknown option {k!r}"
                                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                    + f"; its options: {', '.join(options)}.")
    return _quantize_model(model, quant_type, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LorakitError",
    "TrainableSummary",
    "active_adapters",
    "combine_adapters",
    "delete_adapter",
    "disabled",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merged_adapters",
    "per_row_adapters",
    "print_trainable_parameters",
    "quantize_model",
    "save_adapter",
    "set_adapter",
    "set_trainable",
    "trainable_parameters",
    "unload",
    "unmerge",
]
