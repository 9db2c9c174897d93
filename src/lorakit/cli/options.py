"""Flags, YAML recipes and ``key=value`` overrides, all derived from the fields of a dataclass.

Precedence, lowest first: the dataclass defaults < ``base`` (e.g. the embedded-model defaults) < the
YAML recipe (``--config``) < flags and ``key=value`` overrides, in the order given on the command
line. Every value goes through :func:`coerce`, so ``lr=1e-4`` (a string), ``lr: 1.0e-4`` (YAML) and
``--lr 1e-4`` end up as the same float, and the dataclass's ``__post_init__`` validates the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ..errors import ConfigError

T = TypeVar("T")
_NONE_WORDS = {"none", "null", "~", ""}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def build(cls: type[T], *layers: tuple[str, Mapping[str, Any]]) -> T:
    """``cls(**merged)`` from ``(where, mapping)`` layers, later layers winning; each value coerced."""
    types_ = field_types(cls)
    merged: dict[str, Any] = {}
    for where, mapping in layers:
        for key, value in mapping.items():
            head, _, sub = key.partition(".")
            if head not in types_:
                raise unknown_key_error(head, list(types_), where)
            if sub:  # method_options.target_r=4 → method_options["target_r"] = 4 (YAML-parsed)
                if _origin(types_[head]) is not dict:
                    raise ConfigError(f"{key!r} in {where}: {head!r} is not a mapping; write {head}=VALUE.")
                merged.setdefault(head, {})
                merged[head] = {**merged[head], sub: _yaml_scalar(value)}
                continue
            merged[key] = coerce(value, types_[head], key, where)
    return cls(**merged)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"recipe {path} {what}; pass the path of a YAML file with TrainArgs keys.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary file passed as --config
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {exc.start}); pass a YAML file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of key: value, got a {type(data).__name__}.")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {item!r} is not KEY=VALUE; write e.g. lr=1e-4 or --lr 1e-4.")
        out[key.strip().replace("-", "_")] = value
    return out


# -- values --------------------------------------------------------------------------------------
def coerce(value: Any, tp: Any, key: str, where: str = "the arguments") -> Any:
    """Turn ``value`` (a YAML value or a command-line string) into type ``tp``, or raise ConfigError."""
    options = _union_members(tp)
    if options is not None:
        if type(None) in options and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        rest = [o for o in options if o is not type(None)]
        # `list[str] | str`: a string without commas stays a string (e.g. 'all-linear', a regex).
        if str in rest and isinstance(value, str) and not (any(_origin(o) is list for o in rest) and "," in value):
            return value
        errors = []
        for option in rest:
            try:
                return coerce(value, option, key, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    origin = _origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r} in {where}: must be one of {', '.join(map(str, choices))}.{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}={value!r} in {where}: must be true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} in {where}: must be an integer.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} in {where}: must be a number (e.g. 1e-4).")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} in {where}: must be a string.")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (str,)
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}={value!r} in {where}: must be a list (YAML list or comma-separated).")
        return [coerce(v, item_tp, key, where) for v in items]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_scalar(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} in {where}: must be a mapping (YAML {{key: value}}).")
        return dict(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - a TrainArgs bug


def _yaml_scalar(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _union_members(tp: Any) -> tuple | None:
    if _origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


# -- argparse ----------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--field-name`` flag per dataclass field; values are left as strings for :func:`build`."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = field_types(cls)[f.name]
        help_ = f.metadata.get("help", "")
        default = repr(f.default) if f.default is not dataclasses.MISSING else "{}"
        # Each default is printed once: a help text that explains its default already keeps its own words.
        shown = "" if "default" in help_.lower() else f" (default: {default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_}{shown}")
        else:
            choices = _literal_choices(tp)
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                                metavar=None if choices else _metavar(tp), choices=choices,
                                help=f"{help_}{shown}")


def _literal_choices(tp: Any) -> list[str] | None:
    return list(typing.get_args(tp)) if _origin(tp) is Literal else None


def _metavar(tp: Any) -> str:
    members = _union_members(tp) or (tp,)
    names = []
    for m in members:
        if m is type(None):
            continue
        names.append({int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(m, "LIST" if _origin(m) is list else "VALUE"))
    return "|".join(dict.fromkeys(names)) or "VALUE"
