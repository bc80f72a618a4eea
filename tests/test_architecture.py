"""The shape of the house (docs/architecture.md), checked from the source with `ast`.

Every import (module-level or inside a function) runs one way: from a higher layer to a lower
one or within a layer, never up, and never round in a circle. No module passes 500 lines, no
function 100, and no call passes more than five positional arguments (pass one object, or
keywords). A new module must be given its layer in `LAYERS`, which is how the table stays true.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("tfxfer", "recipes")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
MAX_POSITIONAL_ARGUMENTS = 5

# Lowest first. A module may import its own layer and those below it. Prefixes end with "."
# for a package's modules, exact names otherwise; the longest matching entry wins.
LAYERS: list[tuple[str, ...]] = [
    ("tfxfer.errors", "tfxfer.fs", "tfxfer.startup", "tfxfer.keras_compat", "tfxfer.runlock"),
    ("tfxfer.boundary", "tfxfer.flags"),
    ("tfxfer.layers", "tfxfer.layers."),
    ("tfxfer.saving",),
    ("tfxfer.rundir",),
    ("tfxfer.runs",),
    ("tfxfer.backbones", "tfxfer.backbones."),
    (
        "tfxfer.data",
        "tfxfer.data.",
        "tfxfer.demo_data",
        "tfxfer.demo_data.",
        "tfxfer.schedule",
        "tfxfer.stage",
        "tfxfer.distribute",
        "tfxfer.cluster",
        "tfxfer.heads",
        "tfxfer.model",
        "tfxfer.fusion",
        "tfxfer.regularizers",
        "tfxfer.batchnorm",
        "tfxfer.solver",
        "tfxfer.solver_core",
        "tfxfer.transferability",
        "tfxfer.strategies",
    ),
    ("tfxfer.train", "tfxfer.train."),
    ("tfxfer.export", "tfxfer.export.", "tfxfer.report", "tfxfer.report.", "tfxfer.prediction"),
    (
        "tfxfer.recipe",
        "tfxfer.recipe.",
        "tfxfer.configfile",
        "tfxfer.recipe_index",
        "tfxfer.pretrain",
        "tfxfer.pretrain.",
    ),
    ("tfxfer.classifier", "tfxfer.cli"),
    ("tfxfer",),
    ("recipes", "recipes."),
]


def _module_files() -> dict[str, pathlib.Path]:
    found = {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _module_files()


def layer_of(module: str) -> int | None:
    best, best_length = None, -1
    for rank, entries in enumerate(LAYERS):
        for entry in entries:
            matches = module.startswith(entry) if entry.endswith(".") else module == entry
            if matches and len(entry) > best_length:
                best, best_length = rank, len(entry)
    return best


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported tfxfer module, line) for every import in `tree`, typing-only ones left out."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skipped.update(id(child) for body in node.body for child in ast.walk(body))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _resolve(alias.name, []), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            yield _resolve(base, [alias.name for alias in node.names]), node.lineno


def _resolve(base: str, names: list[str]) -> str | None:
    # `from tfxfer import fs` imports the module tfxfer.fs, not the package's __init__.
    for name in names:
        if f"{base}.{name}" in MODULES:
            return f"{base}.{name}"
    return base if base in MODULES else None


def _import_graph() -> dict[str, list[tuple[str, int]]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = _imports(tree, module, path.name == "__init__.py")
        graph[module] = [(target, line) for target, line in edges if target and target != module]
    return graph


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    missing = sorted(module for module in MODULES if layer_of(module) is None)
    assert not missing, f"give these modules a layer in LAYERS (this file): {missing}"


def test_no_import_circles():
    cycles = _cycles(_import_graph())
    assert not cycles, f"import circles: {cycles}"


def test_no_import_runs_upward():
    upward = []
    for module, edges in _import_graph().items():
        for target, line in edges:
            here, there = layer_of(module), layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{MODULES[module].relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


def test_no_module_is_too_long():
    long = {
        str(path.relative_to(REPO)): lines
        for path in MODULES.values()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def _functions_and_calls():
    for path in MODULES.values():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            yield path.relative_to(REPO), node


def test_no_function_is_too_long():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in _functions_and_calls()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_call_has_too_many_positional_arguments():
    crowded = [
        f"{path}:{node.lineno} ({len(node.args)} positional arguments)"
        for path, node in _functions_and_calls()
        if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL_ARGUMENTS
    ]
    assert not crowded, "calls with too many positional arguments:\n" + "\n".join(crowded)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import tfxfer.train\n", "tfxfer.train"),
        ("from tfxfer import fs\n", "tfxfer.fs"),
        ("def f():\n    from tfxfer.cli import main\n", "tfxfer.cli"),
    ],
)
def test_the_checks_see_every_kind_of_import(source, expected):
    # The graph must not miss function-level imports or `from package import module`.
    found = [target for target, _ in _imports(ast.parse(source), "tfxfer.errors", False)]
    assert found == [expected]


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert _cycles(graph) == [["a", "b", "c"]]
