"""LoRA for image diffusion models (diffusers UNet + CLIP text encoders): adapters, kohya / LyCORIS /
diffusers files, merging and stacking, and the ``lorakit train-image`` command (docs/DIFFUSION.md)."""

from .components import components_of, family_of
from .config import DiffusionLoraConfig
from .inject import add_adapter
from .kohya import kohya_state_dict, load_kohya, save_kohya

__all__ = ["DiffusionLoraConfig", "add_adapter", "components_of", "family_of", "kohya_state_dict",
           "load_kohya", "save_kohya"]
