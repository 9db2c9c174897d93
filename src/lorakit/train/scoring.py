"""Scorers: how a generated answer is compared with a reference answer (``scorer=...``).

A scorer is a function ``(prediction: str, reference: str) -> float | bool`` giving a score in [0, 1];
the eval score of a run is its mean over the scored rows. The spec names one:

    exact              whitespace-normalized, case-sensitive equality: both sides stripped, every run of
                       whitespace (spaces, tabs, newlines) collapsed to one space; "Paris\\n" == "Paris"
    exact_ci           the same, case-insensitive (``str.casefold``): "paris" == "Paris"
    contains           the normalized reference occurs in the normalized prediction (case-sensitive)
    regex:PATTERN      ``re.search(PATTERN)`` extracts the answer from the prediction — group 1 when the
                       pattern has groups, else the whole match — and from the reference when it matches
                       there too (else the whole reference is the answer); 1 when the two extractions are
                       equal (whitespace-normalized), 0 when the prediction has no match. So
                       ``regex:#### (-?\\d+)`` scores GSM8K-style answers whether the reference is the bare
                       number or a full worked solution ending in ``#### 42``.
    module.path:fn     a function of an importable module (on ``sys.path`` / ``PYTHONPATH``)
    path/to/file.py:fn a function defined in a Python file (the file is imported, i.e. executed: it is
                       the user's own code, like a recipe's scorer in other trainers)

:func:`check_scorer_spec` checks the spec's form without importing anything (``TrainArgs`` calls it on
construction); :func:`load_scorer` imports a function, checks it is callable, and
:meth:`Scorer.check` calls it once per reference (``score(ref, ref)``) before any training, so a bad
scorer fails while nothing has been done yet. Every failure is a :class:`~lorakit.errors.ScorerError`
naming the spec and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ScorerError

#: Built-in scorers: name → what it does (printed in help and errors).
BUILTINS = {
    "exact": "whitespace-normalized, case-sensitive exact match",
    "exact_ci": "whitespace-normalized, case-insensitive exact match",
    "contains": "the normalized reference occurs in the normalized prediction",
}
REGEX_PREFIX = "regex:"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HOW = ("use exact, exact_ci, contains, regex:PATTERN, module.path:function or path/to/file.py:function "
        "(a function (prediction: str, reference: str) -> float | bool)")


def normalize(text: str) -> str:
    """Strip, and collapse every whitespace run to one space."""
    return " ".join(text.split())


def exact(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def exact_ci(prediction: str, reference: str) -> bool:
    return normalize(prediction).casefold() == normalize(reference).casefold()


def contains(prediction: str, reference: str) -> bool:
    return normalize(reference) in normalize(prediction)


_BUILTIN_FNS: dict[str, Callable[[str, str], bool]] = {"exact": exact, "exact_ci": exact_ci, "contains": contains}


def regex_scorer(pattern: re.Pattern) -> Callable[[str, str], bool]:
    """The ``regex:PATTERN`` scorer (see the module docstring for the semantics)."""

    def extract(text: str) -> str | None:
        m = pattern.search(text)
        if m is None:
            return None
        return m.group(1) if pattern.groups else m.group(0)

    def score(prediction: str, reference: str) -> bool:
        got = extract(prediction)
        if got is None:
            return False
        want = extract(reference)
        return normalize(got) == normalize(want if want is not None else reference)

    return score


def check_scorer_spec(spec: object) -> None:
    """The spec's form is valid (a known name, a compiling regex, ``module:function`` or ``file.py:function``
    with an existing file); nothing is imported. Raises :class:`ScorerError`."""
    _parse(spec)


def _parse(spec: object) -> tuple[str, object, str]:
    """``(kind, target, function)``: ("builtin", name, ""), ("regex", compiled, ""), ("module", dotted,
    fn) or ("file", Path, fn)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ScorerError(f"scorer={spec!r}: must be a non-empty string; {_HOW}.")
    if spec in BUILTINS:
        return "builtin", spec, ""
    if spec.startswith(REGEX_PREFIX):
        pattern = spec[len(REGEX_PREFIX):]
        if not pattern:
            raise ScorerError(f"scorer={spec!r}: the regex is empty; write e.g. regex:answer: (\\w+).")
        try:
            return "regex", re.compile(pattern), ""
        except re.error as exc:
            raise ScorerError(f"scorer={spec!r}: the regex does not compile ({exc}); fix the pattern "
                              "(Python re syntax).") from None
    target, sep, fn = spec.rpartition(":")
    if not sep:
        raise ScorerError(f"scorer={spec!r} is not a built-in scorer ({', '.join(BUILTINS)}); {_HOW}.")
    if not target or not _IDENT.match(fn):
        raise ScorerError(f"scorer={spec!r}: expected TARGET:FUNCTION with a Python function name after the "
                          f"last ':' (got {fn!r}); {_HOW}.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ScorerError(f"scorer={spec!r}: the file {target} does not exist; give the path of a Python "
                              "file (relative to the current directory) that defines the function.")
        return "file", path, fn
    if not all(_IDENT.match(part) for part in target.split(".")):
        raise ScorerError(f"scorer={spec!r}: {target!r} is neither a dotted module path nor a .py file; {_HOW}.")
    return "module", target, fn


class Scorer:
    """A loaded scorer: ``scorer(prediction, reference) -> float`` in [0, 1], checked on every call."""

    def __init__(self, spec: str, fn: Callable[[str, str], object], description: str):
        self.spec, self.fn, self.description = spec, fn, description

    def __call__(self, prediction: str, reference: str) -> float:
        try:
            value = self.fn(prediction, reference)
        except Exception as exc:  # the user's function failed: say which, with what it raised
            raise ScorerError(f"scorer={self.spec!r} raised {type(exc).__name__}: {exc} (on reference "
                              f"{_short(reference)!r}); fix the function so it returns a score for any "
                              "two strings.") from exc
        return self._value(value, reference)

    def _value(self, value: object, reference: str) -> float:
        if hasattr(value, "item") and not isinstance(value, numbers.Real):  # a numpy / torch scalar
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise ScorerError(f"scorer={self.spec!r} returned {type(value).__name__} {_short(repr(value))} (on "
                              f"reference {_short(reference)!r}); it must return a bool or a number in [0, 1].")
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ScorerError(f"scorer={self.spec!r} returned {value} (on reference {_short(reference)!r}); scores "
                              "must lie in [0, 1] (scale it, e.g. divide a percentage by 100).")
        return value

    def check(self, references: Sequence[str]) -> None:
        """Call the scorer on ``(ref, ref)`` for every reference: a function that raises or returns no
        score fails here, before any training, rather than at the first evaluation."""
        for ref in references:
            self(ref, ref)

    def __repr__(self) -> str:
        return f"Scorer({self.spec!r})"


def load_scorer(spec: str) -> Scorer:
    """Resolve ``spec`` to a :class:`Scorer` (imports a module or file for a user function)."""
    kind, target, fn_name = _parse(spec)
    if kind == "builtin":
        return Scorer(spec, _BUILTIN_FNS[target], BUILTINS[target])
    if kind == "regex":
        return Scorer(spec, regex_scorer(target), f"regex {target.pattern!r} extracted from both sides")
    module = _import_file(spec, target) if kind == "file" else _import_module(spec, target)
    if not hasattr(module, fn_name):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ScorerError(f"scorer={spec!r}: {target} defines no {fn_name!r}"
                          + (f" (its functions: {', '.join(names[:10])})" if names else "")
                          + "; name a function defined there.")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ScorerError(f"scorer={spec!r}: {target}:{fn_name} is a {type(fn).__name__}, not a function; name "
                          "a function (prediction: str, reference: str) -> float | bool.")
    return Scorer(spec, fn, f"{fn_name} from {target}")


def _import_module(spec: str, dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name and (dotted == exc.name or dotted.startswith(exc.name + ".")):
            raise ScorerError(f"scorer={spec!r}: no module named {exc.name!r}; put its directory on PYTHONPATH, "
                              "or give the file: path/to/file.py:function.") from None
        raise ScorerError(f"scorer={spec!r}: importing {dotted} failed ({exc}); install what it needs.") from exc
    except Exception as exc:  # the module's own code failed while importing
        raise ScorerError(f"scorer={spec!r}: importing {dotted} failed ({type(exc).__name__}: {exc}); fix the "
                          "module.") from exc


def _import_file(spec: str, path: Path):
    path = path.resolve()
    name = "lorakit_scorer_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ScorerError(f"scorer={spec!r}: {path} cannot be imported as a Python file; give a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # a syntax error or a failing import in the user's file
        raise ScorerError(f"scorer={spec!r}: running {path} failed ({type(exc).__name__}: {exc}); fix the "
                          "file.") from exc
    return module


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
