"""Session transports: how a :class:`~durable_client.Session` reaches its stream.

A session takes ``transport="auto"`` (the default), ``"websocket"`` or
``"http"``, or one of these objects, which carry the transport's settings::

    Session(url, "demo", author=me, transport=HttpTransport(live="long-poll"))
    Session(url, "demo", author=me, transport=AutoTransport(headers={"Authorization": token}))
    Session("memory://test", "demo", author=me, transport=MemoryTransport())

- :class:`AutoTransport`: WebSocket where the server offers it, else HTTP;
- :class:`HttpTransport`: the Durable Streams HTTP protocol (SSE, then long-poll);
- :class:`WebSocketTransport`: our WebSocket extension, with presence
  (:class:`WebSocketOptions`, :class:`PresenceFeed`);
- :class:`MemoryTransport`: streams held in this process, to test an app or
  an agent without a server.

:class:`SessionTransport` is the seam they all implement (and any object of
yours may): six calls, with :class:`TransportBatch` as what a read yields.
:class:`UnboundTransport` is settings a session binds to its own stream,
lending it :class:`SessionDefaults` (its policies) for what the settings leave unset.
"""

from __future__ import annotations

from ._auto import AutoTransport
from ._http import HttpLiveMode, HttpTransport
from ._memory import MemoryTransport
from ._transport import (
    PresenceTransport,
    SessionDefaults,
    SessionTransport,
    TransportBatch,
    UnboundTransport,
)
from ._ws import PresenceFeed, WebSocketOptions, WebSocketTransport

__all__ = [
    "AutoTransport",
    "HttpLiveMode",
    "HttpTransport",
    "MemoryTransport",
    "PresenceFeed",
    "PresenceTransport",
    "SessionDefaults",
    "SessionTransport",
    "TransportBatch",
    "UnboundTransport",
    "WebSocketOptions",
    "WebSocketTransport",
]
