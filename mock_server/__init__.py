"""The bundled Durable Streams session server.

Run it with ``python -m mock_server`` (or the ``durable-server`` command).
Embed it with :func:`mock_server.testing.serve` or :func:`build_app`.
"""

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
