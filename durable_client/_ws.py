"""The WebSocket session transport, and the choice between it and HTTP.

:class:`WebSocketTransport` implements :class:`SessionTransport` over one
``websockets`` connection per session (our extension at ``{base}/v1/ws``,
``docs/websocket.md``). The socket multiplexes subscriptions (by ``sub`` id)
and appends (by ``req`` id, each answered by an ``ack`` or an ``error``), and
carries presence. It stays thin on purpose: when the socket dies, every
subscription iterator raises :class:`ConnectionLost` and every pending append
fails with it, so the session's own machinery resumes (offset plus skip,
event-id dedupe) and retries (same producer stamp, deduplicated by the
server). The socket is reopened lazily by the next subscribe or append, or at
once when this client has set its presence, which is then sent again.

``create()`` and ``tail()`` go over HTTP (the WebSocket protocol has neither),
and so does an append too large for one frame of the server.

Close codes: 1000, 1001 (server shutting down), 1006 (no close frame), 1011
(keepalive timeout) and 4008 (slow consumer) are retryable; 1008 (policy) is
:class:`Forbidden`; 1009 (frame too big) fails the pending appends with
:class:`PayloadTooLarge`; 4002 and 1002/1003/1007 are a
:class:`ProtocolViolation`; 4029 (too many subscriptions) a :class:`UsageError`.

:class:`AutoTransport` is the default of :class:`Session`: on first use it tries
the WebSocket handshake and, if the server refuses it with an HTTP status (an
HTTP-only server, or the Node reference server), uses HTTP (SSE, then
long-poll) for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.frames import Close

from . import _protocol as P
from ._errors import (
    ClientClosed,
    ConnectError,
    ConnectionLost,
    DurableError,
    FatalError,
    Forbidden,
    PayloadTooLarge,
    PresenceUnavailable,
    ProtocolViolation,
    RequestTimeout,
    RetryableError,
    UnexpectedStatus,
    UsageError,
    error_from_status,
)
from ._producer import ProducerStamp
from ._retry import Backoff, ReconnectPolicy, RetryPolicy
from ._stream import AppendResult, DurableStream
from ._transport import HttpTransport, TransportBatch
from ._ws_frames import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_MANY_SUBSCRIPTIONS,
    SERVER_FRAME,
    WS_PATH,
    Ack,
    Append,
    Data,
    Error,
    LeavePresence,
    Member,
    Ping,
    Pong,
    Presence,
    ProducerRef,
    ServerFrame,
    SetPresence,
    Subscribe,
    Subscribed,
    Unsubscribe,
)

__all__ = [
    "AutoTransport",
    "PresenceChange",
    "PresenceFeed",
    "WebSocketOptions",
    "WebSocketTransport",
    "stream_name_of",
    "websocket_url_of",
]

_RETRYABLE_CLOSES = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014, CLOSE_SLOW_CONSUMER})
_PROTOCOL_CLOSES = frozenset({1002, 1003, 1007, CLOSE_PROTOCOL_ERROR})


@dataclass(frozen=True)
class WebSocketOptions:
    """Tunables of the WebSocket transport.

    Attributes:
        ping_interval: seconds between keepalive pings (``None``: no keepalive).
        ping_timeout: seconds a pong may be late before the socket is dropped.
            With ``close_timeout``, a peer that stopped answering is detected
            within ``ping_interval + ping_timeout + close_timeout``.
        close_timeout: seconds to wait for the closing handshake.
        open_timeout: seconds the opening handshake may take.
        max_message_size: the largest frame accepted from the server, in
            bytes (``None``: no limit). The server sends one record whole,
            up to its body limit (16 MiB by default), so keep this above that.
        max_append_frame: appends whose frame would be larger than this go
            over HTTP instead (the server's frame limit is 1 MiB by default,
            its HTTP body limit 16 MiB).
        max_subscriptions: subscriptions on one socket (the server allows 64).
        max_queued_frames: frames one subscription may hold unread before it
            is ended with :class:`ConnectionLost` (it then resumes from its
            position), so a stalled consumer cannot grow memory without bound
            nor stall the acks and other subscriptions sharing the socket.
        max_queued_bytes: the same bound in bytes.
    """

    ping_interval: float | None = 5.0
    ping_timeout: float | None = 5.0
    close_timeout: float = 1.0
    open_timeout: float = 10.0
    max_message_size: int | None = 64 * 1024 * 1024
    max_append_frame: int = 1024 * 1024
    max_subscriptions: int = 64
    max_queued_frames: int = 4096
    max_queued_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("ping_interval", "ping_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"{name} must be > 0 (or None)")
        if not self.close_timeout > 0 or not self.open_timeout > 0:
            raise UsageError("close_timeout and open_timeout must be > 0")
        if self.max_subscriptions < 1 or self.max_queued_frames < 1:
            raise UsageError("max_subscriptions and max_queued_frames must be >= 1")


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """Someone joined, changed status or left; ``members`` is everyone present after it."""

    event: Literal["join", "update", "leave"]
    member: Member
    members: tuple[Member, ...]


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


def _close_error(rcvd: Close | None, sent: Close | None, *, url: str) -> DurableError:
    """What a closed socket means for what was pending on it (see the module docstring)."""
    if rcvd is None:
        if sent is not None and sent.code == 1011:
            text = f"keepalive timeout: {sent.reason or 'no pong in time'}"
        else:
            text = "the WebSocket connection was lost"
        return ConnectionLost(text, url=url)
    code, reason = rcvd.code, rcvd.reason
    text = f"the server closed the WebSocket ({code}{': ' + reason if reason else ''})"
    if code == 1008:
        return Forbidden(text, url=url)
    if code == CLOSE_TOO_MANY_SUBSCRIPTIONS:
        return UsageError(text, url=url)
    if code in _PROTOCOL_CLOSES:
        return ProtocolViolation(text, url=url)
    return ConnectionLost(text, url=url)


class _HandshakeRefused(UnexpectedStatus):
    """The server answered the WebSocket handshake with an HTTP refusal (or not
    with WebSocket at all): it does not offer the transport."""


_Item: TypeAlias = Subscribed | Data | Error


class _Inbox:
    """Frames of one subscription, not yet taken, with a bound (see ``max_queued_frames``)."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self._items: deque[tuple[_Item, int]] = deque()
        self._bytes = 0
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self._end: DurableError | None = None

    def put(self, item: _Item, size: int) -> bool:
        """Queue ``item``; False (and nothing queued) when the bound is reached."""
        if self._end is not None:
            return True
        if len(self._items) >= self._max_frames or self._bytes + size > self._max_bytes:
            return False
        self._items.append((item, size))
        self._bytes += size
        self._ready.set()
        return True

    def end(self, error: DurableError) -> None:
        """Nothing more will come: ``get`` raises ``error`` once the queue is empty."""
        if self._end is None:
            self._end = error
            self._ready.set()

    async def get(self) -> _Item:
        while not self._items:
            if self._end is not None:
                raise self._end
            self._ready.clear()
            await self._ready.wait()
        item, size = self._items.popleft()
        self._bytes -= size
        return item


class _Socket:
    """One open WebSocket and what is pending on it."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        url: str,
        options: WebSocketOptions,
        on_presence: Callable[[Presence], None],
        on_end: Callable[[_Socket], None],
    ) -> None:
        self.ws = ws
        self.url = url
        self.options = options
        self.subs: dict[str, _Inbox] = {}
        self.requests: dict[str, asyncio.Future[ServerFrame]] = {}
        self.stray_errors: list[Error] = []
        self.error: DurableError | None = None
        self.presence_sent: Member | None = None
        self._on_presence = on_presence
        self._on_end = on_end
        self._closing = False
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self.reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"durable-ws-reader:{url}"
        )

    @property
    def alive(self) -> bool:
        return self.error is None

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    # --- reading ------------------------------------------------------------------

    async def _read(self) -> None:
        error: DurableError = ConnectionLost("the WebSocket connection ended", url=self.url)
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    raise ProtocolViolation("the server sent a binary frame", url=self.url)
                try:
                    frame = SERVER_FRAME.validate_json(message)
                except ValidationError as exc:
                    raise ProtocolViolation(
                        f"the server sent a malformed frame: {exc.errors()[0]['msg']}",
                        url=self.url,
                    ) from exc
                self._dispatch(frame, len(message))
            # A clean close (1000/1001): only the close frame says why.
            protocol = self.ws.protocol
            error = _close_error(protocol.close_rcvd, protocol.close_sent, url=self.url)
        except ConnectionClosed as exc:
            error = _close_error(exc.rcvd, exc.sent, url=self.url)
            error.__cause__ = exc  # raised later, from every iterator and append pending
        except DurableError as exc:
            error = exc
            self.ws.transport.abort()
        finally:
            if self._closing:
                error = ClientClosed("the session was closed", url=self.url)
            self._end(error)

    def _dispatch(self, frame: ServerFrame, size: int) -> None:
        if isinstance(frame, Data | Subscribed):
            inbox = self.subs.get(frame.sub)
            if inbox is not None and not inbox.put(frame, size):
                # The consumer stopped taking frames: end this subscription (it
                # resumes from its position) rather than hold the whole socket.
                self.subs.pop(frame.sub, None)
                inbox.end(ConnectionLost("the subscription fell behind", url=self.url))
                self.send_soon(Unsubscribe(sub=frame.sub))
        elif isinstance(frame, Ack | Pong):
            if frame.req is not None:
                self._answer(frame.req, frame)
        elif isinstance(frame, Error):
            if frame.req is not None:
                self._answer(frame.req, frame)
            elif frame.sub is not None:
                inbox = self.subs.pop(frame.sub, None)
                if inbox is not None:
                    inbox.put(frame, size)
            elif len(self.stray_errors) < 16:  # reported by the next barrier()
                self.stray_errors.append(frame)
        elif isinstance(frame, Presence):
            self._on_presence(frame)

    def _answer(self, req: str, frame: ServerFrame) -> None:
        future = self.requests.pop(req, None)
        if future is not None and not future.done():
            future.set_result(frame)

    def _end(self, error: DurableError) -> None:
        if self.error is not None:
            return
        self.error = error
        for inbox in self.subs.values():
            inbox.end(error)
        self.subs.clear()
        rcvd = self.ws.protocol.close_rcvd
        if rcvd is not None and rcvd.code == 1009:
            # One of the appends was too big for the server: retrying cannot help
            # them (the subscriptions, which did nothing wrong, just resume).
            error = PayloadTooLarge(str(error), url=self.url)
        for future in self.requests.values():
            if not future.done():
                future.set_exception(error)
        self.requests.clear()
        self._on_end(self)

    # --- writing ------------------------------------------------------------------

    async def send(self, frame: Any) -> None:
        await self.send_text(frame.model_dump_json(exclude_none=True))

    async def send_text(self, text: str) -> None:
        if self.error is not None:
            raise self.error
        try:
            await self.ws.send(text)
        except ConnectionClosed as exc:
            raise self.error or _close_error(exc.rcvd, exc.sent, url=self.url) from exc

    def send_soon(self, frame: Any) -> None:
        """Send ``frame`` from a task of its own (best effort: from code that must not wait)."""
        if self.error is not None:
            return

        async def send() -> None:
            with contextlib.suppress(DurableError):
                await self.send(frame)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def request(self, req: str, text: str) -> ServerFrame:
        """Send a frame carrying ``req`` and wait for the frame that answers it."""
        if self.error is not None:
            raise self.error
        future: asyncio.Future[ServerFrame] = asyncio.get_running_loop().create_future()
        # The socket may end (and fail this future) while the send itself fails:
        # then nobody awaits the future, and its error is already raised.
        future.add_done_callback(_retrieve)
        self.requests[req] = future
        try:
            await self.send_text(text)
            return await future
        finally:
            self.requests.pop(req, None)

    async def barrier(self, operation: str) -> None:
        """Wait until the server handled every frame sent so far; raise an error
        it reported for one of them that had no ``req`` (e.g. a presence frame)."""
        req = self.next_id("p")
        await self.request(req, Ping(req=req).model_dump_json())
        if self.stray_errors:
            first = self.stray_errors[0]
            self.stray_errors.clear()
            raise _error_of(first, url=self.url, operation=operation)

    # --- ending -------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        for task in list(self._background):
            task.cancel()

    def abort(self) -> None:
        """Cut the TCP connection, as a network failure would."""
        self.ws.transport.abort()


def _error_of(frame: Error, *, url: str, operation: str) -> DurableError:
    return error_from_status(
        frame.status, frame.headers, f"{frame.code}: {frame.message}", url=url, operation=operation
    )


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

    Args:
        stream: the session's stream over HTTP (create, tail, oversized appends;
            its headers and query parameters also go on the WebSocket handshake).
        ws_url: the server's WebSocket URL (default: derived from the stream URL).
        stream_name: the stream's name in frames (default: from the stream URL).
        options: keepalive, timeouts and limits.
        reconnect: how a socket that carries presence is reopened after a loss.
        rng: random source for jitter.
    """

    def __init__(
        self,
        stream: DurableStream,
        *,
        ws_url: str | None = None,
        stream_name: str | None = None,
        options: WebSocketOptions = WebSocketOptions(),
        reconnect: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        name = stream_name or stream_name_of(stream.url)
        if name is None:
            raise UsageError(f"not a stream under {P.STREAM_PATH_PREFIX}: {stream.url}")
        if ws_url is None:
            index = stream.url.rfind(P.STREAM_PATH_PREFIX)
            ws_url = websocket_url_of(stream.url[:index])
        self.stream = stream
        self.ws_url = ws_url
        self.stream_name = name
        self.options = options
        self.reconnect = reconnect or ReconnectPolicy()
        self._http = HttpTransport(stream)
        self._rng = rng
        self._socket: _Socket | None = None
        self._opening: asyncio.Future[_Socket] | None = None
        self._presence: Member | None = None
        self._presence_lock = asyncio.Lock()
        self._presence_task: asyncio.Task[None] | None = None
        self._members: tuple[Member, ...] = ()
        self._listeners: weakref.WeakSet[PresenceFeed] = weakref.WeakSet()
        self._ids = itertools.count(1)
        self._closed = False

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

    async def _connection(self) -> _Socket:
        self._check_open()
        socket = self._socket
        if socket is not None and socket.alive:
            return socket
        opening = self._opening
        if opening is None or opening.done():
            opening = asyncio.ensure_future(self._open())
            opening.add_done_callback(_retrieve)
            self._opening = opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def _open(self) -> _Socket:
        headers = await self.stream._build_headers(None)
        query = str(await self.stream._build_params(None))
        url = f"{self.ws_url}?{query}" if query else self.ws_url
        options = self.options
        try:
            ws = await connect(
                url,
                additional_headers=headers,
                compression=None,
                open_timeout=options.open_timeout,
                ping_interval=options.ping_interval,
                ping_timeout=options.ping_timeout,
                close_timeout=options.close_timeout,
                max_size=options.max_message_size,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401 or status == 429 or status >= 500:
                raise error_from_status(
                    status,
                    dict(exc.response.headers.raw_items()),
                    "",
                    url=self.url,
                    operation="WebSocket handshake",
                ) from exc
            raise _HandshakeRefused(
                f"the server refused the WebSocket handshake at {self.ws_url}",
                url=self.url,
                status=status,
            ) from exc
        except InvalidURI as exc:
            raise UsageError(f"invalid WebSocket URL {self.ws_url}: {exc}", url=self.url) from exc
        except InvalidMessage as exc:
            # The connection broke before a complete answer: decides nothing.
            raise ConnectionLost(
                f"the WebSocket handshake at {self.ws_url} was cut: {exc}", url=self.url
            ) from exc
        except InvalidHandshake as exc:
            # An answer, but not a WebSocket handshake.
            raise _HandshakeRefused(f"no WebSocket at {self.ws_url}: {exc}", url=self.url) from exc
        except TimeoutError as exc:
            raise RequestTimeout(
                f"the WebSocket handshake at {self.ws_url} timed out", url=self.url
            ) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.ws_url}: {exc}", url=self.url) from exc
        if self._closed:
            await ws.close()
            raise ClientClosed("the session was closed", url=self.url)
        socket = _Socket(
            ws,
            url=self.url,
            options=options,
            on_presence=self._on_presence,
            on_end=self._on_socket_end,
        )
        self._socket = socket
        if self._presence is not None:
            with contextlib.suppress(DurableError):
                await self._sync_presence(socket)
        return socket

    def _on_socket_end(self, socket: _Socket) -> None:
        if self._socket is socket:
            self._socket = None
        if self._presence is not None and not self._closed:
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
        await self._http.aclose()

    # --- subscriptions -------------------------------------------------------------

    async def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        socket = await self._connection()
        if len(socket.subs) >= self.options.max_subscriptions:
            raise UsageError(
                f"more than {self.options.max_subscriptions} subscriptions on one socket",
                url=self.url,
            )
        sub = socket.next_id("s")
        inbox = _Inbox(self.options.max_queued_frames, self.options.max_queued_bytes)
        socket.subs[sub] = inbox
        try:
            await socket.send(Subscribe(sub=sub, stream=self.stream_name, offset=offset))
            start = offset
            incarnation: str | None = None
            while True:
                frame = await inbox.get()
                if isinstance(frame, Subscribed):
                    incarnation = frame.incarnation
                    continue
                if isinstance(frame, Error):
                    raise _error_of(frame, url=self.url, operation="subscribe")
                if frame.messages is None:
                    raise ProtocolViolation("a data frame without messages", url=self.url)
                yield TransportBatch(
                    tuple(frame.messages),
                    start,
                    frame.offset,
                    frame.up_to_date,
                    frame.closed,
                    incarnation,
                )
                if frame.closed:
                    return
                start = frame.offset
        finally:
            if socket.subs.pop(sub, None) is not None:
                socket.send_soon(Unsubscribe(sub=sub))

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
            raise _error_of(answer, url=self.url, operation=operation)
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
        backoff = Backoff(self.reconnect, rng=self._rng)
        while self._presence is not None and not self._closed:
            try:
                socket = await self._connection()
                await self._sync_presence(socket)
                return
            except RetryableError as exc:
                delay = backoff.failure(exc)
                if delay is None:
                    return
                await asyncio.sleep(delay)
            except DurableError:
                return

    async def _sync_presence(self, socket: _Socket) -> None:
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
        # Every frame carries the full list: reporting the difference to what
        # we knew turns a snapshot (on subscribe, after a reconnect) into the
        # joins and leaves it implies, and a join we already heard of into nothing.
        changes = _diff(self._members, tuple(frame.members))
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


def _diff(before: tuple[Member, ...], after: tuple[Member, ...]) -> list[PresenceChange]:
    """The changes that turn ``before`` into ``after`` (a snapshot after a reconnect),
    each with the members after it."""
    changes: list[PresenceChange] = []
    current = {m.client_id: m for m in before}
    wanted = {m.client_id: m for m in after}
    for client_id, member in list(current.items()):
        if client_id not in wanted:
            del current[client_id]
            changes.append(PresenceChange("leave", member, tuple(current.values())))
    for client_id, member in wanted.items():
        old = current.get(client_id)
        if old == member:
            continue
        current[client_id] = member
        changes.append(
            PresenceChange("join" if old is None else "update", member, tuple(current.values()))
        )
    if changes:
        last = changes[-1]
        changes[-1] = PresenceChange(last.event, last.member, after)
    return changes


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@runtime_checkable
class PresenceTransport(Protocol):
    """A transport that carries presence (the session asks it through this)."""

    @property
    def presence_available(self) -> bool | None: ...

    @property
    def members(self) -> tuple[Member, ...]: ...

    def presence_changes(self) -> PresenceFeed: ...

    async def set_presence(self, member: Member) -> None: ...

    def want_presence(self, member: Member) -> None: ...


class AutoTransport:
    """WebSocket when the server offers it, HTTP (SSE, then long-poll) otherwise.

    The choice is made on first use (a subscription, an append, presence): a
    WebSocket handshake refused with an HTTP status means HTTP for good; a
    failure to connect at all decides nothing (it is retried like any other).
    A server that refuses a later handshake (redeployed without WebSocket,
    or a balancer that sent the reconnect elsewhere) turns the session to
    HTTP from then on as well.
    """

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
                except _HandshakeRefused:
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
                except _HandshakeRefused:
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
        except _HandshakeRefused:
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
            raise _no_presence(self.url)
        await self.websocket.set_presence(member)

    def want_presence(self, member: Member) -> None:
        if self._chosen is None:
            self._wanted = member  # applied once the choice is made
        elif self._chosen is self.websocket:
            self.websocket.want_presence(member)

    def presence_changes(self) -> PresenceFeed:
        async def check() -> None:
            if await self.choose() is not self.websocket:
                raise _no_presence(self.url)

        return PresenceFeed(self.websocket, check)


def _no_presence(url: str) -> PresenceUnavailable:
    return PresenceUnavailable(
        "presence needs the WebSocket transport; this session uses HTTP", url=url
    )
