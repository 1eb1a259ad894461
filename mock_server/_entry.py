"""The ``durable-server`` command, and the check that an extra is installed.

The SDK-only install (``pip install durable-sessions``) ships the console
scripts too; without their extra they say which one to install, in one line,
instead of a traceback from a missing import.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["install_hint", "main", "missing_extra"]

DISTRIBUTION = "durable-sessions"

# The modules each extra brings (pyproject.toml's optional dependencies, by import name).
_SERVER = ("uvicorn", "httptools", "yaml")
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "server": _SERVER,
    "tui": ("textual", *_SERVER),
}


def install_hint(extra: str) -> str:
    """The pip command that adds ``extra`` to this install.

    From a checkout or a wheel file (pip records where it installed from, PEP 610)
    it names that path; otherwise the published name, and the checkout form.
    """
    try:
        origin = json.loads(metadata.distribution(DISTRIBUTION).read_text("direct_url.json") or "")
    except (metadata.PackageNotFoundError, ValueError):
        origin = None
    if isinstance(origin, dict) and str(origin.get("url", "")).startswith("file://"):
        path = Path(unquote(urlsplit(origin["url"]).path))
        if path.exists():
            editable = bool((origin.get("dir_info") or {}).get("editable"))
            return f"pip install {'-e ' if editable else ''}'{path}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]' (from a checkout: pip install '.[{extra}]')"


def missing_extra(what: str, extra: str) -> str | None:
    """One line saying that ``what`` needs ``extra`` and how to install it, or
    None when everything the extra brings is importable."""
    missing = [name for name in EXTRA_MODULES[extra] if find_spec(name) is None]
    if not missing:
        return None
    return f"{what} needs the {extra} extra ({missing[0]} is not installed): {install_hint(extra)}"


def main() -> None:
    """``durable-server``: ``python -m mock_server``, once its extra is known to be there."""
    problem = missing_extra("durable-server", "server")
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    from .__main__ import main as serve

    serve()
