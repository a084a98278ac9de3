"""The toolkit's modules share code through public names: none reaches into another module's private ones."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extraction", "geometry", "heads", "icl_geometry", "training_lab", "benchmarks")


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_module_imports_private_names():
    modules = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    found = {str(path.relative_to(ROOT)): names for path in modules if (names := _private_imports(path))}
    assert not found, f"private names imported across modules: {found}"
