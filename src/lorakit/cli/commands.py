"""The commands around training: ``eval``, ``merge``, ``generate``, ``info``. Each is a typed function
that returns what it printed as data, so tests and notebooks call them directly; ``app.py`` only
parses arguments. Loading a base + adapter for inference is train's (``train/inference.py``): eval's
forgetting harness uses it too, and eval sits below cli.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._fs import atomic_dir
from ..adapter_kinds import kind_for_file
from ..adapters import disabled, merge_and_unload
from ..data.encode import encode, label_mapping
from ..data.files import BUILTIN_PREFIX, read_data
from ..errors import AdapterFileError, ConfigError, OutputError
from ..io import read_adapter_config, read_adapter_weights
from ..train.gen_eval import GenerationEval, reference_prompts
from ..train.generation import Generator
from ..train.inference import LABELS_FILE, base_of, load_for_inference
from ..train.metrics import evaluate_loss
from ..train.scoring import check_scorer_spec, load_scorer
from ..train.task_eval import evaluate_task


# -- eval -------------------------------------------------------------------------------------------
def evaluate(data: str, adapter: str | None = None, model: str | None = None, max_length: int = 512,
             batch_size: int = 16, eval_rows: int = 200, seed: int = 0, scorer: str = "exact",
             generate_rows: int = 32, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Loss / perplexity / accuracy of the base model and (with ``adapter``) the adapted one; on a file whose
    rows have reference answers, also the generation score (``scorer``, on ``generate_rows`` rows)."""
    def count(v, low: int) -> bool:  # an int ≥ low ("8" was a TypeError in the comparison)
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not (count(batch_size, 1) and count(max_length, 1)):  # before the model loads (0 divides by zero)
        raise ConfigError(f"batch_size={batch_size!r} / max_length={max_length!r}: both must be integers ≥ 1.")
    if not count(eval_rows, 1):  # 0: encode got no rows
        raise ConfigError(f"eval_rows={eval_rows!r} (--eval-rows): must be an integer ≥ 1, the rows drawn from a "
                          "built-in task (default 200).")
    if not count(generate_rows, 0) or (max_new_tokens is not None and not count(max_new_tokens, 1)):
        raise ConfigError(f"generate_rows={generate_rows} / max_new_tokens={max_new_tokens}: need generate_rows ≥ 0 "
                          "(0 = no generation) and max_new_tokens ≥ 1.")
    check_scorer_spec(scorer)
    loaded_scorer = load_scorer(scorer)  # a bad scorer fails before the model loads
    net, tokenizer, task = load_for_inference(model, adapter)
    raw = read_data(data, "auto", "eval", eval_rows, seed)
    label2id = None
    if raw.format == "classification":
        label2id = {str(k): int(v) for k, v in (net.config.label2id or {}).items()} or label_mapping(raw.rows)
    encoded = encode(raw, tokenizer, max_length, label2id)
    builtin = data[len(BUILTIN_PREFIX):] if data.startswith(BUILTIN_PREFIX) else None
    gen = None
    if task == "causal-lm" and not builtin and generate_rows > 0:
        prompts = reference_prompts(raw, tokenizer, None, max_length, generate_rows)
        gen = GenerationEval(prompts, loaded_scorer, tokenizer, max_new_tokens, batch_size) if prompts else None

    def score() -> dict[str, Any]:
        result = {"loss": evaluate_loss(net, encoded.examples, tokenizer.pad_token_id, batch_size).to_dict()}
        if builtin and task == "causal-lm":
            result["exact_match"] = evaluate_task(net, tokenizer, builtin, n=eval_rows).accuracy
        if gen is not None:
            result["score"] = {**gen.run(net).to_dict(), "how": gen.describe()}
        return result

    out: dict[str, Any] = {"data": encoded.counts()}
    if adapter is not None:
        with disabled(net):
            out["base"] = score()
        out["adapter"] = score()
    else:
        out["base"] = score()
    return out


def format_eval(result: dict[str, Any]) -> list[str]:
    d = result["data"]
    how = next((result[k]["score"]["how"] for k in ("base", "adapter") if "score" in result.get(k, {})), None)
    lines = [f"data: {d['source']}: {d['rows']} rows, {d['truncated']} truncated, {sum(d['dropped'].values())} dropped",
             f"{'':10}{'loss':>10}{'perplexity':>12}{'accuracy':>10}{'score' if how else 'exact match':>13}"]
    for name in ("base", "adapter"):
        if name in result:
            r, loss = result[name], result[name]["loss"]
            ppl = f"{loss['perplexity']:.3f}" if loss["perplexity"] is not None else "-"
            em = f"{100 * r['exact_match']:.1f}%" if "exact_match" in r else \
                f"{100 * r['score']['score']:.1f}%" if "score" in r else "-"
            lines.append(f"{name:10}{loss['loss']:>10.4f}{ppl:>12}{100 * loss['accuracy']:>9.1f}%{em:>13}")
    if how:
        lines.append(f"score: {how}")
    return lines


# -- merge ------------------------------------------------------------------------------------------
MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge(adapter: str, out: str, model: str | None = None, requantize: bool = False,
          dtype: str | None = None) -> Path:
    """Merge ``adapter`` into its base and save a dense transformers checkpoint (+ tokenizer) to ``out``.

    A QLoRA adapter (``lorakit_quant.json``) merges into the dequantized base it was trained on
    (``merge_qlora.py``); ``requantize`` quantizes the merged weights again and reports the error.
    The merge is computed in the loaded precision; ``dtype`` (fp32, bf16, fp16) casts the result."""
    from ..quant.load_qlora import read_qlora_record

    check_merge_out(out, adapter, base_of(adapter, model))
    record = read_qlora_record(adapter)
    if record is not None:
        from ..train.merge_qlora import merge_qlora

        path, report = merge_qlora(adapter, out, base_of(adapter, model), record, requantize, LABELS_FILE)
        if report is not None:
            print(f"{report} (vs the dequantized merge; per layer in {path}/lorakit_requant_report.json)")
        return path
    if requantize:
        raise ConfigError(f"--requantize applies to QLoRA adapters; {adapter} was trained on a 16/32-bit base "
                          "(no lorakit_quant.json next to it). Drop --requantize.")

    if dtype is not None and dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(MERGE_DTYPES)}.")
    net, tokenizer, _ = load_for_inference(model, adapter)
    net = merge_and_unload(net)
    if dtype is not None:
        net = net.to(MERGE_DTYPES[dtype])
        net.config.dtype = MERGE_DTYPES[dtype]  # written to config.json, read back by from_pretrained
    path = Path(out)
    with atomic_dir(path) as tmp:  # a kill mid-save leaves the previous --out (or none), never half a model
        net.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


def check_merge_out(out: str, adapter: str, model: str | None) -> None:
    """``--out`` is replaced as a whole (atomically): it must not be the adapter or the base model (nor
    inside them, nor hold them), nor a directory of other files. An earlier merge's output may be replaced."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ConfigError(f"--out {out!r}: give the directory to write the merged model to.")
    path = Path(out).resolve()
    for flag, src in (("--adapter", adapter), ("--model", model)):
        if src is None:
            continue
        src = Path(src).resolve()
        if path == src or src in path.parents or path in src.parents:
            raise OutputError(f"--out {out}: overlaps {flag} {src}; merge replaces --out as a whole, so it would "
                              "destroy the input. Pass a new directory, e.g. --out merged-model.")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise OutputError(f"--out {out}: a non-empty directory that is not a model checkpoint (no config.json); "
                          "merge replaces --out as a whole. Pass a new or empty directory.")


# -- generate -----------------------------------------------------------------------------------------
def generator(adapter: str | None = None, model: str | None = None, max_new_tokens: int = 64,
              temperature: float = 0.0, chat: bool = False, system: str | None = None, seed: int = 0) -> Generator:
    """A loaded model that continues prompts (``--file`` and ``--interactive`` load it once)."""
    net, tokenizer, task = load_for_inference(model, adapter)
    if task != "causal-lm":
        raise ConfigError("generate needs a causal LM; this adapter's model is a sequence classifier "
                          "(use lorakit eval).")
    return Generator(net, tokenizer, max_new_tokens, temperature, chat, system, seed)


def generate(prompt: str, adapter: str | None = None, model: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, chat: bool = False, seed: int = 0, system: str | None = None) -> str:
    """The model's continuation of ``prompt`` (greedy unless ``temperature`` > 0); ``system`` implies chat."""
    return generator(adapter, model, max_new_tokens, temperature, chat, system, seed)(prompt)


# -- info ---------------------------------------------------------------------------------------------
def info(adapter_dir: str) -> dict[str, Any]:
    """What an adapter directory holds: its config, ranks per module, tensor count and size."""
    config = read_adapter_config(adapter_dir)
    source = str(Path(adapter_dir) / "adapter_config.json")
    kind_for_file(config, source).config_from_file(config, source)  # a broken field is named, not printed as-is
    weights = read_adapter_weights(adapter_dir)
    ranks: dict[str, int] = {}
    for key, t in weights.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            ranks[module] = int(t.shape[0])
        elif key.endswith("lora_E"):  # AdaLoRA's singular values
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            ranks[module] = int(t.shape[0])
    if not weights:
        raise AdapterFileError(f"{adapter_dir}: the adapter file holds no tensors.")
    files = [p for p in Path(adapter_dir).iterdir() if p.is_file()]
    return {
        "path": str(adapter_dir),
        "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "ranks": ranks,
        "tensors": len(weights),
        "parameters": sum(t.numel() for t in weights.values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()}),
        "file_bytes": sum(p.stat().st_size for p in files),
        "config": config,
    }


def format_info(data: dict[str, Any]) -> list[str]:
    by_rank: dict[int, int] = {}
    for r in data["ranks"].values():
        by_rank[r] = by_rank.get(r, 0) + 1
    ranks = ", ".join(f"r={r} × {n} modules" for r, n in sorted(by_rank.items())) or "-"
    return [
        f"adapter      {data['path']}",
        f"type         {data['peft_type']} ({data['task_type'] or 'no task type'})",
        f"base model   {data['base_model']}",
        f"r / alpha    {data['r']} / {data['lora_alpha']}",
        f"targets      {data['target_modules']}",
        f"full copies  {data['modules_to_save'] or '-'}",
        f"ranks        {ranks}",
        f"tensors      {data['tensors']} ({data['parameters']:,} parameters, {', '.join(data['dtypes'])}, "
        f"{data['tensor_bytes'] / 1024:,.1f} KiB; files {data['file_bytes'] / 1024:,.1f} KiB)",
    ]
