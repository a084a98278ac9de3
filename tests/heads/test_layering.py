"""The heads modules share code through public names: none reaches into another module's private ones."""

from __future__ import annotations

import ast
from pathlib import Path

HEADS = Path(__file__).resolve().parents[2] / "heads"


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_heads_module_imports_private_names():
    found = {path.name: names for path in sorted(HEADS.glob("*.py")) if (names := _private_imports(path))}
    assert not found, f"private names imported across modules: {found}"
