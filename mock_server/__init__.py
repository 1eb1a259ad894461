"""The bundled Durable Streams session server.

Run it with ``python -m mock_server`` (or the ``durable-server`` command).
Embed it with :func:`mock_server.testing.serve` or :func:`build_app`.

The names below are imported on first use (PEP 562), so importing the package,
or a light module of it such as the chaos pytest plugin, needs none of the
server's dependencies: an SDK-only install keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

if TYPE_CHECKING:
    from ._http import DurableStreamsApp, ServerConfig
    from ._server import Settings, build_app, run
    from ._storage import MemoryStorage, SqliteStorage, Storage
    from ._store import ProtocolError, StreamStore

__all__ = [
    "DurableStreamsApp",
    "MemoryStorage",
    "ProtocolError",
    "ServerConfig",
    "Settings",
    "SqliteStorage",
    "Storage",
    "StreamStore",
    "build_app",
    "run",
]

# Where each public name lives.
_MODULES = {
    "DurableStreamsApp": "._http",
    "ServerConfig": "._http",
    "Settings": "._server",
    "build_app": "._server",
    "run": "._server",
    "MemoryStorage": "._storage",
    "SqliteStorage": "._storage",
    "Storage": "._storage",
    "ProtocolError": "._store",
    "StreamStore": "._store",
}


__getattr__, __dir__ = lazy_names(__name__, _MODULES, globals())
