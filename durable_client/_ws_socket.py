"""One open WebSocket of a session, and what is pending on it.

The asyncio glue around ``_core.wire``: :func:`open_socket` makes the
handshake (a failure mapped by ``connect_error``), a :class:`Socket` reads
every message into its :class:`ClientWire` and does what the wire says
(wake the subscription a frame is for, answer the request an ack is for,
end a subscription that fell behind), and fails everything pending with the
error the close means. :class:`WebSocketTransport` (``_ws``) opens sockets
and speaks the session's frames over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ._auth import TokenSource, due_time, read_claims, retry_delay
from ._core.wire import (
    Answer,
    ClientWire,
    FellBehind,
    ForSubscription,
    PresenceHeard,
    WireEvent,
    close_error,
    connect_error,
    pending_request_error,
)
from ._errors import ClientClosed, ConnectionLost, DurableError, UsageError
from ._ws_frames import (
    CLOSE_TOKEN_EXPIRED,
    Auth,
    AuthOk,
    Error,
    Member,
    Ping,
    Presence,
    ServerFrame,
    Unsubscribe,
)

__all__ = ["Inbox", "Socket", "WebSocketOptions", "open_socket", "retrieve"]

log = logging.getLogger("durable_client.websocket")

_SECRETS = re.compile(r'(?i)(authorization: )\S+(?: \S+)?|("token"\s*:\s*")[^"]*')


class _RedactTokens(logging.Filter):
    """websockets logs every handshake header and the start of every frame at
    DEBUG: the ``Authorization`` header and an ``auth`` frame's token are
    masked before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "uthorization" in text or '"token"' in text:
            record.msg = _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)
            record.args = ()
        return True


#: The logger websockets writes the connection's protocol events to.
_protocol_log = logging.getLogger("durable_client.websocket.protocol")
_protocol_log.addFilter(_RedactTokens())


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


class Inbox:
    """Frames of one subscription, not yet taken (the wire bounds how many)."""

    def __init__(self) -> None:
        self._items: deque[ForSubscription] = deque()
        self._ready = asyncio.Event()
        self._end: DurableError | None = None

    def put(self, item: ForSubscription) -> None:
        if self._end is None:
            self._items.append(item)
            self._ready.set()

    def end(self, error: DurableError) -> None:
        """Nothing more will come: ``get`` raises ``error`` once the queue is empty."""
        if self._end is None:
            self._end = error
            self._ready.set()

    async def get(self) -> ForSubscription:
        while not self._items:
            if self._end is not None:
                raise self._end
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class Socket:
    """One open WebSocket and what is pending on it."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        url: str,
        options: WebSocketOptions,
        on_presence: Callable[[Presence], None],
        on_end: Callable[[Socket], None],
        token: TokenSource | None = None,
        token_in_force: str | None = None,
    ) -> None:
        self.ws = ws
        self.url = url
        self.wire = ClientWire(
            url=url,
            max_queued_frames=options.max_queued_frames,
            max_queued_bytes=options.max_queued_bytes,
        )
        self.inboxes: dict[str, Inbox] = {}
        self.requests: dict[str, asyncio.Future[ServerFrame]] = {}
        self.error: DurableError | None = None
        self.presence_sent: Member | None = None
        self._on_presence = on_presence
        self._on_end = on_end
        self._closing = False
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._answer_timeout = options.open_timeout
        #: The token the server holds for this socket, and when it was fetched.
        self._token = token
        self._in_force = token_in_force
        self._in_force_at = token.fetched_at if token is not None else 0.0
        #: How many in-band refreshes the server accepted (tests and logs).
        self.token_refreshes = 0
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read(), name=f"durable-ws-reader:{url}")
        self._refresher: asyncio.Task[None] | None = None
        if token is not None and token.refreshes and token_in_force is not None:
            self._refresher = loop.create_task(
                self._keep_token(token), name=f"durable-ws-token:{url}"
            )

    @property
    def alive(self) -> bool:
        return self.error is None

    @property
    def torn_down(self) -> bool:
        """Whether the socket ended because it was closed or its reader cancelled
        (the program is ending), not because the connection was lost."""
        return self._closing

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    # --- reading ------------------------------------------------------------------

    async def _read(self) -> None:
        error: DurableError = ConnectionLost("the WebSocket connection ended", url=self.url)
        try:
            async for message in self.ws:
                self._handle(self.wire.receive(message))
            # A clean close (1000/1001): only the close frame says why.
            protocol = self.ws.protocol
            error = close_error(protocol.close_rcvd, protocol.close_sent, url=self.url)
            if protocol.close_rcvd is not None and protocol.close_rcvd.code == CLOSE_TOKEN_EXPIRED:
                self._token_lapsed()
        except ConnectionClosed as exc:
            error = close_error(exc.rcvd, exc.sent, url=self.url)
            error.__cause__ = exc  # raised later, from every iterator and append pending
            if exc.rcvd is not None and exc.rcvd.code == CLOSE_TOKEN_EXPIRED:
                self._token_lapsed()
        except DurableError as exc:
            error = exc
            self.ws.transport.abort()
        except asyncio.CancelledError:
            # Cancelled from outside (asyncio.run() ending the program, a task
            # group failing): the socket is being torn down, not lost, so no
            # one may reconnect for it; the connection is cut at once.
            self._closing = True
            self.ws.transport.abort()
            raise
        finally:
            if self._closing:
                error = ClientClosed("the session was closed", url=self.url)
            self._end(error)

    def _handle(self, event: WireEvent | None) -> None:
        if isinstance(event, ForSubscription):
            inbox = self.inboxes.get(event.sub)
            if inbox is not None:
                inbox.put(event)
                if isinstance(event.frame, Error):
                    del self.inboxes[event.sub]
        elif isinstance(event, FellBehind):
            inbox = self.inboxes.pop(event.sub, None)
            if inbox is not None:
                inbox.end(event.error)
            self.send_soon(Unsubscribe(sub=event.sub))
        elif isinstance(event, Answer):
            future = self.requests.pop(event.req, None)
            if future is not None and not future.done():
                future.set_result(event.frame)
        elif isinstance(event, PresenceHeard):
            self._on_presence(event.frame)

    def _end(self, error: DurableError) -> None:
        if self.error is not None:
            return
        self.error = error
        if self._refresher is not None:
            self._refresher.cancel()
        for inbox in self.inboxes.values():
            inbox.end(error)
        self.inboxes.clear()
        error = pending_request_error(error, self.ws.protocol.close_rcvd, url=self.url)
        for future in self.requests.values():
            if not future.done():
                future.set_exception(error)
        self.requests.clear()
        self._on_end(self)

    # --- the token ----------------------------------------------------------------

    def _token_lapsed(self) -> None:
        """The server ended the socket because its token expired: the next
        socket must not be opened with it."""
        if self._token is not None:
            self._token.invalidate(self._in_force)

    async def _keep_token(self, source: TokenSource) -> None:
        """Replace the socket's token in-band (an ``auth`` frame) at 80% of its
        lifetime, so the server never has to end the socket: subscriptions stay
        as they are. A refused or failed refresh is tried again shortly; the old
        token holds until it expires (then the server closes with 4001 and the
        session reconnects with a fresh one)."""
        while self.error is None and self._in_force is not None:
            claims = read_claims(self._in_force)
            due = due_time(claims, self._in_force_at)
            if due is None:
                return  # an expiry we cannot read: refreshed only by a reconnect
            delay = due - source.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                token = await source.get()
            except DurableError as exc:
                log.warning("cannot refresh the access token: %s", exc)
                await asyncio.sleep(retry_delay(claims.exp, source.clock()))
                continue
            if token == self._in_force:
                # Nothing newer yet (the provider failed, or has no new token):
                # again a little later.
                await asyncio.sleep(retry_delay(claims.exp, source.clock()))
                continue
            if await self._send_token(token):
                self._in_force = token
                self._in_force_at = source.fetched_at
                self.token_refreshes += 1
            else:
                source.invalidate(token)
                await asyncio.sleep(retry_delay(claims.exp, source.clock()))

    async def _send_token(self, token: str) -> bool:
        """Offer ``token`` to the server; whether it took it."""
        req = self.next_id("t")
        try:
            async with asyncio.timeout(self._answer_timeout):
                answer = await self.request(req, Auth(token=token, req=req).model_dump_json())
        except (DurableError, TimeoutError):
            return False
        if isinstance(answer, AuthOk):
            log.debug("the server took the refreshed access token")
            return True
        if isinstance(answer, Error):
            # The message is the server's (it never quotes the token).
            log.warning("the server refused the refreshed access token: %s", answer.message)
        return False

    # --- subscriptions ------------------------------------------------------------

    def open_subscription(self, sub: str) -> Inbox:
        self.wire.open(sub)
        inbox = self.inboxes[sub] = Inbox()
        return inbox

    def close_subscription(self, sub: str) -> None:
        """Stop routing ``sub``'s frames, and tell the server if it still sends them."""
        self.inboxes.pop(sub, None)
        if self.wire.close(sub):
            self.send_soon(Unsubscribe(sub=sub))

    # --- writing ------------------------------------------------------------------

    async def send(self, frame: Any) -> None:
        await self.send_text(frame.model_dump_json(exclude_none=True))

    async def send_text(self, text: str) -> None:
        if self.error is not None:
            raise self.error
        try:
            await self.ws.send(text)
        except ConnectionClosed as exc:
            raise self.error or close_error(exc.rcvd, exc.sent, url=self.url) from exc

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
        future.add_done_callback(retrieve)
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
        error = self.wire.take_stray_error(operation)
        if error is not None:
            raise error

    # --- ending -------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        if self._refresher is not None:
            self._refresher.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        for task in list(self._background):
            task.cancel()

    def abort(self) -> None:
        """Cut the TCP connection, as a network failure would."""
        self.ws.transport.abort()


async def open_socket(
    ws_url: str,
    *,
    url: str,
    headers: dict[str, str],
    options: WebSocketOptions,
    on_presence: Callable[[Presence], None],
    on_end: Callable[[Socket], None],
    token: TokenSource | None = None,
    token_in_force: str | None = None,
) -> Socket:
    """Make the opening handshake at ``ws_url`` for the stream at ``url``
    (``headers`` carry ``token_in_force``, which ``token`` refreshes in-band).

    Raises from the error tree: ``HandshakeRefused`` when the server does not
    offer WebSocket, a retryable error when the connection could not be made.
    """
    try:
        ws = await connect(
            ws_url,
            additional_headers=headers,
            compression=None,
            open_timeout=options.open_timeout,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            close_timeout=options.close_timeout,
            max_size=options.max_message_size,
            logger=_protocol_log,
        )
    except (InvalidHandshake, InvalidURI, OSError) as exc:  # TimeoutError is an OSError
        raise connect_error(exc, url=url, ws_url=ws_url.split("?", 1)[0]) from exc
    return Socket(
        ws,
        url=url,
        options=options,
        on_presence=on_presence,
        on_end=on_end,
        token=token,
        token_in_force=token_in_force,
    )


def retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
