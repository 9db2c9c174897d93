"""What differs when the model is sharded (FSDP through ``accelerate``): saving gathers the shards.

DDP needs nothing here: every process holds the whole model, and the main process saves it. Under
FSDP a process holds only its shard, so the final artifact is written from
``accelerator.get_state_dict(model)`` (the full state dict, gathered on the main process):

* ``lora`` / ``loraplus`` adapters: the PEFT-format file is assembled from the gathered tensors by
  the parameter names recorded before wrapping (``adapter_param_names``);
* whole-model artifacts (``full``, ``expand``): ``save_pretrained(state_dict=...)``.

Checkpoints (optimizer state) and resume are not implemented under FSDP yet: the run refuses
``save_every`` / ``resume`` there and writes only the final artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .._fs import atomic_dir
from ..errors import ConfigError
from ..io import adapter_tensors, peft_config_dict, write_adapter_dir
from ..state import model_state, require_adapter
from .args import TrainArgs


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_args(args: TrainArgs) -> None:
    if args.save_every or args.resume:
        raise ConfigError("checkpoints and --resume are not supported under FSDP yet (the optimizer state is "
                          "sharded); run with save_every=0 and no resume, or use DDP.")


def adapter_param_names(model: nn.Module, adapter_name: str = "default") -> dict[str, str] | None:
    """PEFT file key → parameter name in ``model``, for a plain LoRA adapter (None otherwise)."""

    st = model_state(model)
    if st is None or adapter_name not in st.adapters or st.adapters[adapter_name].kind != "lora":
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(b): n for n, b in model.named_buffers()})
    return {key: names[id(t)] for key, t in adapter_tensors(model, adapter_name).items() if id(t) in names}


def save_artifact(accelerator, model, unwrapped, setup, path: Path, tokenizer: Any,
                  key_names: dict[str, str] | None) -> None:
    """Write the method's artifact once, from the main process (gathering shards under FSDP)."""
    if not is_fsdp(accelerator):
        if accelerator.is_main_process:
            with atomic_dir(path) as tmp:  # every method's artifact appears whole or not at all
                setup.save(unwrapped, tmp, tokenizer)
        accelerator.wait_for_everyone()
        return
    full = accelerator.get_state_dict(model)  # collective: every process takes part
    if accelerator.is_main_process:
        with atomic_dir(path) as tmp:  # the whole artifact appears at once
            if setup.artifact == "adapter":
                if key_names is None:
                    raise ConfigError(f"saving a {setup.artifact} of method {type(setup).__name__} under FSDP is only "
                                      "supported for LoRA adapters; use DDP for this method.")

                tensors = {k: full[n].detach().contiguous().cpu().clone() for k, n in key_names.items()}
                write_adapter_dir(tmp, tensors, peft_config_dict(unwrapped, "default", require_adapter(unwrapped, "default").config))
            else:
                unwrapped.save_pretrained(tmp, state_dict=full, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
