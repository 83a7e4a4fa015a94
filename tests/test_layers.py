"""The tree shows the layers: no module imports from a layer above its own, and no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "metaad"
# lower number = lower layer; a module may import its own layer and those below
LAYERS = {
    "errors": 0,
    "files": 0,
    "data": 1,
    "checkpoint": 1,
    "detectors": 2,
    "evaluation": 3,
    "training": 4,
    "api": 5,
    "export": 5,
    "apps": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """metaad modules ``path`` imports, at module level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "metaad" or node.module.startswith("metaad."):
                # "from metaad.data import store" imports the module metaad.data.store
                folder = PACKAGE.parent.joinpath(*node.module.split("."))
                for alias in node.names:
                    named = folder / alias.name
                    is_module = named.with_suffix(".py").is_file() or (named / "__init__.py").is_file()
                    found.add(f"{node.module}.{alias.name}" if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("metaad.")}
    return found


MODULES = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py") if "conf" not in p.parts}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if m != "metaad" and layer(m) is None]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_its_own(module):
    upward = [i for i in MODULES[module] if layer(module) is not None and (layer(i) or 0) > layer(module)]
    assert not upward, f"{module} imports {upward}"


def test_no_import_circle():
    graph = {m: {i for i in deps if i in MODULES and i != m} for m, deps in MODULES.items() if m != "metaad"}
    done, stack = set(), []

    def visit(module: str) -> None:
        if module in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(module) :], module]))
        if module in done:
            return
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if not dep.endswith("__init__"):
                visit(dep)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
