"""The shape of the code (docs/ARCHITECTURE.md, "Layers"), read from the source with ``ast``:

* imports stand at module top; a function-local import is only for an optional or heavy
  third-party package (``LOCAL_IMPORTS_ALLOWED``, or one imported inside
  ``try: ... except ImportError``);
* nothing imports "upwards" (``LAYERS``), and the module import graph has no cycle;
* no underscore (private) name is imported from another module;
* nothing below ``cli/`` imports the ``symconvert`` facade (``symconvert/__init__.py``);
* no module over 450 lines, no function over 60.

Each test lists every offence at once, as ``file:line: what``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "symconvert"

#: the pipeline's layers, lowest first; a module may import its own layer or lower ones.
#: Top-level modules (errors.py, checks.py, version.py) are the foundation (layer 0).
LAYERS: dict[str, int] = {
    "errors": 0, "checks": 0, "version": 0, "options": 0,
    "schemes": 1,
    "surgery": 2,
    "models": 3,
    "tasks": 4, "io": 4,
    "train": 5, "report": 5,
    "pipeline": 6,
    "cli": 7, "__main__": 7, "__init__": 7,
}
#: third-party packages a function may import for itself: optional extras, or heavy
#: packages only one path needs
LOCAL_IMPORTS_ALLOWED = ("onnx", "onnxruntime", "matplotlib", "sklearn", "scipy",
                         "transformers", "torch_pruning", "tensorboard",
                         "torch.utils.tensorboard", "huggingface_hub", "torchvision.datasets")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (a name imported from it is resolved)
    names: tuple[str, ...]  # names imported from ``target`` (``from x import a, b``)
    line: int
    local: bool  # inside a function or class body
    where: str  # file:line
    optional: bool = False  # inside ``try: ... except ImportError``


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _is_module(dotted: str) -> bool:
    return dotted in _sources()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    path, _ = _sources()[module]
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(tree: ast.AST, local: bool = False, optional: bool = False):
    """(node, inside a function or class, inside a try that catches ImportError) for every
    import node."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local, optional
        nested = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                             ast.ClassDef))
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            continue  # typing-only imports run never
        if isinstance(child, ast.Try) and _catches_import_error(child):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), nested, True)
            for part in (*child.handlers, *child.orelse, *child.finalbody):
                yield from _walk(part, nested, optional)
            continue
        yield from _walk(child, nested, optional)


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {t.id for t in types if isinstance(t, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def _imports() -> tuple[Import, ...]:
    out = []
    for module, (path, tree) in _sources().items():
        rel = path.relative_to(PACKAGE.parent)
        for node, local, optional in _walk(tree):
            where = f"{rel}:{node.lineno}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.append(Import(module, alias.name, (), node.lineno, local, where,
                                      optional))
                continue
            target = _resolve(module, node)
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_module(sub):  # `from pkg import submodule`
                    out.append(Import(module, sub, (), node.lineno, local, where, optional))
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                out.append(Import(module, target, tuple(plain), node.lineno, local, where,
                                  optional))
    return tuple(out)


def _own(target: str) -> bool:
    return target == "symconvert" or target.startswith("symconvert.")


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def _third_party_allowed(target: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in LOCAL_IMPORTS_ALLOWED)


def test_every_package_module_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in _sources() if "." in m} - set(LAYERS))
    assert not unknown, f"add these to LAYERS (and docs/ARCHITECTURE.md): {unknown}"


def test_imports_at_module_top():
    offences = []
    for imp in _imports():
        if not imp.local:
            continue
        root = imp.target.split(".")[0]
        if _own(imp.target):
            offences.append(f"{imp.where}: {imp.target} imported inside a function")
        elif root in sys.stdlib_module_names:
            offences.append(f"{imp.where}: stdlib {imp.target} imported inside a function")
        elif not (_third_party_allowed(imp.target) or imp.optional):
            offences.append(f"{imp.where}: {imp.target} imported inside a function (not an "
                            "optional or heavy package: import it at the top)")
    assert not offences, "\n".join(offences)


def test_no_upward_imports():
    offences = [f"{imp.where}: {imp.module} (layer {_layer(imp.module)}) imports {imp.target} "
                f"(layer {_layer(imp.target)})"
                for imp in _imports() if _own(imp.target) and imp.target != "symconvert"
                and _layer(imp.target) > _layer(imp.module)]
    assert not offences, "\n".join(offences)


def test_no_facade_below_cli():
    offences = [f"{imp.where}: {imp.module} imports the symconvert facade"
                for imp in _imports() if imp.target == "symconvert"
                and _layer(imp.module) < LAYERS["cli"]]
    assert not offences, "\n".join(offences)


def test_no_private_names_across_modules():
    offences = [f"{imp.where}: {imp.module} imports {name} from {imp.target}"
                for imp in _imports() if _own(imp.target) and imp.target != imp.module
                for name in imp.names if name.startswith("_") and not name.startswith("__")]
    assert not offences, "\n".join(offences)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in _sources()}
    for imp in _imports():
        if _own(imp.target) and imp.target in graph and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # the facade imports everything by design; a cycle through it is an upward import,
    # which test_no_facade_below_cli names
    graph = {m: {t for t in ts if t != "symconvert"} for m, ts in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_module_sizes():
    offences = []
    for path, _ in _sources().values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            offences.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines "
                            f"(> {MAX_MODULE_LINES})")
    assert not offences, "\n".join(offences)


def test_function_sizes():
    offences = []
    for path, tree in _sources().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                                    f"{node.name} has {lines} lines (> {MAX_FUNCTION_LINES})")
    assert not offences, "\n".join(offences)


def test_the_checks_find_offences(tmp_path):
    """The analysis itself: a planted local import, upward import, private name and
    cycle are each found (so a passing suite means something)."""
    tree = ast.parse("import os\ndef f():\n    from symconvert.cli import app\n    import json\n"
                     "    try:\n        import click\n    except ImportError:\n        pass\n")
    found = [(n.names[0].name if isinstance(n, ast.Import) else n.module, local, optional)
             for n, local, optional in _walk(tree)]
    assert found == [("os", False, False), ("symconvert.cli", True, False),
                     ("json", True, False), ("click", True, True)]
    assert _layer("symconvert.surgery.plan") < _layer("symconvert.cli.app")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert not _third_party_allowed("torch") and _third_party_allowed("onnx.helper")
