"""Import rules between the layers (DESIGN.md): the SDK stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_the_sdk_imports_neither_the_server_nor_textual() -> None:
    modules = imported_after("import durable_client")
    assert "mock_server" not in modules
    assert "textual" not in modules
    assert "uvicorn" not in modules


def sdk_modules_imported_by(package: Path) -> set[str]:
    """The ``durable_client`` modules that a package's source imports."""
    found: set[str] = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "durable_client"
            ):
                if node.module == "durable_client":
                    found.update(f"durable_client.{alias.name}" for alias in node.names)
                else:
                    found.add(str(node.module))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("durable_client"))
    return found


def _private(modules: set[str]) -> set[str]:
    return {m for m in modules if any(part.startswith("_") for part in m.split(".")[1:])}


def test_the_server_uses_only_the_public_sdk() -> None:
    assert "textual" not in imported_after("import mock_server")
    assert _private(sdk_modules_imported_by(ROOT / "mock_server")) == set()


def test_the_chat_app_uses_only_the_public_sdk() -> None:
    assert _private(sdk_modules_imported_by(ROOT / "tui_demo")) == set()


def _runtime_imports(source: Path, package: str) -> set[str]:
    """The modules of ``package`` that ``source`` imports when it runs (not for typing)."""
    tree = ast.parse(source.read_text(), str(source))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    here = source.relative_to(ROOT).with_suffix("").parts
    if here[-1] == "__init__":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = list(here[: len(here) - node.level + (1 if source.name == "__init__.py" else 0)])
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
        else:
            module = node.module or ""
        if module.startswith(package):
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _cycles(package: str) -> list[list[str]]:
    root = ROOT / package
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {
        name: {m for m in _runtime_imports(path, package) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ re-exporting its modules is not a circle of logic.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_circles_in_the_sdk() -> None:
    assert _cycles("durable_client") == []


def test_no_import_circles_in_the_server() -> None:
    assert _cycles("mock_server") == []
