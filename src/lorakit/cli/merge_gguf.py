"""``lorakit merge --format gguf``: the adapter merged into its base GGUF, written as a GGUF model
(llama.cpp, Ollama, LM Studio load it; see ``lorakit.quant.gguf_merge``).

    lorakit merge --adapter runs/default/adapter --format gguf --out merged.gguf [--model BASE.gguf]
                  [--quant f16|f32|keep]

``--out`` is the file (a path without ``.gguf`` is a directory that receives ``model.gguf``).
``--quant``: F16 (default), F32 (exact), or ``keep`` — each merged tensor requantized to its base
type (``--requantize`` means the same), with the added error printed and written next to the file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

QUANTS = ("f16", "f32", "keep")


def merge_gguf_command(adapter: str, out: str, model: str | None, quant: str | None, requantize: bool,
                       dtype: str | None) -> int:
    from ..quant.gguf_merge import merge_gguf, report_path

    if dtype is not None:
        raise ConfigError(f"--dtype {dtype} is for transformers checkpoints; with --format gguf choose the tensor "
                          f"type with --quant ({', '.join(QUANTS)}).")
    if requantize and quant not in (None, "keep"):
        raise ConfigError(f"--requantize means --quant keep; it contradicts --quant {quant}. Pass one of them.")
    quant = "keep" if requantize else (quant or "f16")
    target = Path(out)
    if target.suffix.lower() != ".gguf":
        target = target / "model.gguf"
    result = merge_gguf(adapter, target, model, out_type=quant)
    kinds = sorted(set(result.written.values()))
    print(f"merged {adapter} into its base GGUF: {len(result.written)} tensors written as {', '.join(kinds)}, "
          f"the rest copied; saved {result.path} (use: llama-cli -m {result.path})")
    if result.report is not None and result.report.per_layer:
        rep = result.report
        print(f"{'requantized' if quant == 'keep' else 'F16'} merge of {len(rep.per_layer)} tensors: relative output "
              f"error vs the fp32 merge mean {rep.mean:.4g}, max {rep.max:.4g} (per tensor in {report_path(result.path)})")
    return 0
