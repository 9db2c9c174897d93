"""LoRA for image diffusion models (diffusers UNet + CLIP text encoders): LoRA / LoCon / LoHa / LoKr
adapters, kohya / LyCORIS / diffusers files, weighted stacks, merging, and the ``lorakit train-image``
command (docs/DIFFUSION.md)."""

from .components import components_of, family_of
from .config import DiffusionLoraConfig
from .inject import add_adapter
from .kohya import kohya_state_dict, load_kohya, save_kohya
from .peft_files import load_diffusers, save_diffusers
from .stack import merge, merge_and_unload, set_adapters, unmerge

__all__ = ["DiffusionLoraConfig", "add_adapter", "components_of", "family_of", "kohya_state_dict",
           "load_diffusers", "load_kohya", "merge", "merge_and_unload", "save_diffusers", "save_kohya",
           "set_adapters", "unmerge"]
