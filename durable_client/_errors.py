"""The one error tree of the SDK.

Everything ``durable_client`` raises on purpose derives from
:class:`DurableError`. The first split says whether retrying can help::

    DurableError                      every error the SDK raises
    ├── RetryableError                retrying the same request may succeed
    │   ├── TransportError            no complete HTTP answer arrived
    │   │   ├── ConnectError          could not connect (refused, DNS, TLS)
    │   │   ├── RequestTimeout        connect/read/write/pool timeout
    │   │   └── ConnectionLost        the connection broke mid-answer
    │   └── ServerBusy                the server asked us to come back later
    │       ├── RateLimited           429 (Retry-After honoured)
    │       └── ServerError           5xx (Retry-After honoured)
    ├── FatalError                    retrying the same request cannot help
    │   ├── StreamNotFound            404: no stream at that URL
    │   ├── StreamConflict            409: exists with another config, wrong content type
    │   │   ├── StreamClosed          409 + Stream-Closed: appends are refused for good
    │   │   ├── SequenceConflict      409: Stream-Seq did not increase
    │   │   └── SequenceGap           409: Producer-Seq skipped ahead (expected/received)
    │   ├── OffsetGone                410: the offset is no longer retained (or soft-deleted)
    │   ├── StreamReplaced            the stream was deleted and re-created since the position
    │   ├── NoProgress                a reader failed again and again at one offset
    │   ├── BadRequest                400: malformed request, bad offset, bad producer headers
    │   ├── Unauthorized              401
    │   ├── Forbidden                 403 without producer context
    │   │   └── StaleEpoch            403 + Producer-Epoch: a newer producer epoch fenced us
    │   │       └── EpochReused       this producer id and epoch already wrote other data
    │   ├── PayloadTooLarge           413
    │   ├── UnexpectedStatus          any other status we cannot interpret
    │   ├── ProtocolViolation         the answer breaks the protocol (bad JSON, bad SSE, offsets)
    │   └── PresenceUnavailable       presence needs the WebSocket transport; this one is HTTP
    ├── UsageError                    the caller misused the API (also a ValueError)
    │   └── ClientClosed              used after aclose()
    ├── TurnCancelled                 agent side: the turn being answered was cancelled
    └── TurnFenced                    agent side: another owner took the reply (lease lost)

HTTP and transport exceptions from httpx and websockets are mapped at the
boundary (``raise ... from exc``: httpx's in ``_http_errors``, websockets' in
``_core.wire``) and always carry the stream URL, so no httpx or websockets
exception escapes the SDK. This module imports neither. A WebSocket ``error`` frame
carries the HTTP status (and headers) the same request gets over HTTP, and
maps onto the same classes. Reading a closed stream is *not* an error: every
read mode ends cleanly at ``Stream-Closed``. Only appends to a closed stream
raise :class:`StreamClosed`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._protocol import (
    PRODUCER_EPOCH,
    PRODUCER_EXPECTED_SEQ,
    PRODUCER_RECEIVED_SEQ,
    STREAM_CLOSED,
    STREAM_NEXT_OFFSET,
    header_true,
)

__all__ = [
    "BadRequest",
    "ClientClosed",
    "ConnectError",
    "ConnectionLost",
    "DurableError",
    "EpochReused",
    "FatalError",
    "Forbidden",
    "NoProgress",
    "OffsetGone",
    "PayloadTooLarge",
    "PresenceUnavailable",
    "ProtocolViolation",
    "RateLimited",
    "RequestTimeout",
    "RetryableError",
    "SequenceConflict",
    "SequenceGap",
    "ServerBusy",
    "ServerError",
    "StaleEpoch",
    "StreamClosed",
    "StreamConflict",
    "StreamNotFound",
    "StreamReplaced",
    "TransportError",
    "TurnCancelled",
    "TurnFenced",
    "Unauthorized",
    "UnexpectedStatus",
    "UsageError",
]


class DurableError(Exception):
    """Base of every error the SDK raises.

    ``url`` is the stream URL the failed operation addressed (``None`` when the
    error is not about one stream). ``status`` is the HTTP status when there
    was an HTTP answer.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status = status
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status})")
        if self.url:
            parts.append(f"[{self.url}]")
        return " ".join(parts)


# --- retryable ---------------------------------------------------------------


class RetryableError(DurableError):
    """Retrying the same request may succeed (after a delay)."""

    retryable = True
    #: Seconds the server asked us to wait (``Retry-After``), if it said.
    retry_after: float | None = None


class TransportError(RetryableError):
    """No complete HTTP answer arrived."""


class ConnectError(TransportError):
    """The connection could not be established."""


class RequestTimeout(TransportError):
    """Connecting, sending or waiting for the answer took too long."""


class ConnectionLost(TransportError):
    """The connection broke before the answer was complete."""


class ServerBusy(RetryableError):
    """The server answered with a status that says "try again later"."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, headers=headers)
        self.retry_after = retry_after


class RateLimited(ServerBusy):
    """HTTP 429."""


class ServerError(ServerBusy):
    """HTTP 5xx."""


# --- fatal -------------------------------------------------------------------


class FatalError(DurableError):
    """Retrying the same request cannot help; the caller must change something."""


class StreamNotFound(FatalError):
    """HTTP 404: there is no stream at this URL (never created, deleted or expired)."""


class StreamConflict(FatalError):
    """HTTP 409: the stream exists with another configuration, or the content type differs."""


class StreamClosed(StreamConflict):
    """The stream is closed: no append will ever be accepted again.

    ``final_offset`` is the stream's final offset when the server reported it.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        final_offset: str | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, headers=headers)
        self.final_offset = final_offset


class SequenceConflict(StreamConflict):
    """HTTP 409: the ``Stream-Seq`` writer sequence did not increase."""


class SequenceGap(StreamConflict):
    """HTTP 409: the producer sequence skipped ahead of what the server expected."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        expected_seq: int | None = None,
        received_seq: int | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, headers=headers)
        self.expected_seq = expected_seq
        self.received_seq = received_seq


class OffsetGone(FatalError):
    """HTTP 410: the offset is older than what the server retains (or the stream was
    soft-deleted). Reading on would leave a silent gap, so the SDK stops here."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        offset: str | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, headers=headers)
        self.offset = offset


class StreamReplaced(FatalError):
    """The stream at this URL is not the one a saved position belongs to: it was
    deleted and re-created (or its server lost it and it was created anew) since.
    Its offsets mean nothing in the new stream, so resuming would skip or repeat
    silently; the SDK stops instead (or starts the new stream from its
    beginning, if the subscription was asked to).

    ``expected`` is the incarnation the position belongs to, ``actual`` the one
    the server has now (``None`` when it did not say).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, headers=headers)
        self.expected = expected
        self.actual = actual


class NoProgress(FatalError):
    """A reader reached the server again and again and every connection failed
    at the same position without delivering anything (a server that cannot
    serve the stream from there, for example a record it cannot encode).
    Reconnecting forever would only spin, so the reader stops.

    ``offset`` is where it stood, ``attempts`` how many connections in a row
    failed there; the last failure is ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        offset: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message, url=url)
        self.offset = offset
        self.attempts = attempts


class BadRequest(FatalError):
    """HTTP 400: the server rejected the request as malformed."""


class Unauthorized(FatalError):
    """HTTP 401."""


class Forbidden(FatalError):
    """HTTP 403."""


class StaleEpoch(Forbidden):
    """HTTP 403 with ``Producer-Epoch``: a producer with a newer epoch fenced this one."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        current_epoch: int | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, headers=headers)
        self.current_epoch = current_epoch


class EpochReused(StaleEpoch):
    """This producer id and epoch already wrote other data to the stream: an
    earlier run, or another instance, used the same stamps. Sending on would
    have the new data taken for retries of the old and dropped, so the producer
    stops (or, with ``auto_claim``, moves to a new epoch and sends it there). A
    restarted producer with a stable id must start a new epoch."""


class PayloadTooLarge(FatalError):
    """HTTP 413."""


class UnexpectedStatus(FatalError):
    """An HTTP status the operation does not expect."""


class ProtocolViolation(FatalError):
    """The server's answer breaks the protocol: malformed JSON or SSE, missing offsets."""


class PresenceUnavailable(FatalError):
    """Presence needs the WebSocket transport, and this session uses HTTP
    (the server does not offer WebSocket, or HTTP was chosen)."""


# --- usage -------------------------------------------------------------------


class UsageError(DurableError, ValueError):
    """The caller passed an invalid argument or misused the API."""


class ClientClosed(UsageError):
    """The object was used after ``aclose()``."""


class TurnCancelled(DurableError):
    """Raised by ``Reply.write()`` once a cancel for the reply's turn arrived.

    Not a failure: ``async with agent.reply(turn)`` catches it and ends the
    turn with reason ``cancelled``. ``cancel`` is the cancel event, if known.
    """

    def __init__(self, message: str, *, url: str | None = None, cancel: object = None) -> None:
        super().__init__(message, url=url)
        self.cancel = cancel


class TurnFenced(DurableError):
    """A reply's lease belongs to someone else now, so this owner may not write to it.

    Another instance claimed the turn first (``turn_start``), a new owner
    adopted the reply (``turn_adopt``), or a reader ended it after its lease
    lapsed (``turn_end``, reason ``abandoned``): the server refuses this
    owner's writes from then on. ``by`` is that event when the reply has seen
    it (``None`` when only the server's refusal is known). Not a failure of
    the caller: ``async with agent.reply(turn)`` catches it and publishes
    nothing more.
    """

    def __init__(self, message: str, *, url: str | None = None, by: object = None) -> None:
        super().__init__(message, url=url)
        self.by = by


# --- mapping at the boundary -------------------------------------------------


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        import datetime as _dt

        now = _dt.datetime.now(tz=when.tzinfo or _dt.UTC)
        seconds = (when - now).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def error_from_status(
    status: int, headers: Mapping[str, str], detail: str, *, url: str, operation: str
) -> DurableError:
    """Map a refusal (an HTTP status, its protocol headers and its text) to the tree.

    Shared by HTTP answers and WebSocket ``error`` frames, which carry the
    status and headers the same request gets over HTTP.
    """
    h = {k.lower(): v for k, v in headers.items()}
    detail = detail.strip()
    if len(detail) > 200:
        detail = detail[:200] + "..."
    message = f"{operation} failed" + (f": {detail}" if detail else "")

    if status == 429 or 500 <= status <= 599:
        cls: type[ServerBusy] = RateLimited if status == 429 else ServerError
        return cls(
            message,
            url=url,
            status=status,
            headers=h,
            retry_after=parse_retry_after(h.get("retry-after")),
        )
    if status == 409:
        if header_true(h.get(STREAM_CLOSED.lower())):
            return StreamClosed(
                f"{operation} failed: stream is closed",
                url=url,
                status=status,
                headers=h,
                final_offset=h.get(STREAM_NEXT_OFFSET.lower()),
            )
        expected = _parse_int(h.get(PRODUCER_EXPECTED_SEQ.lower()))
        received = _parse_int(h.get(PRODUCER_RECEIVED_SEQ.lower()))
        if expected is not None or received is not None:
            return SequenceGap(
                f"{operation} failed: producer sequence gap "
                f"(expected {expected}, received {received})",
                url=url,
                status=status,
                headers=h,
                expected_seq=expected,
                received_seq=received,
            )
        if "seq" in detail.lower():
            return SequenceConflict(message, url=url, status=status, headers=h)
        return StreamConflict(message, url=url, status=status, headers=h)
    if status == 410:
        return OffsetGone(
            f"{operation} failed: offset no longer retained or stream deleted",
            url=url,
            status=status,
            headers=h,
        )
    if status == 403:
        epoch = _parse_int(h.get(PRODUCER_EPOCH.lower()))
        if epoch is not None:
            return StaleEpoch(
                f"{operation} failed: producer epoch refused (server epoch {epoch})"
                + (f": {detail}" if detail else ""),
                url=url,
                status=status,
                headers=h,
                current_epoch=epoch,
            )
    simple: dict[int, tuple[type[FatalError], str]] = {
        400: (BadRequest, message),
        401: (Unauthorized, message),
        403: (Forbidden, message),
        404: (StreamNotFound, f"{operation} failed: stream not found"),
        413: (PayloadTooLarge, message),
    }
    fatal_cls, text = simple.get(status, (UnexpectedStatus, f"{message} (unexpected status)"))
    return fatal_cls(text, url=url, status=status, headers=h)
