"""Everything a run needs before its first step: data, model, method, optimizer, eval tasks.

Kept apart from ``loop.py`` so that the loop reads top to bottom; nothing here trains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import tasks
from ..data.encode import Encoded, encode, label_mapping
from ..data.files import RawData, read_data
from ..data.formats import split_eval
from ..errors import ConfigError, LorakitError
from ..tasks import DEFAULT_TASK, embedded_manifest
from . import methods
from .args import BUILTIN_PREFIX, SELF, TrainArgs
from .checkpoint import list_checkpoints
from .gguf_model import check_gguf_task, is_gguf
from .model import LoadedModel, load_model, model_dir
from .outdir import clear_previous_run


@dataclass
class RunData:
    train: Encoded
    eval: Encoded | None
    label2id: dict[str, int] | None
    probe: Encoded | None = None  # the forgetting probe's rows (base model's own prompts and answers)
    raw_train: RawData | None = None  # the rows as read: prompts and references for generation (gen_eval.py)
    raw_eval: RawData | None = None


@dataclass
class EvalTasks:
    new: list[str] = field(default_factory=list)  # what the run teaches (learning)
    base: list[str] = field(default_factory=list)  # what the base model knew (forgetting)

    @property
    def all(self) -> list[str]:
        return self.new + [t for t in self.base if t not in self.new]


def resolve_defaults(args: TrainArgs) -> TrainArgs:
    """Fill what the arguments leave open: the default data of the embedded model."""
    if args.data is None:
        if args.model is not None:
            raise ConfigError("--data is required with --model: pass a .jsonl/.csv/.parquet file or builtin:TASK.")

        task = embedded_manifest().get("default_task", DEFAULT_TASK)
        args = args.replace(data=f"{BUILTIN_PREFIX}{task}")
    if args.eval_data is None and args.builtin_task is not None:
        args = args.replace(eval_data=args.data)
    return args


def has_eval_data(args: TrainArgs) -> bool:
    """Whether a run with ``args`` (after :func:`resolve_defaults`) evaluates on some rows: ``eval_split``
    of the training file, or ``eval_data`` (a built-in task's eval split unless ``eval_rows=0``)."""
    if args.eval_split and args.eval_data is None:
        return True
    return args.eval_data is not None and not (args.eval_builtin_task and args.eval_rows == 0)


def check_eval_settings(args: TrainArgs) -> None:
    """Settings that evaluate during training need eval data: refused before the run loads or writes
    anything. ``eval_every`` without eval data used to run no evaluation at all, silently — an error, not a
    warning, because the user asked for evaluations (as ``save_best`` / ``early_stopping_patience`` do)."""
    if has_eval_data(args):
        return
    why = (f"eval_rows=0 turns off the eval split of {args.eval_data}" if args.eval_data is not None
           else f"data={args.data} is a file and neither eval_data nor eval_split is set")
    for name in ("early_stopping_patience", "save_best"):
        if getattr(args, name):
            raise ConfigError(f"{name} needs eval data; give eval_data or eval_split ({why}).")
    if args.eval_every:
        raise ConfigError(f"eval_every={args.eval_every} evaluates the eval data during training, but this run has "
                          f"none ({why}); give eval_data=FILE or eval_split=0.05, or drop eval_every.")


def check_output_dir(args: TrainArgs) -> Path:
    """Refuse to mix two runs in one directory; ``overwrite`` clears the old one first."""
    out = Path(args.output_dir)
    previous = list_checkpoints(out / "checkpoints") + [p for p in (out / "metrics.json",) if p.exists()]
    if previous and args.resume is None:
        if not args.overwrite:
            raise ConfigError(
                f"{out} already holds a run ({previous[-1].name}). Continue it with --resume auto, start over "
                "with --overwrite, or pick another --output-dir."
            )
        clear_previous_run(out)  # every artifact (adapter, labels, TensorBoard, …), moved aside then deleted
    return out


def load_data(args: TrainArgs, model_config_label2id: dict[str, int] | None = None) -> tuple[RawData, RawData | None]:
    train = read_data(args.data, args.data_format, "train", args.builtin_rows, args.seed, args.columns)
    if args.eval_split and args.eval_data is None:  # a seeded validation split of the training file
        rows, held = split_eval(train.rows, args.eval_split, args.seed, train.source)
        train, held_out = RawData(rows, train.format, train.source), RawData(held, train.format,
                                                                             f"{train.source} (eval_split)")
        return (with_replay(train, args) if args.replay > 0 and args.replay_data != SELF else train), held_out
    if args.replay > 0 and args.replay_data != SELF:  # self-replay needs the model: see with_self_replay
        train = with_replay(train, args)
    evaluation = None
    if args.eval_data is not None and not (args.eval_builtin_task and args.eval_rows == 0):  # eval_rows=0: off
        n = args.eval_rows if args.eval_builtin_task else args.builtin_rows
        evaluation = read_data(args.eval_data, args.data_format, "eval", n, args.seed, args.columns)
        if evaluation.format != train.format:
            raise ConfigError(f"eval data {evaluation.source} has {evaluation.format} rows but the training data "
                              f"{train.source} has {train.format} rows; give both the same format.")
    return train, evaluation


def prepare_model_and_data(args: TrainArgs) -> tuple[TrainArgs, LoadedModel, RunData]:
    raw_train, raw_eval = load_data(args)
    label2id = None
    if raw_train.format == "classification":
        from transformers import AutoConfig

        path, _ = model_dir(args.model)
        if is_gguf(path):
            check_gguf_task(path, "seq-cls")
        cfg_l2i = getattr(AutoConfig.from_pretrained(path, local_files_only=True), "label2id", None)
        rows = raw_train.rows + (raw_eval.rows if raw_eval else [])
        label2id = label_mapping(rows, cfg_l2i)
    loaded = load_model(args, raw_train.format, label2id)
    args = args.replace(task=loaded.task)
    raw_train, raw_probe = with_self_replay(raw_train, loaded, args)
    if loaded.task == "seq-cls" and args.modules_to_save is None and args.method != "full":
        args = args.replace(modules_to_save=classifier_head(loaded.model))
    system = None if args.system_prompt == "auto" else args.system_prompt
    train = encode(raw_train, loaded.tokenizer, args.max_length, label2id, args.packing, system)
    evaluation = encode(raw_eval, loaded.tokenizer, args.max_length, label2id, False, system) if raw_eval else None
    probe = encode(raw_probe, loaded.tokenizer, args.max_length, None, False, system) if raw_probe else None
    return args, loaded, RunData(train, evaluation, label2id, probe, raw_train, raw_eval)


def with_self_replay(train: RawData, loaded: LoadedModel, args: TrainArgs) -> tuple[RawData, RawData | None]:
    """``replay_data=self`` and the forgetting probe: the base model writes prompts and answers them
    (``variants/self_replay.py``) before any training; ``probe_rows`` of them are held out for the probe,
    the rest are mixed in so they make up ``replay`` of the training rows."""
    replay = args.replay > 0 and args.replay_data == SELF
    if not replay and not args.probe_every:
        return train, None
    if loaded.task != "causal-lm":
        raise ConfigError("replay_data=self and the forgetting probe need a causal (chat) LM; this run trains "
                          f"a {loaded.task} model. Use replay_data=FILE, and probe_every=0.")
    from ..variants.self_replay import self_replay_rows

    fmt = train.format if replay else ("chat" if train.format not in ("chat", "instruction") else train.format)
    rows = self_replay_rows(loaded.model, loaded.tokenizer, args.self_replay_prompts, fmt, seed=args.seed)
    n_probe = min(args.probe_rows, len(rows) - (1 if replay else 0)) if args.probe_every else 0
    probe = RawData(rows[:n_probe], fmt, "self-written probe prompts") if n_probe > 0 else None
    if not replay:
        return train, probe
    pool = rows[n_probe:]
    n = max(1, round(len(train.rows) * args.replay / (1.0 - args.replay)))
    g = random.Random(args.seed + 11)
    picked = [pool[g.randrange(len(pool))] for _ in range(n)] if len(pool) < n else g.sample(pool, n)
    return RawData(train.rows + picked, train.format,
                   f"{train.source} + {n:,} replayed (self-written, {len(pool)} prompts)"), probe


def classifier_head(model) -> list[str] | None:
    """The classification head's name (``score`` in Llama-likes, ``classifier`` in BERT-likes)."""
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return [name]
    return None


def build_method(model, args: TrainArgs) -> methods.MethodSetup:
    setup = methods.get(args.method)(model, args)
    if not any(p.requires_grad for p in setup.model.parameters()):
        raise ConfigError(f"method {args.method!r} left no parameter trainable; check target_modules.")
    return setup


def build_optimizer(setup: methods.MethodSetup, args: TrainArgs) -> torch.optim.Optimizer:
    groups = setup.param_groups
    if groups is None:
        trainable = [p for p in setup.model.parameters() if p.requires_grad]
        groups = [{"params": trainable, "name": "trainable"}]
    if args.optim == "adamw8bit":  # blockwise 8-bit moments (Dettmers et al. 2022); docs/QUANT.md
        from ..quant.optim import Adam8bit

        return Adam8bit(groups, lr=args.lr, weight_decay=args.weight_decay, offload_state=args.offload_optimizer)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def eval_tasks(args: TrainArgs, loaded: LoadedModel) -> EvalTasks:
    """Built-in tasks to score: ``eval_tasks`` if given, else the data's task and the model's base tasks."""

    if loaded.task != "causal-lm":
        return EvalTasks()
    if args.eval_tasks is not None:
        for name in args.eval_tasks:
            tasks.get(name)  # ConfigError on a typo
        base = set(tasks.names("base"))
        return EvalTasks([t for t in args.eval_tasks if t not in base], [t for t in args.eval_tasks if t in base])
    new = [args.builtin_task] if args.builtin_task else []
    base: list[str] = []
    if (loaded.path / "lorakit_tasks.json").is_file():
        try:
            base = list(tasks.embedded_manifest(loaded.path).get("base_tasks", []))
        except (LorakitError, ValueError, OSError, AttributeError):
            base = []  # another prompt-format version (its tasks would score wrong), or not lorakit's manifest
    return EvalTasks(new, [t for t in base if t not in new])


def with_replay(train: RawData, args: TrainArgs) -> RawData:
    """Mix in replayed rows so they make up ``args.replay`` of the result (rehearsal: the simplest
    guard against forgetting). Replay rows come from ``replay_data`` or, for the embedded model, from
    its base tasks in equal parts; they are drawn with the run's seed and must have the same format."""
    n = max(1, round(len(train.rows) * args.replay / (1.0 - args.replay)))
    if args.replay_data is not None:
        sources = [args.replay_data]
    elif args.model is None:
        sources = [f"{BUILTIN_PREFIX}{t}" for t in embedded_manifest().get("base_tasks", [])]
    else:
        raise ConfigError(f"replay={args.replay} needs replay_data=FILE (rows of the tasks to keep) with --model; "
                          "only the embedded model knows its own base tasks.")
    if not sources:
        raise ConfigError("replay: the embedded model lists no base tasks; pass replay_data=FILE.")
    rows: list[dict[str, Any]] = []
    for i, spec in enumerate(sources):
        share = n // len(sources) + (1 if i < n % len(sources) else 0)
        data = read_data(spec, args.data_format, "train", max(share, 1), args.seed + 1)
        if data.format != train.format:
            raise ConfigError(f"replay data {data.source} has {data.format} rows but the training data "
                              f"{train.source} has {train.format} rows; replay rows of the same format.")
        g = random.Random(args.seed + 7 + i)
        rows += [data.rows[g.randrange(len(data.rows))] for _ in range(share)] if len(data.rows) < share \
            else g.sample(data.rows, share)
    label = ", ".join(s.removeprefix(BUILTIN_PREFIX) for s in sources)
    return RawData(train.rows + rows, train.format, f"{train.source} + {len(rows):,} replayed ({label})")


def fingerprint(args: TrainArgs, world_size: int) -> dict[str, Any]:
    """Settings a checkpoint must agree with to resume (data order, shapes, method)."""
    keys = ("model", "data", "method", "method_options", "r", "lora_alpha", "target_modules", "exclude_modules",
            "modules_to_save", "use_rslora", "use_dora", "seed", "batch_size", "grad_accum", "max_length", "packing",
            "builtin_rows", "task", "quant", "replay", "replay_data", "self_replay_prompts", "probe_every",
            "probe_rows")
    fp = {k: getattr(args, k) for k in keys}
    if args.quant != "none" or args.optim != "adamw":  # only then: older checkpoints keep resuming
        fp.update({k: getattr(args, k) for k in ("double_quant", "quant_skip", "quant_modules", "optim")})
    fp["world_size"] = world_size
    # Settings that change which rows train (or, quant_head, the frozen head's dtype and so every loss),
    # recorded only when set, so older checkpoints still resume.
    for key, off in (("eval_split", 0.0), ("columns", {}), ("system_prompt", "auto"), ("quant_head", "bf16"),
                     ("init_lora_weights", True), ("layers_to_transform", None), ("layers_pattern", None),
                     ("rank_pattern", {}), ("alpha_pattern", {})):
        if getattr(args, key) != off:
            fp[key] = getattr(args, key)
    return fp
