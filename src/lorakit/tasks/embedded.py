"""Where the shipped base model lives, and how to load it.

``src/lorakit/assets/tiny-base/`` holds a tiny ``LlamaForCausalLM`` pretrained by
``scripts/train_embedded_base.py`` on the base tasks, its character tokenizer, and
``lorakit_tasks.json`` (which tasks are base tasks, the prompt format version, training figures).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .format import PROMPT_FORMAT_VERSION

EMBEDDED_NAME = "tiny-base"
MANIFEST = "lorakit_tasks.json"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST)


def embedded_model_dir(check: bool = True) -> Path:
    """The shipped checkpoint's directory; with ``check``, fail unless all its files are there."""
    root = resources.files("lorakit") / "assets" / EMBEDDED_NAME
    path = Path(str(root))
    if check:
        missing = [f for f in _FILES if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"the embedded model in {path} is missing {', '.join(missing)}; "
                "re-create it with `python scripts/train_embedded_base.py` or reinstall lorakit"
            )
    return path


def embedded_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The checkpoint's ``lorakit_tasks.json``: ``base_tasks``, ``new_tasks``, ``default_task``, ..."""
    path = Path(path) if path is not None else embedded_model_dir()
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("prompt_format_version") != PROMPT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path / MANIFEST} was trained with prompt format version "
            f"{manifest.get('prompt_format_version')!r} but this lorakit formats prompts as version "
            f"{PROMPT_FORMAT_VERSION}; re-train it with `python scripts/train_embedded_base.py`"
        )
    return manifest


def load_embedded(dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the shipped checkpoint, loaded offline with transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer
