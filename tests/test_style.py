"""House rules that code review would otherwise have to catch: short functions in the library."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "siajax"
MAX_FUNCTION_LINES = 60


def long_functions(root: Path, limit: int) -> list[str]:
    """'path:line name (n lines)' for every function or method in ``root`` longer than ``limit`` lines
    (decorators and docstring included)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_library_function_is_longer_than_sixty_lines():
    assert long_functions(LIBRARY, MAX_FUNCTION_LINES) == []


def test_the_checker_finds_a_long_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("def f():\n" + "    x = 1\n" * 61 + "\n\ndef g():\n    return 1\n")
    assert long_functions(package, MAX_FUNCTION_LINES) == ["pkg/m.py:1 f (62 lines)"]
