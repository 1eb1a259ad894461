"""The WebSocket session transport (our extension at ``{base}/v1/ws``, ``docs/websocket.md``).

:class:`WebSocketTransport` implements :class:`SessionTransport` over one
``websockets`` connection per session. The socket multiplexes subscriptions
(by ``sub`` id) and appends (by ``req`` id, each answered by an ``ack`` or an
``error``), and carries presence. What each frame and each close code means
is decided without I/O in ``_core.wire``; ``_ws_socket`` is the asyncio glue
that reads a socket into it. This module is the adapter: it opens sockets,
speaks the session's frames over them and keeps this client's presence.

It stays thin on purpose: when the socket dies, every subscription iterator
raises the socket's error and every pending append fails with it, so the
session's own machinery resumes (offset plus skip, event-id dedupe) and
retries (same producer stamp, deduplicated by the server). The socket is
reopened lazily by the next subscribe or append, or at once when this client
has set its presence, which is then sent again.

``create()`` and ``tail()`` go over HTTP (the WebSocket protocol has neither),
and so does an append too large for one frame of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import httpx

from . import _protocol as P
from ._auth import TokenProvider, TokenSource, bearer
from ._core.producer import ProducerStamp
from ._core.wire import SubscriptionFrames, error_of, presence_changes
from ._errors import (
    ClientClosed,
    DurableError,
    FatalError,
    ProtocolViolation,
    Unauthorized,
    UsageError,
)
from ._http import HttpTransport
from ._results import AppendResult
from ._retry import ReconnectPolicy, RetryPolicy
from ._stream import DurableStream, DynamicValue, session_stream
from ._transport import PresenceChange, SessionDefaults, TransportBatch
from ._ws_frames import (
    WS_PATH,
    Ack,
    Append,
    Error,
    LeavePresence,
    Member,
    Presence,
    ProducerRef,
    SetPresence,
    Subscribe,
)
from ._ws_socket import Socket, WebSocketOptions, open_socket, retrieve

__all__ = [
    "PresenceFeed",
    "WebSocketOptions",
    "WebSocketTransport",
    "stream_name_of",
    "websocket_url_of",
]


def websocket_url_of(base_url: str) -> str:
    """``http://host:port[/prefix]`` -> ``ws://host:port[/prefix]/v1/ws``."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path + WS_PATH, "", ""))


def stream_name_of(stream_url: str) -> str | None:
    """The stream's name under ``/v1/stream/`` (what WebSocket frames address),
    or ``None`` if the URL is not under it."""
    path = urlsplit(stream_url).path
    index = path.rfind(P.STREAM_PATH_PREFIX)
    if index < 0:
        return None
    name = unquote(path[index + len(P.STREAM_PATH_PREFIX) :])
    return name or None


async def _resolved(values: Mapping[str, DynamicValue]) -> dict[str, str]:
    """Header or query values, each function called now (a fresh token per handshake)."""
    resolved: dict[str, str] = {}
    for name, value in values.items():
        result = value if isinstance(value, str) else value()
        resolved[name] = result if isinstance(result, str) else await result
    return resolved


def _append_result(ack: Ack) -> AppendResult:
    return AppendResult(
        offset=ack.offset,
        closed=ack.closed,
        duplicate=ack.duplicate,
        status=204 if ack.duplicate else 200,
        producer_epoch=ack.producer_epoch,
        producer_seq=ack.producer_seq,
    )


class WebSocketTransport:
    """:class:`SessionTransport` over one WebSocket (see the module docstring).

    ``WebSocketTransport(options=...)`` is settings a :class:`Session` binds to
    its stream; ``WebSocketTransport(stream)`` is bound to ``stream``.

    Args:
        stream: the session's stream over HTTP, for create, tail and oversized
            appends (omit it to let a session make one).
        options: keepalive, timeouts and limits.
        client: an ``httpx.AsyncClient`` for the HTTP requests of the stream
            it makes (not with ``stream``).
        headers: extra headers on the handshake (and on the HTTP requests of the
            stream it makes); values may be functions, called each time.
        params: extra query parameters, likewise.
        retry: how single HTTP requests are retried (default: the session's;
            not with ``stream``).
        reconnect: how a socket that carries presence is reopened after a loss
            (default: the session's).
        ws_url: the server's WebSocket URL (default: derived from the stream URL).
        rng: random source for jitter.
        token: an access token (or a :data:`~durable_client.streams.TokenProvider`)
            for the handshake and the HTTP requests (not with ``stream``: give
            it the stream's); with a provider, the socket replaces its token
            in-band ahead of expiry and reconnects with a fresh one on 4001.
    """

    def __init__(
        self,
        stream: DurableStream | None = None,
        *,
        options: WebSocketOptions = WebSocketOptions(),  # noqa: B008 - frozen dataclass
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, DynamicValue] | None = None,
        params: Mapping[str, DynamicValue] | None = None,
        retry: RetryPolicy | None = None,
        reconnect: RetryPolicy | None = None,
        ws_url: str | None = None,
        rng: random.Random | None = None,
        token: str | TokenProvider | None = None,
    ) -> None:
        self.options = options
        self.token = token
        self.client = client
        self.headers = dict(headers or {})
        self.params = dict(params or {})
        self.retry = retry
        self.reconnect = reconnect or ReconnectPolicy()
        self._reconnect_given = reconnect is not None
        self._rng = rng
        self.ws_url = ws_url or ""
        self.stream_name = ""
        if stream is not None:
            if client is not None or retry is not None or token is not None:
                raise UsageError("give the stream its client, retry policy and token")
            name = stream_name_of(stream.url)
            if name is None:
                raise UsageError(
                    "the WebSocket transport addresses streams under "
                    f"{P.STREAM_PATH_PREFIX}: {stream.url}"
                )
            if ws_url is None:
                index = stream.url.rfind(P.STREAM_PATH_PREFIX)
                self.ws_url = websocket_url_of(stream.url[:index])
            self.stream_name = name
        self._http_transport = HttpTransport(stream) if stream is not None else None
        # The stream's token source: the handshake, the in-band refreshes and
        # the HTTP requests share one current token.
        self._token: TokenSource | None = stream._token if stream is not None else None
        self._socket: Socket | None = None
        self._opening: asyncio.Future[Socket] | None = None
        self._presence: Member | None = None
        self._presence_lock = asyncio.Lock()
        self._presence_task: asyncio.Task[None] | None = None
        self._members: tuple[Member, ...] = ()
        self._listeners: weakref.WeakSet[PresenceFeed] = weakref.WeakSet()
        self._ids = itertools.count(1)
        self._closed = False

    def bind(self, url: str, defaults: SessionDefaults) -> WebSocketTransport:
        """This transport for the stream at ``url`` (itself, if made for a stream)."""
        if self._http_transport is not None:
            return self
        if stream_name_of(url) is None:
            raise UsageError(f"the WebSocket transport addresses streams under /v1/stream/: {url}")
        stream = session_stream(self, url, defaults)
        return WebSocketTransport(
            stream,
            options=self.options,
            headers=self.headers,
            params=self.params,
            reconnect=self.reconnect if self._reconnect_given else defaults.reconnect,
            ws_url=self.ws_url or None,
            rng=defaults.rng,
        )

    @property
    def stream(self) -> DurableStream:
        """The stream's HTTP client (create, tail, oversized appends)."""
        return self._http.stream

    @property
    def _http(self) -> HttpTransport:
        if self._http_transport is None:
            raise UsageError(
                "this WebSocketTransport is settings: give it to a Session, or a stream"
            )
        return self._http_transport

    @property
    def name(self) -> str:
        return "websocket"

    @property
    def url(self) -> str:
        return self.stream.url

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the session was closed", url=self.url)

    # --- HTTP parts -----------------------------------------------------------------

    async def create(self) -> bool:
        return await self._http.create()

    async def tail(self) -> str:
        return await self._http.tail()

    # --- the socket -------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the socket now (it opens on first use otherwise)."""
        await self._connection()

    async def _connection(self) -> Socket:
        self._check_open()
        socket = self._socket
        if socket is not None and socket.alive:
            return socket
        opening = self._opening
        if opening is None or opening.done():
            opening = asyncio.ensure_future(self._open())
            opening.add_done_callback(retrieve)
            self._opening = opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def _open(self) -> Socket:
        query = urlencode(sorted((await _resolved(self.params)).items()))
        ws_url = f"{self.ws_url}?{query}" if query else self.ws_url
        source = self._token
        for attempt in (1, 2):
            headers = await _resolved(self.headers)
            token = await source.get() if source is not None else None
            if token is not None:
                headers["authorization"] = bearer(token)
            try:
                socket = await open_socket(
                    ws_url,
                    url=self.url,
                    headers=headers,
                    options=self.options,
                    on_presence=self._on_presence,
                    on_end=self._on_socket_end,
                    token=source,
                    token_in_force=token,
                )
            except Unauthorized:
                # A token refused at the handshake: once more with a fresh one.
                if attempt == 2 or source is None or not source.refreshes:
                    raise
                source.invalidate(token)
                continue
            break
        if self._closed:
            await socket.close()
            raise ClientClosed("the session was closed", url=self.url)
        self._socket = socket
        if self._presence is not None:
            with contextlib.suppress(DurableError):
                await self._sync_presence(socket)
        return socket

    def _on_socket_end(self, socket: Socket) -> None:
        if self._socket is socket:
            self._socket = None
        if self._presence is not None and not self._closed and not socket.torn_down:
            self._keep_presence()  # presence is a standing intent: come back for it

    def drop_connections(self) -> None:
        """Cut the socket as a network failure would (subscriptions resume)."""
        socket = self._socket
        if socket is not None:
            socket.abort()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        task = self._presence_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        socket = self._socket
        if socket is not None and socket.alive:
            if self._presence is not None:
                # Say goodbye: the others see "leave" now, not after the grace period.
                with contextlib.suppress(DurableError, TimeoutError):
                    async with asyncio.timeout(self.options.close_timeout):
                        await socket.send(
                            LeavePresence(
                                stream=self.stream_name, client_id=self._presence.client_id
                            )
                        )
            await socket.close()
        for feed in list(self._listeners):
            feed._end()
        if self._http_transport is not None:
            await self._http_transport.aclose()

    # --- subscriptions -------------------------------------------------------------

    async def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        socket = await self._connection()
        if socket.wire.subscriptions >= self.options.max_subscriptions:
            raise UsageError(
                f"more than {self.options.max_subscriptions} subscriptions on one socket",
                url=self.url,
            )
        sub = socket.next_id("s")
        inbox = socket.open_subscription(sub)
        frames = SubscriptionFrames(offset, url=self.url)
        try:
            await socket.send(Subscribe(sub=sub, stream=self.stream_name, offset=offset))
            while True:
                item = await inbox.get()
                socket.wire.taken(sub, item.size)
                batch = frames.receive(item.frame)
                if batch is None:
                    continue
                yield batch
                if batch.closed:
                    return
        finally:
            socket.close_subscription(sub)

    # --- appends -------------------------------------------------------------------

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        try:
            data = [json.loads(item) for item in items] if items else None
        except ValueError as exc:
            raise UsageError(f"an item is not JSON: {exc}", url=self.url) from exc
        req = f"a{next(self._ids)}"
        frame = Append(
            req=req,
            stream=self.stream_name,
            data=data,
            close=close,
            producer=ProducerRef(id=stamp.producer_id, epoch=stamp.epoch, seq=stamp.seq)
            if stamp is not None
            else None,
        )
        text = frame.model_dump_json(exclude_none=True)
        if len(text.encode()) > self.options.max_append_frame:
            # Too big for one frame of the server: the same append over HTTP
            # (same producer stamp, so still exactly once).
            return await self._http.send_batch(items, stamp=stamp, close=close)
        socket = await self._connection()
        answer = await socket.request(req, text)
        if isinstance(answer, Ack):
            return _append_result(answer)
        if isinstance(answer, Error):
            operation = "close" if close and not data else "append"
            raise error_of(answer, url=self.url, operation=operation)
        raise ProtocolViolation(f"unexpected answer to an append: {answer.type}", url=self.url)

    # --- presence ------------------------------------------------------------------

    @property
    def presence_available(self) -> bool | None:
        return True

    @property
    def members(self) -> tuple[Member, ...]:
        return self._members

    async def set_presence(self, member: Member) -> None:
        self._check_open()
        self._presence = member
        socket = await self._connection()
        await self._sync_presence(socket)
        try:
            await socket.barrier("set presence")
        except FatalError:
            if self._presence == member:
                self._presence = None
            raise

    def want_presence(self, member: Member) -> None:
        """Set presence without waiting (best effort; kept across reconnects)."""
        if self._closed:
            return
        self._presence = member
        self._keep_presence()

    def _keep_presence(self) -> None:
        task = self._presence_task
        if task is None or task.done():
            self._presence_task = asyncio.get_running_loop().create_task(
                self._presence_loop(), name=f"durable-ws-presence:{self.url}"
            )

    async def _presence_loop(self) -> None:
        # Best effort: when the policy gives up, or the failure is fatal, the
        # presence waits for the next socket or the next want_presence().
        with contextlib.suppress(DurableError):
            async for attempt in self.reconnect.retrying(rng=self._rng):
                with attempt:
                    if self._presence is None or self._closed:
                        return
                    await self._sync_presence(await self._connection())

    async def _sync_presence(self, socket: Socket) -> None:
        async with self._presence_lock:
            while (wanted := self._presence) is not None and socket.presence_sent != wanted:
                await socket.send(
                    SetPresence(
                        stream=self.stream_name,
                        client_id=wanted.client_id,
                        kind=wanted.kind,
                        label=wanted.label,
                        status=wanted.status,
                    )
                )
                socket.presence_sent = wanted

    def presence_changes(self) -> PresenceFeed:
        self._check_open()
        return PresenceFeed(self)

    def _on_presence(self, frame: Presence) -> None:
        name = frame.stream.removeprefix(P.STREAM_PATH_PREFIX)
        if name != self.stream_name:
            return
        changes = presence_changes(self._members, tuple(frame.members))
        self._members = tuple(frame.members)
        for change in changes:
            for feed in list(self._listeners):
                feed._queue.put_nowait(change)


class PresenceFeed:
    """The presence changes of a session from the moment it was asked for
    (nothing between the call and the first ``anext`` is missed), until the
    session closes."""

    def __init__(
        self,
        transport: WebSocketTransport,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._queue: asyncio.Queue[PresenceChange | None] = asyncio.Queue()
        self._transport = transport
        self._check = check
        transport._listeners.add(self)

    def __aiter__(self) -> PresenceFeed:
        return self

    async def __anext__(self) -> PresenceChange:
        if self._check is not None:
            check, self._check = self._check, None
            await check()
        change = await self._queue.get()
        if change is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return change

    async def aclose(self) -> None:
        """Stop listening."""
        self._transport._listeners.discard(self)
        self._end()

    def _end(self) -> None:
        self._queue.put_nowait(None)
