"""The default session transport: WebSocket where the server offers it, else HTTP.

:class:`AutoTransport` is settings for both (the WebSocket options, and the
HTTP client, headers and retry policy they share); bound to a stream, it
chooses on first use (a subscription, an append, presence). A WebSocket
handshake refused with an HTTP status means HTTP (SSE, then long-poll) for
good; a failure to connect at all decides nothing (it is retried like any
other). A server that refuses a later handshake (redeployed without
WebSocket, or a balancer that sent the reconnect elsewhere) turns the session
to HTTP from then on as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx

from ._auth import TokenProvider
from ._core.producer import ProducerStamp
from ._core.wire import HandshakeRefused
from ._http import HttpTransport
from ._results import AppendResult
from ._retry import RetryPolicy
from ._stream import DynamicValue, session_stream
from ._transport import SessionDefaults, SessionTransport, TransportBatch, presence_unavailable
from ._ws import PresenceFeed, WebSocketOptions, WebSocketTransport, stream_name_of
from ._ws_frames import Member

__all__ = ["AutoTransport"]


class AutoTransport:
    """Settings of the default transport: WebSocket where offered, else HTTP.

    Args:
        options: keepalive, timeouts and limits of the WebSocket transport.
        client: an ``httpx.AsyncClient`` for the HTTP requests.
        headers: extra headers on every HTTP request and WebSocket handshake;
            values may be functions, called each time (a token provider).
        params: extra query parameters, likewise.
        retry: how single HTTP requests are retried (default: the session's).
        reconnect: how the socket is reopened for presence (default: the session's).
        token: an access token (or a :data:`~durable_client.streams.TokenProvider`)
            for every HTTP request, the WebSocket handshake and the socket's
            in-band refreshes (default: the session's).
    """

    def __init__(
        self,
        *,
        options: WebSocketOptions = WebSocketOptions(),  # noqa: B008 - frozen dataclass
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, DynamicValue] | None = None,
        params: Mapping[str, DynamicValue] | None = None,
        retry: RetryPolicy | None = None,
        reconnect: RetryPolicy | None = None,
        token: str | TokenProvider | None = None,
    ) -> None:
        self.options = options
        self.token = token
        self.client = client
        self.headers = dict(headers or {})
        self.params = dict(params or {})
        self.retry = retry
        self.reconnect = reconnect

    def bind(self, url: str, defaults: SessionDefaults) -> SessionTransport:
        """The transport for the stream at ``url``: HTTP alone for a stream the
        WebSocket protocol cannot address (not under ``/v1/stream/``)."""
        stream = session_stream(self, url, defaults)
        http = HttpTransport(stream)
        if stream_name_of(url) is None:
            return http
        websocket = WebSocketTransport(
            stream,
            options=self.options,
            headers=self.headers,
            params=self.params,
            reconnect=self.reconnect or defaults.reconnect,
            rng=defaults.rng,
        )
        return _AutoChoice(http, websocket)


class _AutoChoice:
    """The choice between WebSocket and HTTP for one stream, made on first use."""

    def __init__(self, http: HttpTransport, websocket: WebSocketTransport) -> None:
        self.http = http
        self.websocket = websocket
        self._chosen: HttpTransport | WebSocketTransport | None = None
        self._choosing = asyncio.Lock()
        self._wanted: Member | None = None

    @property
    def name(self) -> str:
        """``websocket``, ``sse`` or ``long-poll``; ``auto`` until the first connection."""
        return self._chosen.name if self._chosen is not None else "auto"

    @property
    def url(self) -> str:
        return self.http.url

    async def create(self) -> bool:
        return await self.http.create()

    async def tail(self) -> str:
        return await self.http.tail()

    async def choose(self) -> HttpTransport | WebSocketTransport:
        """The transport to use, deciding it on the first call."""
        if self._chosen is not None:
            return self._chosen
        async with self._choosing:
            if self._chosen is None:
                try:
                    await self.websocket.connect()
                except HandshakeRefused:
                    self._chosen = self.http
                else:
                    self._chosen = self.websocket
                    if self._wanted is not None:
                        self.websocket.want_presence(self._wanted)
            return self._chosen

    def _refused(self) -> HttpTransport:
        self._chosen = self.http
        return self.http

    async def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        transport = await self.choose()
        batches = transport.subscribe(offset)
        started = False
        try:
            while True:
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    return
                except HandshakeRefused:
                    if started or transport is not self.websocket:
                        raise
                    await _aclose(batches)
                    transport = self._refused()
                    batches = transport.subscribe(offset)
                    continue
                started = True
                yield batch
        finally:
            await _aclose(batches)

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        transport = await self.choose()
        try:
            return await transport.send_batch(items, stamp=stamp, close=close)
        except HandshakeRefused:
            if transport is not self.websocket:
                raise
        return await self._refused().send_batch(items, stamp=stamp, close=close)

    def drop_connections(self) -> None:
        if self._chosen is self.websocket:
            self.websocket.drop_connections()

    async def aclose(self) -> None:
        await self.websocket.aclose()
        await self.http.aclose()

    # --- presence --------------------------------------------------------------------

    @property
    def presence_available(self) -> bool | None:
        if self._chosen is None:
            return None
        return self._chosen is self.websocket

    @property
    def members(self) -> tuple[Member, ...]:
        return self.websocket.members if self._chosen is self.websocket else ()

    async def set_presence(self, member: Member) -> None:
        if await self.choose() is not self.websocket:
            raise presence_unavailable(self.url)
        await self.websocket.set_presence(member)

    def want_presence(self, member: Member) -> None:
        if self._chosen is None:
            self._wanted = member  # applied once the choice is made
        elif self._chosen is self.websocket:
            self.websocket.want_presence(member)

    def presence_changes(self) -> PresenceFeed:
        async def check() -> None:
            if await self.choose() is not self.websocket:
                raise presence_unavailable(self.url)

        return PresenceFeed(self.websocket, check)


async def _aclose(iterator: AsyncIterator[object]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
