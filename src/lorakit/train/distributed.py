"""Saving the final artifact once, from the main process, with the shards gathered under FSDP.

DDP needs nothing here: every process holds the whole model, and the main process saves it. Under
FSDP (``fsdp.py``) a process holds 1/W of each parameter, so the trainable parameters are gathered
into whole tensors first (``dist_checkpoint.whole_parameters``) and the method's own writer runs on
the main process, exactly as in a one-process run: the PEFT adapter file has every tensor at its
full shape (never the empty adapter of huggingface/peft#2892), ``method=full`` its
``save_pretrained`` directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._fs import atomic_dir
from .dist_checkpoint import whole_parameters


def save_artifact(accelerator, unwrapped, setup, path: Path, tokenizer: Any, trainable_names: list[str],
                  sharded: bool) -> None:
    """Write the method's artifact once, from the main process (gathering shards when ``sharded``)."""
    with whole_parameters(unwrapped, trainable_names if sharded else []):  # collective under FSDP
        if accelerator.is_main_process:
            with atomic_dir(path) as tmp:  # every method's artifact appears whole or not at all
                setup.save(unwrapped, tmp, tokenizer)
    accelerator.wait_for_everyone()
