"""Reads a notebook's code without running it: every tfxfer (or recipe) call it makes.

The executed notebooks are in the large tier; this is the default tier's cheap check that
each call still resolves (the module, class or method exists) and binds to its signature
(no unknown or missing argument), so a renamed function or keyword shows in seconds.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass

import nbformat

# Only calls into these packages are checked: `print`, numpy or TensorFlow calls are not ours.
CHECKED_PACKAGES = ("tfxfer", "recipes")


@dataclass
class Call:
    """One call in a notebook: where it is, what it names, and what it resolved to."""

    cell: int
    line: int
    text: str
    target: object
    node: ast.Call


def code_cells(path) -> list[str]:
    """The notebook's code cells, IPython magics and shell lines turned into `pass`."""
    notebook = nbformat.read(str(path), as_version=4)
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = [
            _indent(line) + "pass" if line.lstrip().startswith(("%", "!")) else line
            for line in cell.source.splitlines()
        ]
        cells.append("\n".join(lines))
    return cells


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _ours(value) -> bool:
    module = getattr(value, "__module__", None) or getattr(value, "__name__", "")
    return str(module).split(".")[0] in CHECKED_PACKAGES


class _Resolver:
    """Follows a notebook's imports and simple assignments to the objects its calls name."""

    def __init__(self):
        self.names: dict[str, object] = {}  # a module, function or class, by notebook name
        self.instances: dict[str, type] = {}  # a variable holding an instance of a tfxfer class

    def imports(self, node) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in CHECKED_PACKAGES:
                    root = alias.name.split(".")[0]
                    module = importlib.import_module(alias.name)
                    self.names[alias.asname or root] = (
                        module if alias.asname else importlib.import_module(root)
                    )
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in CHECKED_PACKAGES:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if hasattr(module, alias.name):
                        value = getattr(module, alias.name)
                    else:  # a submodule: `from recipes import bert_mlm_pretrain`
                        value = importlib.import_module(f"{node.module}.{alias.name}")
                    self.names[alias.asname or alias.name] = value

    def resolve(self, expr) -> tuple[object, bool] | None:
        """`(object, is an instance method looked up on its class)`, or None when not ours."""
        if isinstance(expr, ast.Name):
            if expr.id in self.names:
                return self.names[expr.id], False
            return None
        if isinstance(expr, ast.Attribute):
            if isinstance(expr.value, ast.Name) and expr.value.id in self.instances:
                return _instance_attribute(self.instances[expr.value.id], expr.attr)
            inner = self.resolve(expr.value)
            if inner is None:
                return None
            # A missing attribute raises: the notebook names something that is gone.
            return getattr(inner[0], expr.attr), False
        return None

    def assign(self, node: ast.Assign) -> None:
        """`clf = tfxfer.Classifier.from_folder(...)`: `clf` is a Classifier from here on."""
        if not (isinstance(node.value, ast.Call) and len(node.targets) == 1):
            return
        target = node.targets[0]
        if not isinstance(target, ast.Name):
            return
        resolved = self.resolve(node.value.func)
        if resolved is None:
            self.instances.pop(target.id, None)
            return
        value = resolved[0]
        if inspect.isclass(value) and _ours(value):
            self.instances[target.id] = value
        elif inspect.ismethod(value) and inspect.isclass(value.__self__):
            self.instances[target.id] = value.__self__  # a classmethod constructor


def _instance_attribute(cls: type, name: str) -> tuple[object, bool] | None:
    """`instance.name` for an instance of `cls`: a method, or None for a data attribute.

    A data attribute (set in `__init__`) has no type to follow; a name that is neither a
    class attribute nor assigned as `self.name` in the class's source raises AttributeError.
    """
    attribute = inspect.getattr_static(cls, name, None)
    if inspect.isfunction(attribute):
        return attribute, True  # a plain method: bound with a placeholder `self`
    if isinstance(attribute, classmethod | staticmethod):
        return getattr(cls, name), False
    if attribute is not None:
        return None  # a property or class-level value
    assigned = any(f"self.{name} =" in inspect.getsource(k) for k in cls.__mro__[:-1])
    if not assigned:
        raise AttributeError(f"{cls.__name__} instances have no attribute {name!r}")
    return None


def notebook_calls(path) -> list[Call]:
    """Every call to a tfxfer or recipes object in the notebook, in order, resolved.

    Raises AttributeError or ImportError where a name the notebook uses no longer exists.
    """
    resolver = _Resolver()
    calls = []
    for index, source in enumerate(code_cells(path)):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                resolver.imports(node)
        for statement in tree.body:
            # Assignments first (those inside a `def` or loop too), so the calls see them.
            assignments = [n for n in ast.walk(statement) if isinstance(n, ast.Assign)]
            for assignment in sorted(assignments, key=lambda n: n.lineno):
                resolver.assign(assignment)
            for node in ast.walk(statement):
                if not isinstance(node, ast.Call):
                    continue
                resolved = resolver.resolve(node.func)
                if resolved is None or not _ours(resolved[0]) or inspect.ismodule(resolved[0]):
                    continue
                target, unbound = resolved
                target = (target, "unbound") if unbound else target
                calls.append(Call(index, node.lineno, ast.unparse(node.func), target, node))
    return calls


def bind(call: Call) -> inspect.BoundArguments | None:
    """Binds the call's arguments (as placeholders) to its target's signature.

    Returns None for a call with `*args` or `**kwargs` (nothing to check); raises TypeError
    where the notebook passes an argument the signature does not take, or misses one.
    """
    node = call.node
    if any(isinstance(a, ast.Starred) for a in node.args) or any(
        k.arg is None for k in node.keywords
    ):
        return None
    target, args = call.target, [object() for _ in node.args]
    if isinstance(target, tuple):  # an instance method looked up on its class: add `self`
        target = target[0]
        args = [object(), *args]
    signature = inspect.signature(target)
    return signature.bind(*args, **{k.arg: object() for k in node.keywords})
