"""loralib's API (github microsoft/LoRA) on lorakit: ``from lorakit import loralib as lora``.

    import lorakit.loralib as lora
    layer = lora.Linear(768, 768, r=8, lora_alpha=16)            # instead of nn.Linear
    qkv = lora.MergedLinear(768, 3 * 768, r=8, lora_alpha=16, enable_lora=[True, False, True])
    lora.mark_only_lora_as_trainable(model, bias="none")
    torch.save(lora.lora_state_dict(model), "lora.pt")          # loralib's checkpoint

    # an old loralib checkpoint into a transformers model, then PEFT's format:
    lora.load_lora_state_dict(hf_model, "lora.pt", lora_alpha=16)
    lorakit.save_adapter(hf_model, "adapter/")

Same names, state-dict keys and maths as loralib; the differences (no merge on ``.eval()``, explicit
``merge()``, trainables found by type, conv factors in PEFT's layout) are listed in docs/LORALIB.md.
"""

from .checkpoint import load_lora_state_dict, read_checkpoint, save_lora_state_dict
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .utils import lora_state_dict, mark_only_lora_as_trainable

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "load_lora_state_dict",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "read_checkpoint",
    "save_lora_state_dict",
]
