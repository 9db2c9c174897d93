"""The package's imports flow one way and have no cycles (docs/ARCHITECTURE.md, "Dependency direction").

Every ``import`` / ``from … import`` in every module of ``src/lorakit`` is read with ``ast`` — at module
level AND inside functions (a function-local import is still a dependency). Importing ``a.b.c`` also
runs the packages ``a.b`` (their ``__init__``), so those edges count too (except the root package,
which Python runs before any submodule anyway). The test fails on

* an upward import: a module of a lower layer importing a higher one
  (core ← quant ← variants ← data ← train ← eval ← cli);
* a cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lorakit

ROOT = Path(lorakit.__file__).parent
#: layer of each top-level module / subpackage of lorakit (lower number = lower layer)
LAYERS = {
    # core
    "errors": 0, "_fs": 0, "config": 0, "layers": 0, "adapter_kinds": 0, "state": 0, "inject": 0,
    "adapters": 0, "io": 0, "combine": 0, "summary": 0, "hooks": 0, "config_slices": 0,
    "_threads": 0, "_txn": 0, "_cbuild": 0, "validate": 0, "losses": 0, "offload": 0, "peft_compat": 0, "peft_fields": 0, "peft_rules": 0, "peft_defaults": 0, "tied": 0, "init_conversion": 0,
    "quant": 1,
    "__init__": 1,  # the public API facade: core, plus quantize_model (imported when called)
    "variants": 2,
    "loralib": 2,  # loralib's API over the core's host and adapter kinds (a compatibility layer)
    "variants.sdft": 3,  # a data transform over the task formats (it reads lorakit.tasks): sits with data
    "data": 3, "tasks": 3,
    "train": 4, "diffusion": 4,  # image LoRAs: uses core, train's checkpoints; nothing imports it below cli
    "eval": 5,
    "cli": 6,
}
LAYER_NAMES = ["core", "quant", "variants", "data", "train", "eval", "cli"]


def _module_name(path: Path) -> str:
    parts = ["lorakit", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py") if "assets" not in p.parts}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The lorakit module ``name`` refers to (the longest existing prefix), or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(mod: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """(target module, line) for every lorakit import in ``path`` (anywhere in the file)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from x import y` imports x, and x.y when y is a module
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("lorakit"):
                continue
            target = _resolve(name, modules)
            if target is None or target == mod or mod.startswith(target + "."):
                continue  # itself, or a package it is part of (already initialising: `from . import x`)
            out.add((target, node.lineno))
            parts = target.split(".")
            for i in range(2, len(parts)):  # parent packages run their __init__ first
                parent = ".".join(parts[:i])
                if parent != mod and parent in modules and not mod.startswith(parent + "."):
                    out.add((parent, node.lineno))
    return out


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS.get(".".join(parts[1:3]), LAYERS[parts[1]])


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {mod: _imports(mod, path, modules) for mod, path in modules.items()}


def test_every_top_level_module_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in _modules() if "." in m} - set(LAYERS))
    assert not unknown, f"add these to LAYERS (and to docs/ARCHITECTURE.md): {unknown}"


def test_no_upward_import(graph):
    bad = [f"{mod} ({LAYER_NAMES[_layer(mod)]}) imports {target} ({LAYER_NAMES[_layer(target)]}), line {line}"
           for mod, targets in graph.items() for target, line in sorted(targets)
           if _layer(target) > _layer(mod)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle(graph):
    edges = {mod: {t for t, _ in targets if t != "lorakit"} for mod, targets in graph.items() if mod != "lorakit"}
    # Tarjan's strongly connected components: any component with more than one module is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..train import loop\n    from . import kinds\n")
    modules = {"lorakit.layers.m": src, "lorakit.train.loop": src, "lorakit.train": src, "lorakit.layers.kinds": src}
    found = {t for t, _ in _imports("lorakit.layers.m", src, modules)}
    assert found == {"lorakit.train.loop", "lorakit.train", "lorakit.layers.kinds"}
