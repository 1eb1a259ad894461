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


def test_the_server_uses_only_the_sdk_wire_definitions() -> None:
    assert "textual" not in imported_after("import mock_server")
    allowed = {"durable_client._protocol", "durable_client._ws_frames"}
    assert sdk_modules_imported_by(ROOT / "mock_server") <= allowed
