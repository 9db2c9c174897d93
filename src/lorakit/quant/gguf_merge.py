"""Merge a LoRA adapter into its base GGUF and write a GGUF model that llama.cpp (and transformers'
``gguf_file=`` loading) reads like the original.

    base.gguf + adapter/ ──► merged.gguf
      metadata   every key of the base copied as is (hyper-parameters, tokenizer, chat template)
      adapted    W' = dequantize(W) + Σ ΔW  (fp32, transformers' layout; ΔW from the core's one delta
                 formula, ``LoraLayer.delta``), put back in the file's layout (Llama's q/k row
                 permutation, the same ``qk_row_order`` the adapter export applies) and written as
                 F16 (default), F32 (exact), or requantized to the base tensor's own type ("keep")
      the rest   its bytes copied unchanged (same type, same values)

The requantizers are ``gguf.quants.quantize`` (llama.cpp's reference arithmetic), which has Q4_0,
Q4_1 and Q8_0 (and the dense types) but no K-quants, so "keep" refuses a Q4_K/Q6_K adapted tensor
before anything is written (write F16 and run llama.cpp's ``llama-quantize`` instead). A lossy
output (F16, keep) comes with a ``RequantReport``: per written tensor, the relative output error
‖x W_wᵀ − x W'ᵀ‖ / ‖x W'ᵀ‖ on x ~ N(0, 1), W_w the written weight read back — the measure the
QLoRA requantized merge reports.

The file is streamed: the tensor table is planned first (names, shapes, types), then each merged
weight is computed, written and dropped, so peak memory is the packed model plus one fp32 weight.
It is written atomically (``lorakit._fs.atomic_write``): a failure leaves no partial file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._fs import atomic_write, atomic_write_json, check_output_file
from ..errors import ConfigError, QuantizationError
from ..io import load_adapter, read_adapter_config
from ..layers.host import LoraLayer
from ..state import lora_layers, trainable_copies
from .gguf_codecs import DENSE, FORMATS, dequantize
from .gguf_export import _adapter_model_type, adapter_files
from .gguf_load import load_gguf
from .gguf_read import GGUFFile, arch_for_model_type, qk_row_order, supported_model_types
from .linear import QuantLinear
from .merge import RequantReport

OUT_TYPES = ("f16", "f32", "keep")
#: Types "keep" can write again: what gguf.quants.quantize implements among those lorakit reads.
REQUANTIZABLE = ("Q4_0", "Q4_1", "Q8_0", "F32", "F16", "BF16")
_SKIPPED_KEYS = ("GGUF.", "general.architecture")  # the writer sets these itself


@dataclass
class GGUFMergeResult:
    path: Path
    written: dict[str, str] = field(default_factory=dict)  # merged GGUF tensor name → type written
    report: RequantReport | None = None  # None for F32 (exact)


@dataclass
class _Plan:
    """One tensor of the output: copied from the base (``host`` None) or merged from ``host``."""

    name: str
    qtype: str  # GGML type name written
    shape: tuple[int, ...]  # numpy order: (rows, cols) or the base's own data shape
    nbytes: int
    host: LoraLayer | None = None
    dense: torch.Tensor | None = None  # a changed 1-D tensor (trained bias), written F32


def base_gguf(adapter: str | os.PathLike, base: str | os.PathLike | None) -> Path:
    """The GGUF file to merge into: ``base``, else the adapter's ``base_model_name_or_path``."""
    given = base is not None
    base = base if given else read_adapter_config(adapter).get("base_model_name_or_path")
    path = Path(base).expanduser() if base else None
    if path is None or path.suffix.lower() != ".gguf" or not path.is_file():
        where = "--model" if given else f"{adapter}'s base_model_name_or_path"
        raise ConfigError(
            f"merge --format gguf needs the base model's .gguf file, but {where} is {str(base)!r}"
            + ("" if path is None or path.suffix.lower() != ".gguf" else " (no such file)")
            + ". Pass --model path/to/model.gguf (the GGUF the adapter was trained on), or drop --format gguf "
            "to write a transformers checkpoint."
        )
    return path


def merge_gguf(adapter: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
               out_type: str = "f16", n_inputs: int = 64, seed: int = 0) -> GGUFMergeResult:
    """Merge ``adapter`` into the GGUF ``base`` (default: the adapter's recorded base) and write the
    merged model to ``out``. ``out_type``: "f16" (default; llama.cpp's converter default), "f32"
    (exact) or "keep" (each adapted tensor requantized to its base type; Q4_0/Q4_1/Q8_0/dense only)."""
    if out_type not in OUT_TYPES:
        raise ConfigError(f"out_type={out_type!r}: use one of {', '.join(OUT_TYPES)}.")
    path = base_gguf(adapter, base)
    out = check_output_file(out, [path, *adapter_files(adapter)], "merge --out")
    f = GGUFFile(path)
    try:
        spec = f.require_supported()
        _check_architecture(adapter, f, spec)
    finally:
        f.close()
    model = load_gguf(path, keep_quantized=True)  # packed: ≈ the file's size in memory
    load_adapter(model, adapter)
    copies = [p for p, _ in trainable_copies(model)]
    if copies:
        raise ConfigError(
            f"{adapter}: modules_to_save {copies[:4]} are not merged into a GGUF by lorakit; merge to a "
            "transformers checkpoint (lorakit merge without --format gguf) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    f = GGUFFile(path)
    try:
        plan = _plan(f, model, adapter, out_type)
        result = GGUFMergeResult(Path(out), {p.name: p.qtype for p in plan if p.host is not None},
                                 None if out_type == "f32" else RequantReport())
        gen = torch.Generator().manual_seed(seed)
        atomic_write(out, lambda tmp: _write(tmp, f, plan, result.report, n_inputs, gen))
    finally:
        f.close()
    if result.report is not None and result.report.per_layer:
        atomic_write_json(report_path(result.path), {"out_type": out_type, "mean": result.report.mean,
                                                     "max": result.report.max, "per_tensor": result.report.per_layer})
    else:  # an exact merge: a report left by an earlier lossy merge to the same path would mislead
        report_path(result.path).unlink(missing_ok=True)
    return result


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".requant.json")


def _check_architecture(adapter, f: GGUFFile, spec) -> None:
    model_type = _adapter_model_type(read_adapter_config(adapter), Path(adapter), f)
    if model_type is not None and model_type not in spec.model_types:
        target = arch_for_model_type(model_type)
        raise ConfigError(
            f"{adapter} was trained on a {model_type!r} model, but {f.path} is a GGUF of architecture "
            f"{f.architecture!r}" + (f" (a {model_type} model's GGUF architecture is {target.gguf_arch!r})" if target
                                     else f"; lorakit merges adapters of {', '.join(supported_model_types())}")
            + ". Pass --model with the GGUF file of the adapter's own base model."
        )


def _plan(f: GGUFFile, model, adapter, out_type: str) -> list[_Plan]:
    hosts: dict[str, LoraLayer] = {}
    for path, host in lora_layers(model):
        name = f.gguf_name(path + ".weight")
        if name is None:
            raise ConfigError(
                f"{adapter}: module {path!r} has no tensor in a GGUF decoder (a classifier head?); a GGUF model "
                "cannot hold it. Merge to a transformers checkpoint instead (lorakit merge without --format gguf)."
            )
        if not isinstance(host.base_layer, (QuantLinear, torch.nn.Linear)):
            raise ConfigError(f"{adapter}: module {path!r} wraps a {type(host.base_layer).__name__}; merge --format "
                              "gguf merges LoRA on linear layers only.")
        hosts[name] = host
    plan = []
    for name in f.names():
        t = f.raw(name)
        qtype = t.tensor_type.name
        if name in hosts:
            plan.append(_merged_plan(f, name, qtype, hosts.pop(name), out_type))
            continue
        changed = _changed_dense(f, model, name, qtype)
        if changed is not None:
            plan.append(_Plan(name, "F32", tuple(changed.shape), changed.numel() * 4, dense=changed))
        else:
            plan.append(_Plan(name, qtype, tuple(t.data.shape), int(t.data.nbytes)))
    for name, host in hosts.items():  # a tied head (no output.weight in the base) gets its own tensor
        if name != "output.weight":
            raise ConfigError(f"{adapter}: {name} is not in {f.path}; the adapter belongs to another model. "
                              "Pass --model with the GGUF of the adapter's own base model.")
        plan.append(_merged_plan(f, name, f.qtype("token_embd.weight"), host, out_type))
    return plan


def _merged_plan(f: GGUFFile, name: str, base_qtype: str, host: LoraLayer, out_type: str) -> _Plan:
    rows, cols = host.base_layer.out_features, host.base_layer.in_features
    qtype = {"f16": "F16", "f32": "F32"}.get(out_type, base_qtype)
    if qtype not in REQUANTIZABLE:
        raise QuantizationError(
            f"{f.path}: {name} is {base_qtype}, which gguf's quantizers cannot write (they have "
            f"{', '.join(REQUANTIZABLE)}); merge with --quant f16 (or f32) and re-quantize the result with "
            "llama.cpp's llama-quantize."
        )
    if qtype in FORMATS or qtype == "BF16":  # written as bytes: (rows, row bytes) uint8
        row_bytes = FORMATS[qtype].row_bytes(cols) if qtype in FORMATS else 2 * cols
        return _Plan(name, qtype, (rows, row_bytes), rows * row_bytes, host)
    return _Plan(name, qtype, (rows, cols), rows * cols * DENSE[qtype].itemsize, host)


def _changed_dense(f: GGUFFile, model, name: str, qtype: str) -> torch.Tensor | None:
    """A dense tensor of the base that the adapter changed (a trained bias), else None."""
    hf = f.hf_name(name)
    if qtype not in DENSE or hf is None or not hf.endswith(".bias"):
        return None
    module_path, _, attr = hf.rpartition(".")
    module = model.get_submodule(module_path)
    module = module.base_layer if isinstance(module, LoraLayer) else module
    current = getattr(module, attr, None)
    if not isinstance(current, torch.Tensor):
        return None
    current = current.detach().float()
    return None if torch.equal(current, f.dense(name, torch.float32)) else current


def _merged(f: GGUFFile, p: _Plan) -> torch.Tensor:
    """W' = dequantize(W) + Σ ΔW over the active adapters, (out, in) fp32, rows in the file's order."""
    base = p.host.base_layer
    w = base.qweight.dequantize(torch.float32) if isinstance(base, QuantLinear) else base.weight.detach().float().clone()
    for adapter_name in p.host.active:
        if adapter_name not in p.host.merged:
            w += p.host.delta(adapter_name)
    if f.spec.permute_qk and p.name.endswith((".attn_q.weight", ".attn_k.weight")):
        w = w[qk_row_order(w.shape[0], f.n_head if ".attn_q." in p.name else f.n_head_kv)]
    return w


def _encode(w: torch.Tensor, qtype: str, name: str) -> np.ndarray:
    """fp32 (rows, cols) → the numpy array written for ``qtype``."""
    import gguf

    x = w.numpy()
    if qtype == "F32":
        return np.ascontiguousarray(x)
    if qtype == "F16":
        out = x.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(x).all():
            raise QuantizationError(f"merged {name} overflows float16 (|w| > 65504); merge with --quant f32.")
        return out
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])


def _decode(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """What a reader gets back from ``raw`` (fp32), to measure the written error."""
    if qtype in FORMATS:
        return dequantize(qtype, torch.from_numpy(raw), shape)
    if qtype == "BF16":
        return torch.from_numpy(raw.view(np.uint16).astype(np.int32) << 16).view(torch.float32).reshape(shape)
    return torch.from_numpy(raw.astype(np.float32))


def _write(tmp: str, f: GGUFFile, plan: list[_Plan], report: RequantReport | None, n_inputs: int,
           gen: torch.Generator) -> None:
    import gguf

    w = gguf.GGUFWriter(tmp, f.architecture)
    _copy_metadata(f, w)
    for p in plan:
        if p.host is None and p.dense is None:  # copied: the base's own data shape and dtype
            t = f.raw(p.name)
            w.add_tensor_info(p.name, t.data.shape, t.data.dtype, p.nbytes, raw_dtype=t.tensor_type)
        elif p.qtype in FORMATS or p.qtype == "BF16":
            w.add_tensor_info(p.name, p.shape, np.dtype(np.uint8), p.nbytes, raw_dtype=gguf.GGMLQuantizationType[p.qtype])
        else:
            np_dtype = np.float16 if p.qtype == "F16" else np.float32
            w.add_tensor_info(p.name, p.shape, np.dtype(np_dtype), p.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in plan:
        if p.dense is not None:
            w.write_tensor_data(np.ascontiguousarray(p.dense.numpy()))
        elif p.host is None:
            w.write_tensor_data(f.raw(p.name).data)
        else:
            merged = _merged(f, p)
            raw = _encode(merged, p.qtype, p.name)
            if p.qtype == "BF16":
                raw = raw.view(np.uint8)
            w.write_tensor_data(raw)
            if report is not None and p.qtype != "F32":
                x = torch.randn(n_inputs, merged.shape[1], generator=gen)
                ref = x @ merged.T
                got = x @ _decode(raw, p.qtype, tuple(merged.shape)).T
                report.per_layer[p.name] = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
    w.close()


def _copy_metadata(f: GGUFFile, w) -> None:
    """Every key of the base, with its own value type (strings as raw bytes: exact round trip)."""
    from gguf import GGUFValueType as VT

    for key, fld in f.reader.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        if key == "general.alignment":
            w.add_custom_alignment(int(fld.contents()))
            continue
        main = fld.types[0]
        if main == VT.STRING:
            w.add_key_value(key, bytes(fld.parts[fld.data[0]]), VT.STRING)
        elif main == VT.ARRAY:
            sub = fld.types[-1]
            if len(fld.types) > 2:
                raise QuantizationError(f"{f.path}: metadata key {key} is a nested array, which lorakit cannot copy.")
            if not fld.data:
                continue  # gguf's writer refuses empty arrays; an empty list carries no information
            values = [bytes(fld.parts[i]) for i in fld.data] if sub == VT.STRING else fld.contents()
            w.add_key_value(key, values, VT.ARRAY, sub_type=sub)
        else:
            w.add_key_value(key, fld.contents(), main)
