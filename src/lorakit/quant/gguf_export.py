"""Write a LoRA adapter as a llama.cpp adapter GGUF (what ``llama-cli --lora FILE`` and
``llama_adapter_lora_init`` load).

The format (llama.cpp's ``convert_lora_to_gguf.py`` writes it, ``src/llama-adapter.cpp`` reads it):

    general.type = "adapter", adapter.type = "lora", general.architecture = the base's (must match)
    adapter.lora.alpha (f32): llama.cpp scales every pair by alpha / r (r = the pair's rank);
                              0 or absent means scale 1
    <base tensor name>.lora_a : A, numpy (r, in)   — ggml ne [in, r]: ne[0] equals the base's ne[0]
    <base tensor name>.lora_b : B, numpy (out, r)  — ggml ne [r, out]: ne[1] equals the base's ne[1]

Base tensor names come from the base GGUF (``gguf_read``); for the ``llama`` architecture the rows
of q and k are permuted in the base file, so B's rows of those two get the same permutation (A is
untouched: the permutation acts on outputs). One global alpha cannot express rank/alpha patterns
or rsLoRA's α/√r, so each module's own scale s is folded into B:  B' = B · s / (alpha / r).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._fs import atomic_write, check_output_file
from ..errors import AdapterFileError, ConfigError
from ..io import read_adapter_config, read_adapter_weights
from .gguf_read import ARCHS, GGUFFile, arch_for_model_type, qk_row_order, supported_model_types

PREFIX = "base_model.model."
OUT_TYPES = ("f32", "f16")


def _adapter_model_type(cfg: dict, adapter: Path, opened: GGUFFile | None = None) -> str | None:
    """The adapter's base architecture (transformers model_type) when the adapter says where its base is.
    ``opened``: a GGUF already open; when it is the recorded base it is not parsed again (a 49k-token
    vocabulary takes gguf's reader seconds)."""
    base = cfg.get("base_model_name_or_path")
    if not base:
        return None
    base_path = Path(base)
    if base_path.suffix == ".gguf" and base_path.is_file():
        if opened is not None and opened.path.resolve() == base_path.resolve():
            arch = opened.architecture
        else:
            f = GGUFFile(base_path)
            arch = f.architecture
            f.close()
        return ARCHS[arch].model_types[0] if arch in ARCHS else arch
    if (base_path / "config.json").is_file():
        return json.loads((base_path / "config.json").read_text()).get("model_type")
    return None


def _pairs(weights: dict[str, torch.Tensor], adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A (r, in), B (out, r)); anything that is not a plain LoRA pair is refused."""
    a, b, other = {}, {}, []
    for key, t in weights.items():
        k = key.removeprefix(PREFIX)
        if k.endswith(".lora_A.weight"):
            a[k[: -len(".lora_A.weight")]] = t
        elif k.endswith(".lora_B.weight"):
            b[k[: -len(".lora_B.weight")]] = t
        else:
            other.append(key)
    if other:
        raise ConfigError(
            f"{adapter}: tensors {other[:4]} are not LoRA A/B pairs (embedding LoRA, modules_to_save or trained "
            "biases); llama.cpp adapters hold only linear LoRA pairs. Merge this adapter instead "
            "(`lorakit merge --format gguf`), or train without modules_to_save/bias."
        )
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise AdapterFileError(f"{adapter}: modules {unpaired[:4]} have only one of lora_A / lora_B; the file is damaged.")
    return {m: (a[m], b[m]) for m in sorted(a)}


def gguf_adapter_tensors(adapter: str | os.PathLike, base: GGUFFile) -> tuple[dict[str, torch.Tensor], float]:
    """(GGUF tensor name → fp32 tensor, alpha) for the adapter directory ``adapter`` over ``base``."""
    from ..config import LoraConfig

    cfg_dict = read_adapter_config(adapter)  # a ConfigError for a non-path, before Path() raises TypeError
    adapter = Path(adapter)
    if cfg_dict.get("peft_type", "LORA") != "LORA" or cfg_dict.get("use_dora"):
        raise ConfigError(
            f"{adapter}: a {cfg_dict.get('peft_type')} adapter{' with DoRA' if cfg_dict.get('use_dora') else ''} has no "
            "llama.cpp adapter form (llama.cpp applies plain B·A pairs). Merge it into the model instead."
        )
    config = LoraConfig.from_peft_dict(cfg_dict, source=str(adapter / "adapter_config.json"))
    spec = base.require_supported()
    model_type = _adapter_model_type(cfg_dict, adapter, base)
    if model_type is not None and model_type not in spec.model_types:
        target = arch_for_model_type(model_type)
        raise ConfigError(
            f"{adapter} was trained on a {model_type!r} model, but {base.path} is a GGUF of architecture "
            f"{base.architecture!r}" + (f" (a {model_type} model's GGUF architecture is {target.gguf_arch!r})" if target else
                                        f"; lorakit exports adapters for {', '.join(supported_model_types())}")
            + ". Pass --base with the GGUF file of the adapter's own base model."
        )
    alpha = float(config.lora_alpha)
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in _pairs(read_adapter_weights(adapter), adapter).items():
        name = base.gguf_name(module + ".weight")
        if name is None or not base.has(name):
            raise ConfigError(
                f"{adapter}: module {module!r} has no tensor in {base.path}"
                + (f" (expected {name!r}; a tied output head has none)" if name else
                   " (it is not part of the GGUF decoder, e.g. a classifier head)")
                + ". llama.cpp cannot apply it: retrain without this target (target_modules / exclude_modules), "
                "or merge the adapter instead."
            )
        out_f, in_f = base.shape(name)[0], base.shape(name)[-1]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0:  # a 0-d A was an IndexError, rank 0 a ZeroDivisionError
            raise AdapterFileError(f"{adapter}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; a LoRA "
                                   "pair is A (r, in) and B (out, r) with r ≥ 1. The file is damaged; save it again.")
        r = a.shape[0]
        if a.shape[1] != in_f or b.shape != (out_f, r):
            raise ConfigError(
                f"{adapter}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but {name} in "
                f"{base.path} is ({out_f}, {in_f}); the adapter belongs to another model. Pass --base with the GGUF "
                "of the adapter's own base model."
            )
        b = b.to(torch.float32) * (config.scaling_for(module) / (alpha / r))  # fold the module's own scale
        if spec.permute_qk and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = base.n_head if ".attn_q." in name else base.n_head_kv
            b = b[qk_row_order(out_f, heads)]
        out[name + ".lora_a"] = a.to(torch.float32).contiguous()  # e.g. blk.0.attn_q.weight.lora_a
        out[name + ".lora_b"] = b.contiguous()
    if not out:
        raise ConfigError(f"{adapter}: the adapter holds no LoRA pairs; nothing to export.")
    return out, alpha


def adapter_files(adapter: str | os.PathLike) -> list[Path]:
    """The files of an adapter directory that an output path must never replace."""
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    return [Path(adapter) / n for n in names] if isinstance(adapter, (str, os.PathLike)) else []


def export_gguf_adapter(adapter: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike,
                        out_type: str = "f32") -> Path:
    """Write ``adapter`` (a PEFT/lorakit LoRA directory) as a llama.cpp LoRA GGUF at ``out`` for the
    base model GGUF ``base``; returns ``out``. ``out_type``: "f32" (exact) or "f16" (half the size)."""
    import gguf
    import numpy as np

    if out_type not in OUT_TYPES:
        raise ConfigError(f"out_type={out_type!r}: use one of {', '.join(OUT_TYPES)}.")
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ConfigError(f"out={out!r}: give the path of the .gguf file to write (str or Path).")
    if not isinstance(adapter, (str, os.PathLike)):
        raise ConfigError(f"adapter directory {adapter!r:.60}: must be a path (str or pathlib.Path), "
                          f"got a {type(adapter).__name__}.")
    inputs = [*adapter_files(adapter)] + ([base] if isinstance(base, (str, os.PathLike)) else [])
    out = check_output_file(out, inputs, "export --out")  # before the base is read: never the base itself
    f = GGUFFile(base)
    try:
        tensors, alpha = gguf_adapter_tensors(adapter, f)
        arch = f.architecture
    finally:
        f.close()
    dt = np.float32 if out_type == "f32" else np.float16
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        data = {name: t.numpy().astype(dt) for name, t in tensors.items()}
    overflow = [name for name, x in data.items() if not np.isfinite(x).all()]
    if overflow:  # written as inf before; the factors themselves are finite (the adapter loader checks)
        raise ConfigError(f"{adapter}: {', '.join(overflow[:4])} overflow float16 (|value| > 65504 after the module's "
                          "scale is folded into lora_b); export with --outtype f32.")

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(Path(adapter).name)
        for name, t in data.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(out, write)
    return out
