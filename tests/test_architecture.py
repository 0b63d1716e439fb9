"""The package's layering: no import cycles, no private names across modules, no torch in symbolic.

Layers, each importing only from itself and the ones below (docs/architecture.md):
base (errors, checks) → symbolic → reference → numeric → experiments → interface (cli, draw).
Module-level and function-level imports both count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "perturb"
LAYERS = ("base", "symbolic", "reference", "numeric", "experiments", "interface")
MAX_LINES = 800


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> str | None:
    """The layer of a module (``None`` for the package and layer ``__init__``s)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in ("errors", "checks"):
        return "base"
    if parts[1] in ("cli", "draw", "__main__") or parts[1].startswith("cli_"):
        return "interface"
    if len(parts) == 2 and parts[1] in (*LAYERS, "reference"):
        return None
    return parts[1]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        package = package[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported perturb module, names taken from it, line)`` for every import."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("perturb"):
                found.append((arg.value, [], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("perturb")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target.startswith("perturb"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((target, [alias.name], node.lineno))
    return found


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for module in MODULES:
        for target, _, _ in imports(module):
            if target in MODULES and layer(target) is not None and layer(module) is not None:
                graph.add_edge(module, target)
    return graph


def test_every_module_has_a_layer():
    for module in MODULES:
        if module.count(".") >= 1 and layer(module) is not None:
            assert layer(module) in LAYERS, module


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, f"import cycles inside perturb: {cycles}"


def test_layers_import_only_from_below():
    bad = []
    for module in MODULES:
        own = layer(module)
        if own is None:
            continue
        for target, _, line in imports(module):
            other = layer(target) if target in MODULES else None
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{module}:{line} ({own}) imports {target} ({other})")
            if own == "reference" and other not in (None, "base", "reference"):
                bad.append(f"{module}:{line}: the reference imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for module in MODULES:
        for target, names, line in imports(module):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    bad.append(f"{module}:{line} imports {target}.{name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) == "symbolic"])
def test_symbolic_layer_imports_no_torch(module):
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        assert not any(n.split(".")[0] == "torch" for n in names), f"{module}:{node.lineno}"


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    """The checks above would fail on a planted cycle and a planted private import."""
    (tmp_path / "perturb" / "numeric").mkdir(parents=True)
    (tmp_path / "perturb" / "__init__.py").write_text("")
    (tmp_path / "perturb" / "numeric" / "__init__.py").write_text("")
    (tmp_path / "perturb" / "numeric" / "a.py").write_text("from perturb.numeric.b import _x\n")
    (tmp_path / "perturb" / "numeric" / "b.py").write_text(
        "def f():\n    import importlib\n    importlib.import_module('perturb.numeric.a')\n"
    )
    global ROOT, MODULES
    saved = ROOT, MODULES
    try:
        ROOT = tmp_path / "perturb"
        MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
        assert list(nx.simple_cycles(_graph()))
        with pytest.raises(AssertionError, match=r"perturb\.numeric\.b\._x"):
            test_no_private_names_across_modules()
    finally:
        ROOT, MODULES = saved
