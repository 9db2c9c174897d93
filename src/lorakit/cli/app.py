"""``lorakit``: the command line. Thin on purpose — each command parses its arguments and calls one
typed function (``lorakit.train.train``, ``lorakit.cli.commands.*``).

    lorakit train                                   # the embedded demo: tiny-base learns a new task
    lorakit train --model DIR --data train.jsonl [--config recipe.yaml] [key=value ...]
    lorakit eval    --adapter runs/default/adapter --data builtin:shift
    lorakit merge   --adapter runs/default/adapter --out merged/
    lorakit merge   --adapter runs/default/adapter --format gguf --out merged.gguf   # base GGUF + adapter
    lorakit generate --adapter runs/default/adapter "shift abc="
    lorakit info    runs/default/adapter
    lorakit export  runs/default/adapter --format gguf --base model.gguf   # a llama.cpp LoRA

``train``'s flags, recipe keys and ``key=value`` overrides are the fields of ``TrainArgs``; later
sources win: defaults < (embedded defaults, with no --model/--data) < recipe < flags < key=value.
Errors lorakit understands (bad config, bad data, bad checkpoint, an unwritable output) print one line
and exit 2 (``--debug`` shows the traceback); an interrupted run exits 130 (SIGINT) or 143 (SIGTERM)
after saving a checkpoint, and SIGTERM outside the training steps exits 143 with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from ..errors import ConfigError, LorakitError


def train_command(config: str | None, flags: dict[str, str], overrides: Sequence[str]) -> int:
    from ..train.args import EMBEDDED_DEFAULTS, TrainArgs
    from ..train.loop import train
    from .options import build, load_yaml, parse_overrides

    recipe = load_yaml(config) if config else {}
    extra = parse_overrides(overrides)
    user = {**recipe, **flags, **extra}
    demo = user.get("model") in (None, "", "none", "null") and user.get("data") in (None, "", "none", "null")
    layers = [("the embedded defaults", EMBEDDED_DEFAULTS if demo else {}),
              (f"recipe {config}", recipe), ("the command-line flags", flags), ("key=value arguments", extra)]
    args = build(TrainArgs, *layers)
    owned = not _process_group_up()  # under torchrun, accelerate forms the group inside train()
    try:
        result = train(args)
    finally:
        if owned and _process_group_up():
            # Leave the group before the interpreter exits: a gloo group left to static destruction can
            # abort the process ("terminate called without an active exception") after a good run.
            import torch.distributed as dist

            dist.destroy_process_group()
    if result.interrupted:
        return 143 if result.signal == signal.SIGTERM else 130
    return 0


def _process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def eval_command(data: str, adapter: str | None, model: str | None, max_length: int, batch_size: int,
                 eval_rows: int, as_json: bool, scorer: str = "exact", generate_rows: int = 32,
                 max_new_tokens: int | None = None) -> int:
    from .commands import evaluate, format_eval

    result = evaluate(data, adapter=adapter, model=model, max_length=max_length, batch_size=batch_size,
                      eval_rows=eval_rows, scorer=scorer, generate_rows=generate_rows, max_new_tokens=max_new_tokens)
    print(json.dumps(result, indent=2) if as_json else "\n".join(format_eval(result)))
    return 0


def merge_command(adapter: str, out: str, model: str | None, requantize: bool = False,
                  dtype: str | None = None) -> int:
    from .commands import merge

    path = merge(adapter, out, model=model, requantize=requantize, dtype=dtype)
    print(f"merged {adapter} into its base; saved a transformers checkpoint to {path}"
          + (f" ({dtype})" if dtype else ""))
    return 0


def generate_command(prompt: str | None, adapter: str | None, model: str | None, max_new_tokens: int,
                     temperature: float, chat: bool, system: str | None = None, file: str | None = None,
                     interactive: bool = False) -> int:
    from ..train.generation import read_prompts
    from .commands import generator

    if sum(x is not None and x is not False for x in (prompt, file, interactive or None)) != 1:
        raise ConfigError("generate takes one of: a PROMPT, --file FILE (one prompt per line) or --interactive.")
    prompts = read_prompts(file) if file else None
    gen = generator(adapter, model, max_new_tokens, temperature, chat, system)

    def show(text: str) -> None:
        print(text, end="" if text.endswith("\n") else "\n", flush=True)
        hint = gen.hint(text)
        if hint:
            print(f"lorakit generate: note: {hint}", file=sys.stderr)

    if prompts is not None:  # JSON lines: generated text may span lines
        for p in prompts:
            text = gen(p)
            print(json.dumps({"prompt": p, "output": text}, ensure_ascii=False), flush=True)
            hint = gen.hint(text)
            if hint:
                print(f"lorakit generate: note: {p!r}: {hint}", file=sys.stderr)
        return 0
    if interactive:
        print("lorakit generate: one prompt per line; an empty line or end of input quits.", file=sys.stderr)
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or not line.strip():
                return 0
            show(gen(line.rstrip("\n")))
    show(gen(prompt))
    return 0


def info_command(adapter_dir: str, as_json: bool) -> int:
    from .commands import format_info, info

    data = info(adapter_dir)
    print(json.dumps(data, indent=2, default=str) if as_json else "\n".join(format_info(data)))
    return 0


# -- parsing ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ..train.args import TrainArgs
    from .options import add_flags

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, eval, merge, generate.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = parser.train_parser = sub.add_parser("train", help="fine-tune a model (no arguments: the embedded demo)",
                       description="Fine-tune with LoRA (or another --method). Every flag is also a recipe "
                                   "key and a key=value override.")
    p.add_argument("--config", help="YAML recipe whose keys are the flags below (with underscores)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. lr=1e-4 r=16")
    add_flags(p, TrainArgs)

    p = sub.add_parser("eval", help="loss / perplexity / accuracy, base vs adapter")
    p.add_argument("--data", required=True, help="a .jsonl/.csv/.parquet file or builtin:TASK (eval split)")
    p.add_argument("--adapter", help="adapter directory (omit to score the base model alone)")
    p.add_argument("--model", help="base model directory (default: the adapter's base, or the embedded model)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-rows", type=int, default=200, help="rows drawn from a builtin task")
    p.add_argument("--scorer", default="exact", help="how generated answers are compared with the file's reference "
                   "answers: exact (whitespace-normalized, case-sensitive), exact_ci, contains, regex:PATTERN, "
                   "module.path:function or path/to/file.py:function")
    p.add_argument("--generate-rows", type=int, default=32, help="rows with a reference answer that are answered by "
                   "greedy generation and scored (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per answer (default: the longest "
                   "reference + 8)")
    p.add_argument("--json", action="store_true", dest="as_json", help="print JSON")

    p = sub.add_parser("merge", help="merge an adapter and save a dense transformers checkpoint")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="output directory (from_pretrained loads it)")
    p.add_argument("--model", help="base model directory (default: the adapter's base)")
    p.add_argument("--requantize", action="store_true", help="QLoRA adapters: quantize the merged weights "
                   "again in the base's format and report the error it adds (default: 16/32-bit merge)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="precision of the saved weights (default: as loaded, fp32); the merge itself runs in fp32")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], dest="out_format",
                   help="hf: a transformers checkpoint (default); gguf: a GGUF model from a .gguf base (--out FILE.gguf)")
    p.add_argument("--quant", choices=["f16", "f32", "keep"],
                   help="--format gguf: type of the merged tensors (default f16; keep = the base's type, requantized)")

    p = sub.add_parser("generate", help="continue a prompt with an adapter",
                       description="Continue prompts as raw text; --chat (or --system) wraps them in the "
                                   "tokenizer's chat template.")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --file / --interactive)")
    p.add_argument("--adapter")
    p.add_argument("--model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--system", help="system message (implies --chat)")
    p.add_argument("--file", help="a text file with one prompt per line; prints one JSON line per prompt")
    p.add_argument("--interactive", action="store_true", help="read prompts from standard input, one per line")

    p = sub.add_parser("info", help="describe an adapter directory")
    p.add_argument("adapter_dir")
    p.add_argument("--json", action="store_true", dest="as_json")

    # Commands other modules contribute: each sub-parser sets `run(namespace) -> exit code`.
    try:
        from .forgetting import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    from .image import add_subcommands as add_image_commands

    add_image_commands(sub)  # train-image
    from .export import add_subcommands as add_export

    add_export(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM outside the training loop (startup, final evaluation): stop with a message, exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LORAKIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    if argv[:1] == ["train"]:  # flags and KEY=VALUE may interleave: `--model M lr=1e-4 --data D r=8`
        ns = parser.train_parser.parse_intermixed_args(argv[1:])
        ns.command = "train"
    else:
        ns = parser.parse_args(argv)
    ns.debug = debug or getattr(ns, "debug", False)
    # The training loop installs its own handler (stop after the step, save); outside it, SIGTERM
    # ends the command with a message instead of a silent -15.
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    format_before = warnings.formatwarning
    if not ns.debug:  # lorakit's own warnings read like its other lines, not "/path/file.py:97: UserWarning:"
        warnings.formatwarning = _one_line_warning
    try:
        return _dispatch(ns)
    except LorakitError as exc:
        if ns.debug:
            raise
        print(f"lorakit {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment refused (a missing file, a full disk): not a lorakit bug
        if ns.debug:
            raise
        print(f"lorakit {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during a save: the previous checkpoint is intact
        print(f"lorakit {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lorakit {ns.command}: terminated (SIGTERM) outside the training steps; checkpoints already "
              "written are intact — continue with --resume auto.", file=sys.stderr)
        return 143
    finally:
        warnings.formatwarning = format_before
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    own = category is UserWarning or filename.startswith(os.path.dirname(os.path.dirname(__file__)))
    return f"warning: {message}\n" if own else f"warning: {category.__name__}: {message}\n"


def _dispatch(ns) -> int:
    if ns.command == "train":
        flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "overrides", "debug")}
        return train_command(ns.config, flags, ns.overrides)
    if ns.command == "eval":
        return eval_command(ns.data, ns.adapter, ns.model, ns.max_length, ns.batch_size, ns.eval_rows,
                            ns.as_json, ns.scorer, ns.generate_rows, ns.max_new_tokens)
    if ns.command == "merge" and ns.out_format == "gguf":
        from .merge_gguf import merge_gguf_command

        return merge_gguf_command(ns.adapter, ns.out, ns.model, ns.quant, ns.requantize, ns.dtype)
    if ns.command == "merge":
        if ns.quant is not None:
            raise ConfigError("--quant applies to --format gguf; for a transformers checkpoint use --dtype.")
        return merge_command(ns.adapter, ns.out, ns.model, ns.requantize, ns.dtype)
    if ns.command == "generate":
        return generate_command(ns.prompt, ns.adapter, ns.model, ns.max_new_tokens, ns.temperature, ns.chat,
                                ns.system, ns.file, ns.interactive)
    if ns.command == "info":
        return info_command(ns.adapter_dir, ns.as_json)
    return ns.run(ns)  # a contributed command (lorakit forgetting, distill-data)


def _one_line(exc: BaseException) -> str:
    """The message on one line (multi-line problem lists are joined), ``--debug`` for the traceback."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

