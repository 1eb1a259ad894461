"""Names a package imports on first use (PEP 562).

``mock_server`` and ``mock_server.chaos`` list where each public name lives
and import it when it is first asked for, so importing the package (the
chaos pytest plugin does, in every pytest run of a venv with the SDK) needs
none of the server's dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, modules: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__``: ``modules`` maps each name to the
    relative module it lives in; a name, once imported, is kept in ``namespace``."""

    def getattr_(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *modules})

    return getattr_, dir_
