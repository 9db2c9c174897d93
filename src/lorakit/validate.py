"""Strict checks of untrusted values: config fields, JSON files, tensors and paths read from files.

Every check raises a :class:`lorakit.errors.LorakitError` subclass whose message names the field,
key or file and says what would be accepted — never a raw ``TypeError`` / ``UnicodeDecodeError``
from deep inside. Types are checked strictly: ``"false"`` (a string) is not a bool, ``1.5`` is not a
bool and not an int, ``True`` is not an int. Sizes are bounded *before* anything is allocated (a rank
of 2³¹ would ask for terabytes before any shape check could run).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, LorakitError

#: Largest LoRA rank accepted anywhere. ΔW's rank is at most min(fan_in, fan_out), and no released
#: model has a hidden size above 2¹⁶; a larger value is a typo or a hostile file.
MAX_RANK = 1 << 16
#: Largest α (or α-pattern value); α/r scales the update, a value beyond this only makes it overflow.
MAX_ALPHA = 1e6
#: Plain integer fields (layer indices, steps) stay within a signed 32-bit int.
MAX_INT = (1 << 31) - 1


# -- config fields -------------------------------------------------------------------------------
def check_field_types(obj: Any) -> None:
    """Every field of dataclass ``obj`` holds a value of its annotated type (strictly: ``True`` is not an
    int, ``"0.1"`` not a float, ``"no"`` not a bool; a ``Literal`` field one of its choices; a path field
    may be an ``os.PathLike``). Ranges are the class's own checks; this only stops a wrong type before
    a comparison in them turns it into a bare ``TypeError`` (or a ``"no"`` reads as True)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if not _is_a(value, tp):
            # a right-typed value outside a Literal's choices: the choices are the fix, "(got a str)" is noise
            literal = typing.get_origin(tp) is typing.Literal and any(type(value) is type(c) for c in typing.get_args(tp))
            got = "" if literal else (_bad_entry(value, tp) or f" (got a {type(value).__name__})")
            raise ConfigError(f"{type(obj).__name__} {f.name}={value!r:.80}: must be {_describe(tp)}{got}.")


def _is_a(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == c and type(value) is type(c) for c in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, os.PathLike))
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_is_a(k, args[0]) and _is_a(v, args[1])
                                                            for k, v in value.items()))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _bad_entry(value: Any, tp: Any) -> str | None:
    """For a list / dict of the right container type: which entry is wrong ("(got a dict)" said nothing)."""
    for alt in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)):
        origin, args = typing.get_origin(alt), typing.get_args(alt)
        if origin is dict and args and isinstance(value, dict):
            for k, v in value.items():
                if not _is_a(k, args[0]):
                    return f" (key {k!r} is not {_describe(args[0])})"
                if not _is_a(v, args[1]):
                    return f" (entry {k!r}: {v!r:.40} is not {_describe(args[1])})"
        if origin is list and args and isinstance(value, list):
            for i, v in enumerate(value):
                if not _is_a(v, args[0]):
                    return f" (entry {i}: {v!r:.40} is not {_describe(args[0])})"
    return None


def _plural(tp: Any) -> str:
    simple = {bool: "booleans", int: "integers", float: "numbers", str: "strings", Any: "values"}
    return simple.get(tp) or _describe(tp)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in args)
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def known_fields(cls):
    """Class decorator (on a config dataclass, above ``@dataclass``): an unknown keyword is a ConfigError
    naming it and the closest field, not a bare ``TypeError`` (``LoraConfig(lora_aplha=16)``)."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                     for k in unknown]
            peft = " (docs/PEFT_FIELDS.md: the PEFT fields lorakit refuses)" if hasattr(cls, "from_peft_dict") else ""
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(hints)}. Its fields: {', '.join(names)}"
                              f"{peft}.")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def check_bool(name: str, value: Any, error=ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name}={value!r}: must be true or false (a JSON/YAML boolean, not a "
                    f"{type(value).__name__}).")
    return value


def check_int(name: str, value: Any, minimum: int = 0, maximum: int = MAX_INT, error=ConfigError) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name}={value!r}: must be an integer (got a {type(value).__name__}).")
    if not minimum <= value <= maximum:
        raise error(f"{name}={value!r}: must be an integer in [{minimum}, {maximum}].")
    return value


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, example: str = "", error=ConfigError) -> float:
    """A real number (int or float, never bool or str), finite, within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}={value!r}: must be a number (got a {type(value).__name__}){example}.")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf
    ok = math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise error(f"{name}={value!r}: must be a finite number in {lo}{low:g}, {high:g}{hi}{example}.")
    return v


def check_opt_str(name: str, value: Any, error=ConfigError) -> str | None:
    if value is not None and not isinstance(value, str):
        raise error(f"{name}={value!r}: must be a string or null (got a {type(value).__name__}).")
    return value


def check_str_list(name: str, value: Any, allow_str: bool = True, error=ConfigError) -> list[str] | str | None:
    """None, a string (when ``allow_str``), or a non-empty list/tuple of non-empty strings."""
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if not isinstance(value, (list, tuple, set, frozenset)) or not value:
        raise error(f"{name}={value!r}: must be a non-empty list of names" + (" or a string" if allow_str else "")
                    + f" (got a {type(value).__name__}).")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise error(f"{name}: entries {bad[:5]!r} are not non-empty strings; list module names, e.g. ['q_proj'].")
    return list(value)


def check_int_list(name: str, value: Any, minimum: int = 0, error=ConfigError) -> list[int] | None:
    """None, one integer, or a list of integers ≥ ``minimum``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise error(f"{name}={value!r}: must be an integer or a list of integers (got a {type(value).__name__}).")
    for item in value:
        check_int(f"{name} entry", item, minimum=minimum, error=error)
    return list(value)


def check_pattern_map(name: str, value: Any, check_value, error=ConfigError) -> dict[str, Any]:
    """A ``{regex: value}`` mapping (None = empty) with string keys; ``check_value(key_name, v)``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise error(f"{name}={value!r}: must be a mapping {{module regex: value}} (got a {type(value).__name__}).")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise error(f"{name} key {key!r}: must be a non-empty string (a module-path regex).")
        out[key] = check_value(f"{name}[{key!r}]", v)
    return out


# -- files ---------------------------------------------------------------------------------------
def _refuse_constant(token: str):
    raise ValueError(f"{token} is not a JSON number")


def read_json_object(path: str | os.PathLike, error: type[LorakitError], fix: str, max_bytes: int = 64 << 20
                     ) -> dict[str, Any]:
    """The JSON object in ``path``: UTF-8, valid JSON (no NaN/Infinity), an object at the top."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size:,} bytes is far too large for this JSON file (limit {max_bytes:,}); {fix}")
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); {fix}") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object {{...}}, not a {type(data).__name__}; {fix}")
    return data


def check_float_tensors(tensors: Mapping[str, torch.Tensor], source: str, error: type[LorakitError],
                        fix: str = "the file is damaged or not an adapter; save it again") -> None:
    """Every tensor is floating point and finite; all offenders are named at once."""
    bad_dtype = [f"{k} ({t.dtype})" for k, t in tensors.items()
                 if not isinstance(t, torch.Tensor) or not t.is_floating_point()]
    if bad_dtype:
        raise error(f"{source}: tensors must be floating point, these are not: {', '.join(bad_dtype[:10])}"
                    f"{' …' if len(bad_dtype) > 10 else ''}. Integer or bool weights are never cast; {fix}.")
    # float8 has no isfinite kernel: check those (1-byte) tensors in float32
    bad = [k for k, t in tensors.items()
           if t.numel() and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())]
    if bad:
        raise error(f"{source}: tensors hold NaN or inf values: {', '.join(bad[:10])}"
                    f"{' …' if len(bad) > 10 else ''}. The adapter diverged or the file is damaged; "
                    "use an earlier checkpoint.")


def inside(base: str | os.PathLike, name: Any, what: str, error: type[LorakitError]) -> Path:
    """``base / name`` for a relative file name read from a file, refusing any path that leaves ``base``
    (``../../etc/passwd``, absolute paths, symlinks pointing out)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what}: {name!r} is not a file name; the index must map tensor names to shard file names.")
    base = Path(base).resolve()
    target = (base / name).resolve()
    if Path(name).is_absolute() or (target != base and base not in target.parents):
        raise error(f"{what}: {name!r} points outside {base}; shard files must lie in the model directory.")
    return target


def check_file_ranks(rank_for, tensors: Mapping[str, torch.Tensor], source: str, error: type[LorakitError],
                     per_expert: bool = False) -> None:
    """Before injecting: the rank the config gives each module (``rank_for(path)``) equals the rank of
    the file's A factor (PEFT keys, normalised). A config that claims r = 60000 for a file of rank 8
    is refused here, before 60000-row factors are allocated. With ``per_expert`` (target_parameters:
    PEFT stacks one rank-r factor per expert; fused_slices: one per adapted slice) a whole multiple of
    the rank is accepted."""
    problems = []
    for key, t in tensors.items():
        # (suffix, the dimension that holds r): LoRA's A (r, in); LoHa's w1_a / w2_a (out, r), which would be
        # allocated at the config's rank before the shape check. LoKr needs none: at a large r its w2 is full.
        for suffix, dim in ((".lora_A.weight", 0), (".lora_embedding_A", 0), (".hada_w1_a", 1), (".hada_w2_a", 1)):
            if key.endswith(suffix) and t.dim() > dim:
                path = key[: -len(suffix)].removeprefix("base_model.model.")
                r = rank_for(path)
                problem = f"{path}: config rank {rank_for(path)}, file rank {t.shape[dim]}"
                if r != t.shape[dim] and not (per_expert and r and t.shape[dim] % r == 0) and problem not in problems:
                    problems.append(problem)
                break
    if problems:
        raise error(f"{source}: adapter_config.json does not match its weights: {'; '.join(problems[:10])}"
                    f"{' …' if len(problems) > 10 else ''}. Fix r / rank_pattern or save the adapter again.")
