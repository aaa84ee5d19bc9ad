"""The import graph of colocate/ and kernels/: no cycle between modules, and no arrow
from a lower layer to a higher one (function-level imports included: a lazy import
is an arrow too). The layers are the README's code map, lowest first."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each unit is a top-level module or package of colocate. A unit may import units of
# its own layer or below. The engine and the model are peers: the engine drives a
# runner it is given and imports no model code.
LAYERS = [
    {"version", "sizes", "sampling_params", "cpu_features", "config_values",
     "config_topology", "config_batching", "prompt_inputs", "kernels", "progress"},
    {"engine", "model"},
    {"quant", "presets"},
    {"worker", "config", "config_service"},
    {"memory"},
    {"metrics", "llm"},
    {"service"},
    {"client"},
    {"cluster"},
    {"serve_demo", "demo", "top_view", "top", "cli"},
]
FACADE = "colocate"            # the package __init__: it may import anything, nothing imports it


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((REPO / "colocate").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "proto_gen" not in parts:
            mods[".".join(parts)] = path
    for path in sorted((REPO / "kernels").glob("*.py")):
        mods["colocate.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """colocate modules `path` imports; `from pkg import mod` counts as pkg.mod."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("colocate"):
                continue
            subs = [f"{node.module}.{a.name}" for a in node.names]
            out |= ({s for s in subs if s in mods} if all(s in mods for s in subs)
                    else {node.module})
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("colocate")}
    return {m for m in out if m in mods}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def test_no_import_cycle(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):                                  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_arrow_runs_up(graph):
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    units = {_unit(m) for m in graph}
    assert units - {FACADE} <= set(layer), f"unplaced: {sorted(units - set(layer) - {FACADE})}"
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if _unit(m) != FACADE and (_unit(t) == FACADE
                                               or layer[_unit(t)] > layer[_unit(m)]))
    assert not upward, upward


def test_modules_stay_under_400_lines():
    long = [f"{p.relative_to(REPO)} ({n})" for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
