"""The clients under test, behind one shape: an async iterator of message lists.

- ``sdk``: our SDK at the stream level: ``DurableStream.follow`` (SSE,
  long-poll, plain catch-up reads) and ``WebSocketTransport.subscribe`` (ws);
- ``session``: our SDK's ``Session.subscribe``, what apps use (events parsed,
  exactly once, resumed after any failure);
- ``upstream``: the upstream Python client, ``durable_streams.astream``;
- (the bare clients, :mod:`bench._rawhttp` and :mod:`bench._wsclient`, are
  used directly for the server's own cost of an append).

Every reader yields the messages of each batch as it arrives, so the caller
timestamps deliveries the same way for all of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import random
import ssl
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, cast

import httpx

from durable_client import Author, ReconnectPolicy, Session
from durable_client.streams import DurableStream, ReadBatch
from durable_client.transports import HttpTransport, TransportBatch, WebSocketTransport

from ._report import SDK, UPSTREAM

JSON = "application/json"
AUTHOR = {"id": "bench-agent", "kind": "agent", "name": "bench"}

#: What the SDK uses between reconnects in the benchmarks: its defaults.
RECONNECT = ReconnectPolicy()


def upstream_unavailable() -> str | None:
    if importlib.util.find_spec("durable_streams") is None:
        return "the upstream client is not installed (pip install 'durable-sessions[bench]')"
    return None


def new_name(kind: str) -> str:
    """A fresh stream name; under ``sessions/`` so a ``Session`` can read it too."""
    return f"sessions/bench-{kind}-{uuid.uuid4().hex[:12]}"


def stream_url(base: str, name: str) -> str:
    return f"{base}/v1/stream/{name}"


def event(index: int, run: str, text: str = "token ") -> dict[str, Any]:
    """A session ``text_delta`` event; ``index`` is how the benchmarks find it again."""
    return {
        "type": "text_delta",
        "event_id": f"{run}{index:012d}",
        "author": AUTHOR,
        "turn_id": run,
        "ts": 1.7e9,
        "text": text,
        "index": index,
    }


def event_bytes(index: int, run: str) -> bytes:
    return json.dumps(event(index, run), separators=(",", ":")).encode()


@functools.cache
def _tls() -> ssl.SSLContext:
    # Everything here is plain HTTP on loopback, but httpx builds a TLS context
    # (loading the CA bundle, ~20 ms) for every client unless it is given one.
    return ssl.create_default_context()


def http_client(connections: int) -> httpx.AsyncClient:
    """An httpx client with room for ``connections`` connections kept alive."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, read=120.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        verify=_tls(),
    )


async def create_stream(base: str, name: str, http: httpx.AsyncClient) -> DurableStream:
    stream = DurableStream(stream_url(base, name), client=http, content_type=JSON)
    await stream.create(content_type=JSON)
    return stream


async def fill(stream: DurableStream, count: int, run: str, *, batch: int = 1000) -> None:
    """Append events ``0 .. count-1``, ``batch`` per request."""
    for start in range(0, count, batch):
        await stream.append_json(*(event(i, run) for i in range(start, min(count, start + batch))))


OnRetry = Callable[[int, float, BaseException], None]


def websocket_transport(base: str, name: str, http: httpx.AsyncClient) -> WebSocketTransport:
    """The SDK's WebSocket transport for stream ``name`` (HTTP only for create and tail)."""
    return WebSocketTransport(DurableStream(stream_url(base, name), client=http, content_type=JSON))


def session(
    base: str,
    name: str,
    http: httpx.AsyncClient,
    transport: str,
    *,
    rng: random.Random | None = None,
) -> Session:
    """A ``Session`` on stream ``name`` over ``transport`` (ws, sse or long-poll)."""
    session_id = name.removeprefix("sessions/")
    author = Author.user("bench-reader")
    if transport == "ws":
        return Session(
            base, session_id, author=author, transport=WebSocketTransport(client=http), rng=rng
        )
    live: Any = transport
    return Session(
        base, session_id, author=author, transport=HttpTransport(live=live, client=http), rng=rng
    )


async def read(
    client: str,
    transport: str,
    base: str,
    name: str,
    http: httpx.AsyncClient,
    *,
    live: bool = True,
    offset: str = "-1",
    on_retry: OnRetry | None = None,
) -> AsyncIterator[Sequence[Any]]:
    """Batches of messages of stream ``name`` from ``offset``, as one client reads them.

    ``live=False`` reads up to the tail and stops (a catch-up); otherwise the
    reader tails until cancelled. The SDK reader reconnects by itself
    (``on_retry`` is told the delays); the others do not.
    """
    url = stream_url(base, name)
    if client == SDK and transport == "ws":
        ws = websocket_transport(base, name, http)
        try:
            frames = cast(AsyncGenerator[TransportBatch, None], ws.subscribe(offset))
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    yield frame.messages
                    if not live and frame.up_to_date:
                        return
        finally:
            await ws.aclose()
        return
    if client == SDK:
        stream = DurableStream(url, client=http, content_type=JSON, reconnect=RECONNECT)
        mode: Any = transport if live else False
        # follow() is an async generator: close it (and its connection) when we stop.
        batches = cast(
            AsyncGenerator[ReadBatch, None], stream.follow(offset, live=mode, on_retry=on_retry)
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield batch.messages
        return
    if client == UPSTREAM:
        from durable_streams import astream

        upstream_live: Any = transport if live else False
        async with astream(url, offset=offset, live=upstream_live, client=http) as response:
            async for items in response.iter_json_batches():
                yield items
        return
    raise ValueError(f"unknown client {client!r}")
