"""The client's side of the WebSocket wire, without I/O (``docs/websocket.md``).

Three decisions live here, each tested without a socket
(``tests/client/core/test_wire_core.py``):

- **Routing**: :class:`ClientWire` takes each message the socket received and
  says what it is for: a frame of subscription ``sub``
  (:class:`ForSubscription`), a subscription that fell behind and must end
  (:class:`FellBehind`), the answer to request ``req`` (:class:`Answer`), a
  presence list (:class:`PresenceHeard`), or nothing anyone waits for. It
  also bounds what each subscription may hold unread, so one stalled
  consumer can neither grow memory nor stall the rest of the socket.
- **One subscription's frames**: :class:`SubscriptionFrames` turns the
  ``subscribed``, ``data`` and ``error`` frames of one subscription into the
  seam's :class:`TransportBatch` values, or the error it ended with.
- **Endings**: :data:`CLOSE_ERRORS` says which error of the tree each close
  code means (and so whether a reconnect may help); :func:`close_error` and
  :func:`pending_request_error` apply it; :func:`connect_error` does the
  same for an opening handshake that failed (:func:`handshake_error` for one
  the server refused with an HTTP status).

The presence diff (:func:`presence_changes`) is here too: a presence frame
carries everyone present, and a client reports the joins, updates and leaves
it implies.

The asyncio glue (``_ws``) reads the socket, wakes the waiting tasks and
sends what these objects ask for; it decides nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from pydantic import ValidationError
from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI
from websockets.frames import Close

from .._errors import (
    ConnectError,
    ConnectionLost,
    DurableError,
    Forbidden,
    PayloadTooLarge,
    ProtocolViolation,
    RequestTimeout,
    UnexpectedStatus,
    UsageError,
    error_from_status,
)
from .._transport import PresenceChange, TransportBatch
from .._ws_frames import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_MANY_SUBSCRIPTIONS,
    SERVER_FRAME,
    Ack,
    AuthOk,
    Data,
    Error,
    Member,
    Pong,
    Presence,
    ServerFrame,
    Subscribed,
)

__all__ = [
    "CLOSE_ERRORS",
    "Answer",
    "ClientWire",
    "FellBehind",
    "ForSubscription",
    "HandshakeRefused",
    "PresenceHeard",
    "SubscriptionFrames",
    "WireEvent",
    "close_error",
    "connect_error",
    "error_of",
    "handshake_error",
    "pending_request_error",
    "presence_changes",
]

# --- endings ---------------------------------------------------------------------

#: What each close code means for what was open on the socket. A retryable
#: error (``ConnectionLost``) lets subscriptions resume and appends be retried
#: on a new socket; any other error ends them. A code not listed is taken as a
#: lost connection: it tells nothing that retrying could not fix.
CLOSE_ERRORS: Final[Mapping[int, type[DurableError]]] = {
    1000: ConnectionLost,  # normal close: nothing wrong, resume
    1001: ConnectionLost,  # the server is going away (shutdown, redeploy)
    1006: ConnectionLost,  # no close frame: the connection dropped
    1011: ConnectionLost,  # keepalive timeout or a server error
    1012: ConnectionLost,  # service restart
    1013: ConnectionLost,  # try again later
    1014: ConnectionLost,  # bad gateway
    CLOSE_SLOW_CONSUMER: ConnectionLost,  # we read too slowly: resume from our offsets
    CLOSE_TOKEN_EXPIRED: ConnectionLost,  # the token lapsed: reconnect with a fresh one, resume
    1009: ConnectionLost,  # a frame too big: the subscriptions resume, the appends fail
    1008: Forbidden,  # policy violation (auth, origin)
    1002: ProtocolViolation,
    1003: ProtocolViolation,
    1007: ProtocolViolation,
    CLOSE_PROTOCOL_ERROR: ProtocolViolation,  # too many malformed frames in a row
    CLOSE_TOO_MANY_SUBSCRIPTIONS: UsageError,
}

#: Close codes that fail the requests pending on the socket with another error
#: than the subscriptions: one of those appends caused the close, so retrying
#: them cannot help.
_REQUEST_CLOSE_ERRORS: Final[Mapping[int, type[DurableError]]] = {1009: PayloadTooLarge}


def close_error(received: Close | None, sent: Close | None, *, url: str) -> DurableError:
    """What a closed socket means for what was open on it (see :data:`CLOSE_ERRORS`).

    ``received`` is the server's close frame (``None`` if none came), ``sent``
    ours (a keepalive timeout is one we sent, with 1011).
    """
    if received is None:
        if sent is not None and sent.code == 1011:
            text = f"keepalive timeout: {sent.reason or 'no pong in time'}"
        else:
            text = "the WebSocket connection was lost"
        return ConnectionLost(text, url=url)
    code, reason = received.code, received.reason
    text = f"the server closed the WebSocket ({code}{': ' + reason if reason else ''})"
    if code == CLOSE_TOKEN_EXPIRED:
        text += ": the access token expired; reconnecting with a fresh one"
    return CLOSE_ERRORS.get(code, ConnectionLost)(text, url=url)


def pending_request_error(error: DurableError, received: Close | None, *, url: str) -> DurableError:
    """What the requests pending on a socket that ended with ``error`` fail with."""
    cls = _REQUEST_CLOSE_ERRORS.get(received.code) if received is not None else None
    return error if cls is None else cls(str(error), url=url)


class HandshakeRefused(UnexpectedStatus):
    """The server answered the WebSocket handshake with an HTTP refusal (or not
    with WebSocket at all): it does not offer the transport."""


def handshake_error(
    status: int, headers: Mapping[str, str], *, url: str, ws_url: str, detail: str = ""
) -> DurableError:
    """What an HTTP answer to the opening handshake means.

    401, 429 and 5xx say the same as over HTTP (authenticate, wait, retry),
    and so does a 403 with ``WWW-Authenticate`` (an access control refusal:
    the token does not allow it, or the Origin is not allowed); any other
    status says the server does not offer WebSocket here.
    """
    challenged = any(k.lower() == "www-authenticate" for k in headers)
    if status == 401 or status == 429 or status >= 500 or (status == 403 and challenged):
        return error_from_status(status, headers, detail, url=url, operation="WebSocket handshake")
    return HandshakeRefused(
        f"the server refused the WebSocket handshake at {ws_url}", url=url, status=status
    )


def connect_error(
    exc: InvalidHandshake | InvalidURI | OSError, *, url: str, ws_url: str
) -> DurableError:
    """What a failed opening handshake means (``exc`` is what ``connect()`` raised)."""
    if isinstance(exc, InvalidStatus):
        response = exc.response
        status, headers = response.status_code, dict(response.headers.raw_items())
        detail = response.body.decode("utf-8", "replace") if response.body else ""
        return handshake_error(status, headers, url=url, ws_url=ws_url, detail=detail)
    if isinstance(exc, InvalidURI):
        return UsageError(f"invalid WebSocket URL {ws_url}: {exc}", url=url)
    if isinstance(exc, InvalidMessage):
        # The connection broke before a complete answer: decides nothing.
        return ConnectionLost(f"the WebSocket handshake at {ws_url} was cut: {exc}", url=url)
    if isinstance(exc, InvalidHandshake):
        # An answer, but not a WebSocket handshake.
        return HandshakeRefused(f"no WebSocket at {ws_url}: {exc}", url=url)
    if isinstance(exc, TimeoutError):
        return RequestTimeout(f"the WebSocket handshake at {ws_url} timed out", url=url)
    return ConnectError(f"cannot connect to {ws_url}: {exc}", url=url)


def error_of(frame: Error, *, url: str, operation: str) -> DurableError:
    """An ``error`` frame as the error the same refusal raises over HTTP."""
    return error_from_status(
        frame.status, frame.headers, f"{frame.code}: {frame.message}", url=url, operation=operation
    )


# --- routing ---------------------------------------------------------------------

SubscriptionFrame: TypeAlias = Subscribed | Data | Error


@dataclass(frozen=True, slots=True)
class ForSubscription:
    """A frame for subscription ``sub``; ``size`` counts against its bound until taken.
    After an ``error`` frame the subscription is over (the wire forgot it)."""

    sub: str
    frame: SubscriptionFrame
    size: int


@dataclass(frozen=True, slots=True)
class FellBehind:
    """Subscription ``sub`` holds too much unread: end it with ``error`` (it resumes
    from its position) and send ``unsubscribe``. The wire forgot it."""

    sub: str
    error: ConnectionLost


@dataclass(frozen=True, slots=True)
class Answer:
    """The frame that answers request ``req``."""

    req: str
    frame: Ack | Error | Pong | AuthOk


@dataclass(frozen=True, slots=True)
class PresenceHeard:
    """Who is present now in the session ``frame.stream``."""

    frame: Presence


WireEvent: TypeAlias = ForSubscription | FellBehind | Answer | PresenceHeard


class ClientWire:
    """The routing state of one socket: its open subscriptions and what each holds unread.

    Feed :meth:`receive` every message; call :meth:`taken` when a consumer took
    a frame of a subscription, :meth:`open` and :meth:`close` as subscriptions
    start and stop.
    """

    #: Refusals with neither ``req`` nor ``sub`` kept for :meth:`take_stray_error`.
    MAX_STRAY_ERRORS: Final = 16

    def __init__(self, *, url: str, max_queued_frames: int, max_queued_bytes: int) -> None:
        self.url = url
        self.max_queued_frames = max_queued_frames
        self.max_queued_bytes = max_queued_bytes
        self._unread: dict[str, list[int]] = {}  # sub -> [frames, bytes] not yet taken
        self._stray_errors: list[Error] = []

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._unread)

    def open(self, sub: str) -> None:
        """Subscription ``sub`` starts: its frames are routed from now on."""
        self._unread[sub] = [0, 0]

    def close(self, sub: str) -> bool:
        """Subscription ``sub`` stops; False if the wire had already ended it."""
        return self._unread.pop(sub, None) is not None

    def taken(self, sub: str, size: int) -> None:
        """A consumer took a frame of ``size`` of subscription ``sub``."""
        unread = self._unread.get(sub)
        if unread is not None:
            unread[0] -= 1
            unread[1] -= size

    def receive(self, message: str | bytes) -> WireEvent | None:
        """What one received message is for (``None``: nobody waits for it).

        Raises :class:`ProtocolViolation` for a binary or malformed frame.
        """
        if isinstance(message, bytes):
            raise ProtocolViolation("the server sent a binary frame", url=self.url)
        try:
            frame: ServerFrame = SERVER_FRAME.validate_json(message)
        except ValidationError as exc:
            raise ProtocolViolation(
                f"the server sent a malformed frame: {exc.errors()[0]['msg']}", url=self.url
            ) from exc
        return self.route(frame, len(message))

    def route(self, frame: ServerFrame, size: int) -> WireEvent | None:
        """What a decoded frame of ``size`` characters is for."""
        if isinstance(frame, Data | Subscribed):
            unread = self._unread.get(frame.sub)
            if unread is None:
                return None  # unsubscribed meanwhile: frames in flight are dropped
            if unread[0] >= self.max_queued_frames or unread[1] + size > self.max_queued_bytes:
                del self._unread[frame.sub]
                return FellBehind(
                    frame.sub, ConnectionLost("the subscription fell behind", url=self.url)
                )
            unread[0] += 1
            unread[1] += size
            return ForSubscription(frame.sub, frame, size)
        if isinstance(frame, Ack | Pong | AuthOk):
            return Answer(frame.req, frame) if frame.req is not None else None
        if isinstance(frame, Error):
            if frame.req is not None:
                return Answer(frame.req, frame)
            if frame.sub is not None:
                # The subscription is over: its error is delivered past the bound.
                return ForSubscription(frame.sub, frame, size) if self.close(frame.sub) else None
            if len(self._stray_errors) < self.MAX_STRAY_ERRORS:
                self._stray_errors.append(frame)
            return None
        return PresenceHeard(frame)

    def take_stray_error(self, operation: str) -> DurableError | None:
        """The first refusal of a frame that had no ``req`` (e.g. a presence
        frame) since the last call, as an error; forgets the others."""
        if not self._stray_errors:
            return None
        first = self._stray_errors[0]
        self._stray_errors.clear()
        return error_of(first, url=self.url, operation=operation)


class SubscriptionFrames:
    """One subscription's frames in, the seam's batches out.

    Each ``data`` frame becomes a :class:`TransportBatch` from where the
    previous one ended; the ``subscribed`` frame names the stream's incarnation
    for the batches after it; an ``error`` frame raises what it means.
    """

    def __init__(self, offset: str, *, url: str) -> None:
        self.url = url
        self.offset = offset  # where the next batch starts
        self.incarnation: str | None = None

    def receive(self, frame: SubscriptionFrame) -> TransportBatch | None:
        """The batch ``frame`` carries (``None`` for ``subscribed``); raises for ``error``."""
        if isinstance(frame, Subscribed):
            self.incarnation = frame.incarnation
            return None
        if isinstance(frame, Error):
            raise error_of(frame, url=self.url, operation="subscribe")
        if frame.messages is None:
            raise ProtocolViolation("a data frame without messages", url=self.url)
        batch = TransportBatch(
            tuple(frame.messages),
            self.offset,
            frame.offset,
            frame.up_to_date,
            frame.closed,
            self.incarnation,
        )
        self.offset = frame.offset
        return batch


# --- presence --------------------------------------------------------------------


def presence_changes(before: tuple[Member, ...], after: tuple[Member, ...]) -> list[PresenceChange]:
    """The changes that turn ``before`` into ``after``, each with the members after it.

    Every presence frame carries the full list, so reporting the difference
    to what was known turns a snapshot (on subscribe, after a reconnect) into
    the joins and leaves it implies, and a join already heard of into nothing.
    """
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
