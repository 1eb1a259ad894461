"""The server's layers: it uses only the SDK's public API, and its imports go one way."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mock_server"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports, anywhere in it (lazy and type-checking imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # ``from . import x`` and ``from .chaos import plan`` import submodules.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_the_server_imports_no_private_sdk_module() -> None:
    offenders = [
        f"{name} imports {target}"
        for name, path in modules().items()
        for target in imported(name, path)
        if target.startswith("durable_client.")
        and any(part.startswith("_") for part in target.split(".")[1:])
    ]
    assert offenders == [], "use durable_client.wire or the package root"


def test_the_server_has_no_import_circle() -> None:
    known = modules()
    graph = {
        name: sorted({t for t in imported(name, path) if t in known and t != name})
        for name, path in known.items()
    }
    # Depth-first search; a module met again while it is on the path closes a circle.
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circles.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for target in graph[name]:
            visit(target, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])
    assert circles == []
