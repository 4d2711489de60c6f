"""The house's rules, read from the code's own imports (every import, function-level ones included): model/ never
reaches up to the packages built on it, its subpackages import only the layers below them, no two modules import
each other through any chain, and no module of model/ outgrows 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
ABOVE_MODEL = {"ckpt", "eval", "demo", "benchmarks", "deepresonance_cli", "tests"}
# the data flow, bottom up: a subpackage may import its own layer's modules and any lower layer's, never a higher one
LAYERS = [
    {"config", "original_config", "io"},
    {"media"},
    {"text"},
    {"network"},
    {"engine", "data"},
    {"generate"},
    {"infer", "serve", "train"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code, as absolute dotted names; `from pkg import sub` of a
    submodule is an edge to `pkg.sub` (not to the package's __init__, which Python runs first anyway)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update(subs)
            if not all(is_module(s) for s in subs):
                found.add(node.module)
    return found


def is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def model_modules() -> dict[str, Path]:
    return {module_name(p): p for p in MODEL.rglob("*.py")}


def test_every_model_subpackage_has_a_layer():
    """A new folder must be placed in the data flow before it can be used (else the rules below would skip it)."""
    tops = {module_name(p).split(".")[1] for p in MODEL.rglob("*.py") if p.parent != MODEL or p.stem != "__init__"}
    assert tops <= set(LAYER), f"place {sorted(tops - set(LAYER))} in LAYERS"


def test_model_imports_nothing_built_on_it():
    upward = [
        f"{name} imports {target}"
        for name, path in model_modules().items()
        for target in imports(path)
        if target.split(".")[0] in ABOVE_MODEL
    ]
    assert not upward, upward


def test_subpackages_import_only_their_own_layer_and_below():
    upward = []
    for name, path in model_modules().items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        for target in imports(path):
            tparts = target.split(".")
            if tparts[0] != "model" or len(tparts) < 2 or tparts[1] not in LAYER:
                continue
            if LAYER[tparts[1]] > LAYER[parts[1]] or (LAYER[tparts[1]] == LAYER[parts[1]] and tparts[1] != parts[1]):
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_no_import_cycles_in_the_repository():
    """Modules of every package (model, ckpt, eval, demo, benchmarks, the CLI) as nodes, imports as edges."""
    files = [
        p
        for top in ("model", "ckpt", "eval", "demo", "benchmarks", "deepresonance_cli")
        for p in (ROOT / top).rglob("*.py")
    ]
    modules = {module_name(p): p for p in files}
    graph = {name: {t for t in imports(path) if t in modules and t != name} for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles[:5]


@pytest.mark.parametrize("path", sorted(MODEL.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_model_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
