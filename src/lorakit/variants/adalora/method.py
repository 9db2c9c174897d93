"""How ``lorakit train --method adalora`` maps the run's settings onto AdaLoRA (the method itself is an
entry of the static table ``lorakit.train.methods.METHODS``).

The LoRA flags map onto AdaLoRA at an equal final budget: ``--r`` is the *target* average rank
(``target_r``), and each matrix starts at ``init_r`` = ⌈1.5·r⌉ (the paper's ratio, e.g. 12 → 8).
Everything else AdaLoRA-specific goes through ``method_options`` with PEFT's names::

    lorakit train --method adalora --r 8 method_options.init_r=12 method_options.deltaT=10

Without ``total_step``/``tinit``/``tfinal`` the schedule follows the run: T = the run's optimizer
steps, t_i = ⌊0.1·T⌋, t_f = ⌊0.3·T⌋ (set by the hook at the start of training).
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import ConfigError
from .config import AdaLoraConfig

OPTIONS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
           "orth_reg_form", "total_step", "lora_alpha")
#: t_i and t_f as fractions of the run when the options leave the schedule out.
AUTO_WARMUPS = (0.1, 0.3)


def adalora_config(args: Any) -> tuple[AdaLoraConfig, bool]:
    """The ``AdaLoraConfig`` that ``TrainArgs`` describe, and whether the hook sets the schedule."""
    if getattr(args, "use_rslora", False):
        raise ConfigError("use_rslora does not apply to AdaLoRA (its scaling is α / init_r); drop --use-rslora.")
    if getattr(args, "use_dora", False) or getattr(args, "fused_slices", None):  # were silently ignored
        raise ConfigError("use_dora / fused_slices do not apply to AdaLoRA (its adapters are P·Λ·Q); drop them.")
    opts = dict(args.method_options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"method_options {unknown} are not AdaLoRA options; valid: {', '.join(OPTIONS)}.")
    # AdaLoraConfig checks each value's type and range, naming the field (int('x') was a bare ValueError)
    target_r = opts.pop("target_r", args.r)
    if isinstance(target_r, bool) or not isinstance(target_r, int):
        raise ConfigError(f"method adalora: method_options.target_r={target_r!r}: must be an integer ≥ 1 "
                          "(the final average rank).")
    auto = not any(k in opts for k in ("total_step", "tinit", "tfinal"))
    config = AdaLoraConfig(
        init_r=opts.pop("init_r", math.ceil(1.5 * target_r)),
        target_r=target_r,
        lora_alpha=opts.pop("lora_alpha", args.lora_alpha),
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        modules_to_save=args.modules_to_save,
        task_type="SEQ_CLS" if args.task == "seq-cls" else "CAUSAL_LM",
        **opts,
    )
    return config, auto
