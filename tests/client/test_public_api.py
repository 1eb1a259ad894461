"""The public API is deliberate: ``__all__`` lists exactly the public names."""

from __future__ import annotations

import subprocess
import sys

import durable_client


def test_all_matches_public_names() -> None:
    public = {name for name in vars(durable_client) if not name.startswith("_")}
    exported = set(durable_client.__all__) - {"__version__"}
    assert exported == public
    assert len(durable_client.__all__) == len(set(durable_client.__all__))


def test_every_exported_name_resolves() -> None:
    for name in durable_client.__all__:
        assert getattr(durable_client, name) is not None, name


def test_private_modules_stay_private() -> None:
    for name in vars(durable_client):
        module = getattr(durable_client, name)
        if hasattr(module, "__file__") and name != "__builtins__":
            assert name.startswith("_"), f"module {name} is exposed"


def test_sdk_imports_neither_server_nor_tui() -> None:
    code = (
        "import sys, durable_client\n"
        "bad = [m for m in ('mock_server', 'textual', 'tui_demo') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_py_typed_is_shipped() -> None:
    from pathlib import Path

    assert (Path(durable_client.__file__).parent / "py.typed").is_file()
