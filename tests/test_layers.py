"""The package's layers, read from the source: imports point down, never back up.

The order, lowest first: crypto and protocol (side by side, torch-free) < dp < data and models
< fl < deploy, report and bench < cli. The top-level modules (errors, config, plugins,
metrics, validate...) are shared helpers outside the order and are not checked here.

Imports are read with ``ast`` (nothing is imported), so an arrow hidden inside a function counts
too unless a check says "module level". Strings resolved at run time (``plugins`` registries'
``"module:attr"`` targets, ``importlib.import_module``) are deliberately not arrows.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "securefed"

RANK = {
    "crypto": 0,
    "protocol": 0,
    "dp": 1,
    "data": 2,
    "models": 2,
    "fl": 3,
    "deploy": 4,
    "report": 4,
    "bench": 4,
    "cli": 5,
}
LOWER = ("crypto", "dp", "data", "models")
UPPER = ("securefed.fl", "securefed.deploy", "securefed.cli", "securefed.report", "securefed.bench")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files(layer: str) -> list[Path]:
    """Source files of ``securefed/<layer>``: a package's modules, or the one module file."""
    folder = PACKAGE / layer
    if folder.is_dir():
        return sorted(folder.rglob("*.py"))
    return [folder.with_suffix(".py")] if folder.with_suffix(".py").exists() else []


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """Every (imported module, line, at module level) in ``path``; relative imports resolved.

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (c may be a submodule).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno, top))
            found += [(f"{base}.{alias.name}", node.lineno, top) for alias in node.names]
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "securefed" else None


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_the_scanner_sees_lazy_relative_and_from_imports(tmp_path):
    # Prepare: a module in a fake package, importing in each form the checks rely on.
    pkg = tmp_path / "securefed" / "data"
    pkg.mkdir(parents=True)
    mod = pkg / "loader.py"
    mod.write_text(
        "import torch.nn\n"
        "from . import dataset\n"
        "from ..fl import run\n"
        "def f():\n"
        "    from securefed.bench import common\n"
    )

    # Execute
    found = set(_imports(mod, root=tmp_path))

    # Assert
    assert ("torch.nn", 1, True) in found
    assert ("securefed.data.dataset", 2, True) in found
    assert ("securefed.fl.run", 3, True) in found
    assert ("securefed.bench.common", 5, False) in found


@pytest.mark.parametrize("layer", ["crypto", "protocol"])
def test_crypto_and_protocol_import_no_torch(layer):
    files = _files(layer)
    assert files, f"securefed/{layer} not found"

    torch = [
        _where(path, line, module)
        for path in files
        for module, line, _ in _imports(path)
        if module == "torch" or module.startswith("torch.")
    ]

    assert not torch, torch


def test_importing_crypto_and_protocol_does_not_load_torch():
    # The ast check sees direct imports only; this catches torch pulled in through a helper.
    modules = [_module_name(p) for layer in ("crypto", "protocol") for p in _files(layer)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'opacus', 'monai') if m in sys.modules))\n"
    )

    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_no_data_module_imports_the_dispatcher():
    # dataset.py imports the loaders; a loader importing it back closes a circle.
    back = [
        _where(path, line, module)
        for path in _files("data")
        if path.name not in ("dataset.py", "__init__.py")
        for module, line, _ in _imports(path)
        if module == "securefed.data.dataset"
    ]

    assert not back, back


def test_data_modules_import_each_other_without_a_cycle():
    # Prepare: the import graph among securefed.data's modules (lazy imports included).
    files = {_module_name(p): p for p in _files("data") if p.name != "__init__.py"}
    edges = {
        name: {m for m, _, _ in _imports(path) if m in files and m != name}
        for name, path in files.items()
    }

    # Execute / Assert: a topological order exists only without a cycle.
    try:
        order = list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert order.index("securefed.data.bundle") < order.index("securefed.data.dataset")


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_import_no_upper_layer_at_module_level(layer):
    up = [
        _where(path, line, module)
        for path in _files(layer)
        for module, line, top in _imports(path)
        if top and any(module == u or module.startswith(u + ".") for u in UPPER)
    ]

    assert not up, up


@pytest.mark.parametrize(
    "layer",
    list(RANK),
)
def test_no_layer_imports_a_higher_one_anywhere(layer):
    # Lazy imports count: an arrow inside a function is still an arrow back up.
    up = [
        _where(path, line, module)
        for path in _files(layer)
        for module, line, _ in _imports(path)
        if RANK.get(_layer_of(module) or "", -1) > RANK[layer]
    ]

    assert not up, up
