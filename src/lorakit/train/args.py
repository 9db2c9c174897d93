"""``TrainArgs``: every setting of ``lorakit train``, validated on construction.

This one dataclass is the source of truth for the command's flags (``--lr 1e-4``), the keys of a YAML
recipe (``lr: 1.0e-4``) and ``key=value`` overrides (``lr=1e-4``): ``options.py`` builds all three from
its fields, so they cannot drift apart. Each field's ``help`` is what ``lorakit train --help`` prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import LoraConfig
from ..data.files import BUILTIN_PREFIX
from ..errors import ConfigError
from ..validate import check_field_types, known_fields
from .early_stop import check_best_args
from .loggers_ext import LOGGERS
from .methods import METHODS
from .scoring import check_scorer_spec

SELF = "self"  # replay_data=self: the base model's own prompts and answers
#: The ``--method`` names: the keys of ``train.methods.METHODS``, the one table of methods (it does not
#: import this module, so ``method`` is checked against it on construction).
METHOD_NAMES = tuple(METHODS)
#: The methods whose adapter is a plain ``LoraConfig`` built from the run's LoRA settings.
WEIGHT_INIT_METHODS = ("lora", "loraplus")
#: The LyCORIS kinds, which take the run's r / lora_alpha / targets and the layer and pattern options.
LYCORIS_METHODS = ("loha", "lokr")


def _f(default: Any, help: str, *, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@known_fields
@dataclass
class TrainArgs:
    # -- what to train ---------------------------------------------------------------------------
    model: str | None = _f(None, "local transformers model directory or .gguf file (default: the embedded "
                                 "tiny-base)")
    data: str | None = _f(None, "training data: a .jsonl/.json/.csv/.parquet file or builtin:TASK "
                                "(default: builtin:<the embedded model's default task>)")
    eval_data: str | None = _f(None, "evaluation data, same forms as --data (default for builtin data: "
                                     "the task's eval split)")
    output_dir: str = _f("runs/default", "where the adapter, metrics.json, loss.png, logs and checkpoints go")
    task: Literal["auto", "causal-lm", "seq-cls"] = _f(
        "auto", "model head: causal-lm, seq-cls, or auto (from the model's architectures and the data)")
    data_format: Literal["auto", "text", "instruction", "chat", "completion", "sharegpt", "classification"] = _f(
        "auto", "row schema; auto picks it from the columns (messages / conversations / prompt+completion / "
                "instruction+output / text+label / text)")
    columns: dict[str, str] = _f(None, "map lorakit's fields to your file's columns, e.g. "
                                       "columns.instruction=question columns.output=answer", factory=dict)
    eval_split: float = _f(0.0, "hold out this fraction of the training rows (seeded) as eval data when no "
                                "eval_data is given, e.g. 0.05")
    system_prompt: str = _f("auto", "system turn for conversations rendered by a chat template that have none: "
                                     "auto = the template's own default, '' = an empty one, or the text to use")
    method: str = _f("lora", "fine-tuning method: lora, loraplus, full, adalora, olora, expand (LLaMA-Pro), "
                             "loha or lokr (LyCORIS; r and lora_alpha are theirs, method_options.decompose_both "
                             "/ decompose_factor for lokr)")
    method_options: dict[str, Any] = _f(None, "extra options for the method (YAML mapping, or "
                                              "method_options.KEY=VALUE)", factory=dict)
    # -- LoRA (names as in lorakit.LoraConfig) ----------------------------------------------------
    r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input")
    target_modules: list[str] | str = _f("all-linear", "modules to adapt: names (comma-separated), a regex, "
                                                       "or all-linear")
    exclude_modules: list[str] | None = _f(None, "modules removed from the targets (comma-separated)")
    modules_to_save: list[str] | None = _f(None, "modules trained in full next to the adapter "
                                                 "(default for seq-cls: the classification head)")
    use_rslora: bool = _f(False, "scale by alpha/sqrt(r) (rank-stabilized LoRA)")
    use_dora: bool = _f(False, "DoRA (Liu et al. 2024): a trained magnitude per output row times the LoRA-"
                               "updated direction (PEFT's use_dora)")
    init_lora_weights: bool | str = _f(True, "how the adapter starts (PEFT's init_lora_weights): true (B = 0), gaussian, "
                                         "pissa, pissa_niter_N or olora (the base keeps the residual; the saved "
                                         "adapter is converted to a rank-2r LoRA of the original weights)")
    layers_to_transform: list[int] | None = _f(None, "adapt only these layer indices (comma-separated, e.g. 0,1; "
                                                     "PEFT's layers_to_transform)")
    layers_pattern: list[str] | None = _f(None, "with layers_to_transform: the name of the layer list, e.g. layers "
                                                "(PEFT's layers_pattern; default: the first numbered path segment)")
    rank_pattern: dict[str, int] = _f(None, "per-module ranks, e.g. rank_pattern.mlp=16 (regex → r, PEFT's "
                                            "rank_pattern)", factory=dict)
    alpha_pattern: dict[str, float] = _f(None, "per-module alphas, e.g. alpha_pattern.mlp=32 (regex → alpha)",
                                         factory=dict)
    fused_slices: dict[str, Any] = _f(None, "LoRA on chosen slices of fused projections, e.g. "
                                            "fused_slices.c_attn=[true,false,true] (docs/LORALIB.md)", factory=dict)
    loraplus_ratio: float = _f(16.0, "LoRA+: B's learning rate = ratio x A's (method=loraplus)")
    loraplus_embedding_lr: float | None = _f(None, "LoRA+: learning rate of embedding adapters (default 1e-6)")
    # -- precision and memory ---------------------------------------------------------------------
    quant: Literal["none", "nf4", "fp4", "int8", "gguf"] = _f("none", "quantize the frozen base's linear layers "
                                                                    "with lorakit.quant (QLoRA); gguf: keep a .gguf "
                                                                    "model's own quantized weights packed")
    double_quant: bool = _f(True, "quant=nf4/fp4: also quantize the absmax statistics (QLoRA's double "
                                  "quantization)")
    quant_skip: list[str] | None = _f(None, "modules kept in 16/32 bit under quant (paths or suffixes, "
                                            "comma-separated); the output head, embeddings and norms always are")
    quant_modules: list[str] | None = _f(None, "only these nn.Linear modules are quantized (default: all but "
                                               "the output head and quant_skip)")
    quant_head: Literal["bf16", "compute"] = _f("bf16", "quant=nf4/fp4/int8: keep a frozen output head and input "
                                                        "embedding in bf16, upcast tile by tile (lorakit.quant.head16); "
                                                        "compute: keep them in the compute dtype")
    bf16: bool = _f(False, "bf16 autocast for forward/backward (LoRA factors stay fp32)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    offload_checkpoints: bool = _f(False, "with gradient_checkpointing: keep the checkpointed blocks' inputs in "
                                          "CPU pinned memory on GPU runs (lorakit.offload; a no-op move on CPU)")
    chunked_ce: bool = _f(True, "causal LM: cross-entropy over chunks of tokens, never the full logits "
                                "(lorakit.losses; same loss and gradients, far less memory at large vocab)")
    # -- optimization -----------------------------------------------------------------------------
    optim: Literal["adamw", "adamw8bit"] = _f("adamw", "optimizer: adamw (fp32 state) or adamw8bit (blockwise "
                                                       "8-bit state, lorakit.quant.Adam8bit)")
    offload_optimizer: bool = _f(False, "optim=adamw8bit: keep the optimizer state in CPU memory on GPU runs "
                                        "(a logged no-op on CPU)")
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "learning-rate schedule after warm-up")
    warmup_steps: int = _f(0, "linear warm-up steps")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = no clipping)")
    epochs: float = _f(1.0, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run (overrides epochs)")
    batch_size: int = _f(8, "rows per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_length: int = _f(512, "tokens per row; longer rows are truncated (and counted)")
    packing: bool = _f(False, "pack whole rows into sequences of max_length tokens, attention kept within each "
                              "row (padding-free; rows are truncated to max_length first)")
    neftune_alpha: float = _f(0.0, "NEFTune: uniform noise of scale alpha/sqrt(L*d) on the input embeddings "
                                   "while training (0 = off; the paper uses 5)")
    seed: int = _f(0, "seed for initialization, data order and dropout")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    distributed: Literal["auto", "ddp", "fsdp"] = _f(
        "auto", "under torchrun / accelerate launch: ddp (every process holds the model) or fsdp (parameters, "
                "gradients and optimizer state sharded, torch FSDP2); auto = ddp, or fsdp under accelerate "
                "launch --use_fsdp (docs/TRAINING.md)")
    # -- data ---------------------------------------------------------------------------------------
    builtin_rows: int = _f(2000, "rows drawn from a builtin:TASK training split")
    eval_rows: int = _f(200, "rows drawn from a builtin task's eval split (accuracy and loss)")
    replay: float = _f(0.0, "rehearsal against forgetting: this fraction of the training rows is drawn from "
                            "replay_data (0 = off; e.g. 0.25)")
    replay_data: str | None = _f(None, "data to replay, same forms as --data, or 'self': the base model's own "
                                       "answers to prompts it writes itself (Magpie; chat models) (default for "
                                       "the embedded model: its base tasks, split evenly)")
    self_replay_prompts: int = _f(32, "replay_data=self / the forgetting probe: how many prompts the base model "
                                      "writes (probe_rows of them are held out for the probe)")
    probe_every: int = _f(0, "forgetting probe: KL to the base model on held-out self-written prompts every N "
                             "steps (0 = off; chat models)")
    probe_rows: int = _f(8, "forgetting probe: how many of the self-written prompts it measures on")
    probe_max_kl: float | None = _f(None, "forgetting probe: warn (or stop, probe_action=stop) when the KL "
                                          "to the base exceeds this")
    probe_action: Literal["warn", "stop"] = _f("warn", "forgetting probe: what a KL above probe_max_kl does")
    eval_tasks: list[str] | None = _f(None, "built-in tasks scored before/after (default: the data's task "
                                            "and the model's base tasks, when it has lorakit_tasks.json)")
    # -- evaluation on the user's data, samples, early stopping (gen_eval.py, samples.py, early_stop.py) ----
    eval_generate_rows: int = _f(32, "eval rows with a reference answer (instruction/chat/completion) answered by "
                                     "greedy generation and scored with scorer (0 = off)")
    eval_max_new_tokens: int | None = _f(None, "new tokens per generated eval answer (default: the longest "
                                               "reference + 8, at most 512)")
    scorer: str = _f("exact", "how an answer is compared with its reference: exact (whitespace-normalized, "
                              "case-sensitive), exact_ci, contains, regex:PATTERN, module.path:function or "
                              "path/to/file.py:function")
    sample_every: int = _f(0, "generate answers to sample_prompts every N steps, into samples.jsonl, the log and "
                              "TensorBoard (0 = off)")
    sample_prompts: list[str] | str | None = _f(None, "prompts for sample_every: a list, or a text file with one "
                                                      "prompt a line (default: 3 prompts of the eval/train data)")
    sample_max_new_tokens: int = _f(48, "new tokens per sample generation")
    early_stopping_patience: int = _f(0, "stop after this many evaluations (eval_every) without improvement of "
                                         "metric_for_best (0 = off)")
    metric_for_best: Literal["eval_loss", "eval_score"] = _f("eval_loss", "the metric early stopping and save_best "
                                                                          "follow (lower loss / higher score is better)")
    save_best: bool = _f(False, "keep the adapter of the best evaluation in output_dir/best")
    # -- checkpoints, logging -------------------------------------------------------------------------
    save_every: int = _f(0, "write a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep (oldest are deleted)")
    resume: str | None = _f(None, "continue from a checkpoint directory, or 'auto' for the latest in "
                                  "output_dir/checkpoints")
    overwrite: bool = _f(False, "start over in an output_dir that already holds a run")
    resume_override: list[str] | None = _f(None, "settings a resume may change from the checkpoint's "
                                                 "(e.g. lr,max_steps); any other contradicting flag is an error")
    log_every: int = _f(10, "refresh the progress bar's loss every N steps (the CSV log gets every step)")
    eval_every: int = _f(0, "evaluate the eval data every N steps (0 = before and after only); needs eval data "
                            "(eval_data, eval_split or a builtin task)")
    progress: bool = _f(True, "show a progress bar")
    report_to: list[str] | None = _f(None, "loggers: csv, tensorboard, mlflow, wandb (comma-separated; log.csv is "
                                           "always written; default: csv and tensorboard when installed)")

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # "csv,mlflow" (the flag's form) is a list of names
            self.report_to = [n.strip() for n in self.report_to.split(",") if n.strip()]
        check_field_types(self)  # TrainArgs(lora_dropout="0.1") was a TypeError in the checks below
        for name in ("r", "batch_size", "grad_accum", "max_length", "builtin_rows", "keep_checkpoints",
                     "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "eval_every", "eval_rows", "self_replay_prompts", "probe_every",
                     "probe_rows", "eval_generate_rows", "sample_every", "early_stopping_patience"):
            _positive_int(name, getattr(self, name), minimum=0)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        if self.threads is not None:
            _positive_int("threads", self.threads)
        _positive_int("sample_max_new_tokens", self.sample_max_new_tokens)
        if self.eval_max_new_tokens is not None:
            _positive_int("eval_max_new_tokens", self.eval_max_new_tokens)
        check_scorer_spec(self.scorer)
        sp = self.sample_prompts
        if sp is not None and not (isinstance(sp, str) and sp.strip()) and not (
                isinstance(sp, list) and sp and all(isinstance(p, str) and p.strip() for p in sp)):
            raise ConfigError(f"sample_prompts={sp!r}: give a non-empty list of prompts, or a text file with one "
                              "prompt a line.")
        check_best_args(self.early_stopping_patience, self.metric_for_best, self.save_best, self.eval_every)
        for name in ("lr", "lora_alpha", "loraplus_ratio", "epochs"):
            _positive_float(name, getattr(self, name))
        if self.loraplus_embedding_lr is not None:
            _positive_float("loraplus_embedding_lr", self.loraplus_embedding_lr)
        for name in ("weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}={v!r}: must be a finite number ≥ 0.")
        if isinstance(self.replay, bool) or not isinstance(self.replay, (int, float)) or not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"replay={self.replay!r}: must be in [0, 1) — the fraction of training rows "
                              "replayed, e.g. 0.25.")
        if self.probe_action not in ("warn", "stop"):
            raise ConfigError(f"probe_action={self.probe_action!r}: use 'warn' or 'stop'.")
        if self.probe_max_kl is not None:
            _positive_float("probe_max_kl", self.probe_max_kl)
        if self.replay > 0 and self.replay_data == SELF and self.self_replay_prompts <= self.probe_rows * bool(self.probe_every):
            raise ConfigError(
                f"replay_data=self with self_replay_prompts={self.self_replay_prompts}"
                + (f" and a forgetting probe holding out {self.probe_rows}" if self.probe_every else "")
                + ": that leaves no prompt to replay; raise self_replay_prompts (e.g. 32) or set replay=0.")
        if isinstance(self.eval_split, bool) or not isinstance(self.eval_split, (int, float)) \
                or not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"eval_split={self.eval_split!r}: must be in [0, 1) — the fraction of training rows "
                              "held out for evaluation, e.g. 0.05.")
        if self.eval_split and self.eval_data is not None and not self.builtin_task:
            raise ConfigError("eval_split and eval_data exclude each other: eval_split takes the eval rows from "
                              "the training file. Pass one of them.")
        if isinstance(self.neftune_alpha, bool) or not isinstance(self.neftune_alpha, (int, float)) \
                or not math.isfinite(self.neftune_alpha) or self.neftune_alpha < 0:
            raise ConfigError(f"neftune_alpha={self.neftune_alpha!r}: must be a finite number ≥ 0 (0 = off, e.g. 5).")
        if not isinstance(self.system_prompt, str):
            raise ConfigError(f"system_prompt={self.system_prompt!r}: must be a string ('auto', '' or the text).")
        if not isinstance(self.columns, dict):
            raise ConfigError(f"columns={self.columns!r}: must be a mapping of lorakit field → column name.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1), e.g. 0.05.")
        if not isinstance(self.method, str) or self.method not in METHOD_NAMES:
            raise ConfigError(f"method={self.method!r}: not a lorakit method; choose one of "
                              f"{', '.join(METHOD_NAMES)} (e.g. method=lora).")
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.strip().lower() in ("true", "false"):
            self.init_lora_weights = self.init_lora_weights.strip().lower() == "true"  # the flag's form
        self._check_lora_shape_options()
        if self.method != "full":  # the targets, checked now as the method's LoraConfig checks them at inject
            LoraConfig(target_modules=self.target_modules, exclude_modules=self.exclude_modules,
                       modules_to_save=self.modules_to_save, fused_slices=self.fused_slices,
                       **self.lora_shape_options())
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options={self.method_options!r}: must be a mapping of option → value.")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ConfigError(f"output_dir={self.output_dir!r}: name a directory for the run (e.g. runs/my-run); "
                              "lorakit never writes a run into the current directory by default.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32 - 1024:
            raise ConfigError(f"seed={self.seed!r}: must be an integer in [0, 2**32 - 1024) (numpy's seed range, "
                              "less room for one seed per process), e.g. 0.")
        if self.resume is not None and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run that "
                              "overwrite would delete. Pass one of them.")
        if self.report_to is not None:
            if isinstance(self.report_to, str):
                self.report_to = [n.strip() for n in self.report_to.split(",") if n.strip()]
            unknown = [n for n in self.report_to if n not in LOGGERS]
            if unknown:
                raise ConfigError(f"report_to={unknown[0]!r}: unknown logger; choose from {', '.join(LOGGERS)} "
                                  "(comma-separated, e.g. report_to=csv,mlflow).")
        if self.packing and self.task == "seq-cls":
            raise ConfigError("packing=true concatenates rows into token blocks, which makes no sense for "
                              "sequence classification; drop packing or use a causal LM.")
        if self.quant != "none" and self.method == "full":
            raise ConfigError(f"quant={self.quant} freezes quantized base weights, so method=full cannot "
                              "train them; use method=lora (QLoRA) or quant=none.")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ConfigError("offload_checkpoints=true moves the inputs of checkpointed blocks to the CPU; it needs "
                              "gradient_checkpointing=true — add it or drop offload_checkpoints.")
        if self.offload_optimizer and self.optim != "adamw8bit":
            raise ConfigError("offload_optimizer=true needs optim=adamw8bit (its 8-bit state is what moves to the "
                              "CPU); add optim=adamw8bit or drop offload_optimizer.")
        if self.distributed not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"distributed={self.distributed!r}: use auto, ddp or fsdp.")
        if self.quant_head not in ("bf16", "compute"):
            raise ConfigError(f"quant_head={self.quant_head!r}: use bf16 (a frozen head and embedding kept in bf16, "
                              "the default) or compute (kept in the compute dtype).")
        if self.quant == "none" and (self.quant_skip or self.quant_modules):
            raise ConfigError("quant_skip / quant_modules only apply with quant=nf4|fp4|int8; set quant or drop them.")

    # -- conveniences ---------------------------------------------------------------------------
    def lora_shape_options(self) -> dict[str, Any]:
        """The LoraConfig fields of the adapter's start and shape that only method lora/loraplus take."""
        return dict(init_lora_weights=self.init_lora_weights, layers_to_transform=self.layers_to_transform,
                    layers_pattern=self.layers_pattern, rank_pattern=self.rank_pattern,
                    alpha_pattern=self.alpha_pattern)

    def _check_lora_shape_options(self) -> None:
        init = self.init_lora_weights
        set_ = [k for k, v in self.lora_shape_options().items() if v not in (True, None, {}, [])]
        if self.method in LYCORIS_METHODS:
            lora_only = dict(init_lora_weights=init is not True, use_dora=self.use_dora, use_rslora=self.use_rslora,
                             lora_dropout=self.lora_dropout != 0, fused_slices=bool(self.fused_slices))
            bad = [k for k, on in lora_only.items() if on]
            if self.quant != "none":
                raise ConfigError(f"method={self.method} with quant={self.quant}: LoHa / LoKr adapt nn.Linear and "
                                  "nn.Conv2d bases only, not quantized ones (nor does PEFT's). Drop quant, or "
                                  "use method=lora for QLoRA.")
            if bad:
                raise ConfigError(f"{', '.join(bad)}: LoRA options that method={self.method} does not have (PEFT's "
                                  f"{self.method.upper()} has no such field); drop them, or use method=lora.")
            set_ = []
        if set_ and self.method not in WEIGHT_INIT_METHODS:
            raise ConfigError(f"{', '.join(set_)}: method={self.method} builds its adapter its own way; these "
                              f"options are for method={' or '.join(WEIGHT_INIT_METHODS)} (drop them, or change "
                              "method).")
        if init == "loftq":
            raise ConfigError("init_lora_weights=loftq is not a lorakit train option: LoftQ quantizes the full-"
                              "precision weights itself while it builds the factors. Use the Python API "
                              "(lorakit.quant.loftq.loftq_inject on the unquantized model, docs/QUANT.md), or "
                              "quant=nf4 with init_lora_weights=true or gaussian.")
        if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
            if self.quant != "none":
                raise ConfigError(f"init_lora_weights={init} with quant={self.quant}: {init} writes the residual "
                                  "W − s·B0·A0 into the base weights, which a quantized base cannot take. Train "
                                  "without quant, or use init_lora_weights=true with quant.")
            if self.use_dora:
                raise ConfigError(f"init_lora_weights={init} with use_dora=true: the saved adapter is rewritten "
                                  "as a plain LoRA of the original weights, which a DoRA magnitude has no form "
                                  "for. Drop one of the two.")

    @property
    def builtin_task(self) -> str | None:
        """``TASK`` when ``data`` is ``builtin:TASK``."""
        return _builtin(self.data)

    @property
    def eval_builtin_task(self) -> str | None:
        return _builtin(self.eval_data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainArgs:
        return dataclasses.replace(self, **changes)


def field_help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(TrainArgs) if f.name == name)


def _builtin(spec: str | None) -> str | None:
    if spec and spec.startswith(BUILTIN_PREFIX):
        return spec[len(BUILTIN_PREFIX):]
    return None


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: must be an integer ≥ {minimum}.")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r}: must be a positive finite number.")


# Settings of `lorakit train` with no --model and no --data: the embedded tiny model learns its
# default new task in well under the 3-minute budget on 2 CPU cores. Layered *under* a recipe and the
# command line, so `lorakit train lr=1e-3` still wins.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "batch_size": 32,
    "max_steps": 300,
    "warmup_steps": 20,
    "schedule": "cosine",
    "builtin_rows": 4000,
    "save_every": 100,
    # Rehearse the base tasks (a quarter of the rows): without it the run forgets 99 % of what the base
    # could do (docs/TRAINING.md, Replay); the study on SmolLM2 (docs/results/STUDY_SMOLLM2.md) measures
    # the same guard, with the chat model's own answers, on a real model.
    "replay": 0.25,
    # A 0.8 M-parameter model gains nothing from a second thread, and on a busy machine OpenMP's
    # spinning threads make each step 10-20x slower; one thread keeps the demo's time predictable.
    "threads": 1,
}
