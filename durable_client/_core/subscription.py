"""A reader's decisions, without I/O: what each batch, end and failure means.

Two readers follow a stream and reconnect when it breaks:
``DurableStream.follow`` (one stream's batches over HTTP) and a session's
:class:`~durable_client.Subscription` (exactly-once events over any
transport). Their asyncio code opens connections, waits and sleeps; every
decision is made here, by feeding in what happened and reading out what to do:

- :class:`HttpReadState` decides which HTTP read comes next (catch-up, SSE
  or long-poll, from which offset, with which cursor), and what an answer
  changes. ``DurableStream.follow`` and the HTTP session transport use it.
- :class:`SubscriptionState` turns a session's batches into :class:`Deliver`
  (an event and the position after it), :class:`Restart` (the stream was
  replaced) and :class:`End`, and failures into :class:`ResumeAt` or
  :class:`Fail`. It wraps a :class:`~durable_client._offsets.ResumeTracker`.

How long to wait before a resume is not decided here but by the reconnect
core (``_core.reconnect``): a :class:`ResumeAt` is a failure to hand to it.

Rules both readers follow, each written once:

- **SSE refused, long-poll instead**: a 400 or an unexpected answer to an SSE
  request, before any event, means the server (or a proxy) does not do SSE
  here; a reader allowed to fall back reads with long-poll from then on. A
  refusal that names the stream's incarnation comes from the stream itself (an
  offset it never issued), not from SSE, and is raised.
- **No progress is a failure**: a long-poll answered 200 with no data and the
  same offset would make a reader spin; it counts as a lost connection, so the
  reconnect policy backs off (a 204 is a long-poll timing out, which is fine).
- **A connection that ends before any data is a failure**: a server that
  accepts and closes at once would otherwise be reconnected to in a tight
  loop. One that ends after data is a server recycling connections: resume at
  once.
- **Replaced**: a batch, or a 400, naming another ``Stream-Incarnation`` than
  the position's means the stream was deleted and re-created; its offsets mean
  nothing in the new one. Raise :class:`~durable_client.StreamReplaced`, or
  (``on_replaced="restart"``) start again at the new stream's beginning.
- **The beginning is what is retained**: a read from ``-1`` refused with 410
  (a server whose ``-1`` does not skip a trimmed start) starts again at the
  earliest retained offset the refusal names; a 410 anywhere else raises.
- **No progress is bounded**: connections that reach the server and fail at
  one position before delivering anything, ``max_no_progress`` times in a
  row, raise :class:`~durable_client.NoProgress` (the offset, the last cause)
  instead of reconnecting forever; failures to reach it at all do not count.
- **Caught up once**: the last delivery of the first up-to-date batch says so;
  later up-to-date batches do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

from .._errors import (
    BadRequest,
    ConnectError,
    ConnectionLost,
    DurableError,
    NoProgress,
    OffsetGone,
    RateLimited,
    RequestTimeout,
    StreamReplaced,
    UnexpectedStatus,
    UsageError,
)
from .._events import AnyEvent, parse_event
from .._offsets import EventIdDeduper, Position, ResumeTracker
from .._protocol import OFFSET_BEGINNING, OFFSET_NOW, STREAM_INCARNATION, STREAM_NEXT_OFFSET
from .reconnect import is_retryable

__all__ = [
    "Connected",
    "Deliver",
    "End",
    "Fail",
    "HttpReadState",
    "LiveBatch",
    "NextRead",
    "OnReplaced",
    "ReadMode",
    "Restart",
    "ResumeAt",
    "SessionBatch",
    "SubscriptionState",
    "earliest_retained",
    "ended_before_data",
    "reached_the_server",
    "sse_refused",
]

#: What a subscription does when its stream turns out to be a new incarnation:
#: ``"raise"`` :class:`StreamReplaced`, or ``"restart"`` at its beginning.
OnReplaced: TypeAlias = Literal["raise", "restart"]

#: The three kinds of HTTP read.
ReadMode: TypeAlias = Literal["catch-up", "sse", "long-poll"]

_INCARNATION = STREAM_INCARNATION.lower()
_NEXT_OFFSET = STREAM_NEXT_OFFSET.lower()


# --- the rules -----------------------------------------------------------------


def sse_refused(error: BaseException, *, got_any: bool) -> bool:
    """Whether ``error``, ending an SSE request, says the server does not do SSE
    (so long-poll may stand in): a 400 or an unexpected answer before any
    event, that does not come from the stream itself (which names its
    incarnation when it refuses an offset)."""
    return (
        isinstance(error, BadRequest | UnexpectedStatus)
        and not got_any
        and _INCARNATION not in error.headers
    )


def reached_the_server(error: BaseException) -> bool:
    """Whether ``error`` ended a connection the server took (so a failure
    there says something about the read), rather than an outage: a refused or
    timed-out connection, or a server that said when to come back
    (429, or a 5xx with ``Retry-After``)."""
    if isinstance(error, ConnectError | RequestTimeout | RateLimited):
        return False
    return getattr(error, "retry_after", None) is None


def earliest_retained(error: BaseException) -> str | None:
    """The earliest retained offset a 410 names (``Stream-Next-Offset``), if it
    is one: where "the beginning" of a trimmed stream is."""
    if not isinstance(error, OffsetGone):
        return None
    earliest = error.headers.get(_NEXT_OFFSET)
    if not earliest or earliest in (OFFSET_BEGINNING, OFFSET_NOW):
        return None
    return earliest


def _no_progress(offset: str, attempts: int, error: DurableError, url: str | None) -> NoProgress:
    return NoProgress(
        f"the read cannot make progress at offset {offset}: {attempts} connections"
        f" in a row failed there before delivering anything (last: {error})",
        url=url,
        offset=offset,
        attempts=attempts,
    )


def ended_before_data(url: str | None) -> ConnectionLost:
    """The failure of a connection that ended before any data."""
    return ConnectionLost("the connection ended before any data", url=url)


def _stalled(url: str | None) -> ConnectionLost:
    return ConnectionLost("a long-poll answer made no progress", url=url)


# --- HTTP reads ------------------------------------------------------------------


class LiveBatch(Protocol):
    """What :class:`HttpReadState` reads of an HTTP answer (a ``ReadBatch``)."""

    @property
    def offset(self) -> str: ...
    @property
    def cursor(self) -> str | None: ...
    @property
    def data(self) -> bytes: ...
    @property
    def status(self) -> int: ...
    @property
    def up_to_date(self) -> bool: ...
    @property
    def closed(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class NextRead:
    """The read to make: ``mode`` from ``offset``, echoing ``cursor``."""

    mode: ReadMode
    offset: str
    cursor: str | None


class HttpReadState:
    """Which HTTP read comes next, and what each answer changes.

    Args:
        offset: where to read from.
        catch_up: start with plain reads until the tail (else go live at once).
        live: how to read once caught up (``None``: stop at the tail).
        fallback: on an SSE refusal (:func:`sse_refused`), read with long-poll
            from then on (else the refusal is raised).
        cursor: the server's cursor from an earlier read, if any.
        max_no_progress: after this many failed reads in a row that reached
            the server, with no successful answer between them, the failure
            becomes :class:`~durable_client.NoProgress` (``None``: never).
        url: for the errors it raises.

    Feed it with :meth:`batch_received` for every answer, :meth:`falls_back`
    when an SSE request fails, :meth:`connection_ended` when an SSE response
    ends, :meth:`failure` when a read fails; read :meth:`next_read` and
    :attr:`done`.
    """

    def __init__(
        self,
        offset: str,
        *,
        catch_up: bool = True,
        live: Literal["sse", "long-poll"] | None = "sse",
        fallback: bool = False,
        cursor: str | None = None,
        max_no_progress: int | None = None,
        url: str | None = None,
    ) -> None:
        if not catch_up and live is None:
            raise UsageError("a read that does not catch up must read live")
        self.max_no_progress = max_no_progress
        #: Failed reads in a row that reached the server (see :meth:`failure`).
        self.no_progress = 0
        self.offset = offset
        self.cursor = cursor
        self.mode: ReadMode = "catch-up" if catch_up else (live or "sse")
        self.live = live
        self.fallback = fallback
        self.url = url
        #: The stream is closed and read to its end, or caught up with ``live=None``.
        self.done = False
        self._got_any = False
        self._stalled = False

    def next_read(self) -> NextRead:
        """The read to make now.

        Raises :class:`ConnectionLost` instead, once, after a long-poll answer
        that made no progress: a failure for the reconnect policy to wait on.
        """
        if self.done:
            raise UsageError("the read is done")
        if self._stalled:
            self._stalled = False
            raise _stalled(self.url)
        self._got_any = False
        return NextRead(self.mode, self.offset, self.cursor)

    def batch_received(self, batch: LiveBatch) -> bool:
        """Take one answer of the read :meth:`next_read` named.

        Returns whether it counts as a success (the reconnect count starts
        again): any catch-up answer or SSE batch, a long-poll answer that made
        progress. The next read is then :meth:`next_read`.
        """
        start = self.offset
        self._got_any = True
        self.offset = batch.offset
        self.cursor = batch.cursor or self.cursor
        progressed = batch.offset != start or bool(batch.data)
        if batch.closed:
            self.done = True
            self.no_progress = 0
            return True
        if self.mode == "long-poll" and not progressed and batch.status != 204:
            self._stalled = True
            return False
        self.no_progress = 0
        if self.mode == "catch-up":
            if batch.up_to_date or not progressed:
                if self.live is None:
                    self.done = True
                else:
                    self.mode = self.live
            return True
        return True

    def failure(self, error: DurableError) -> DurableError:
        """A read failed with ``error``: the error to raise for it.

        ``error`` itself, or :class:`NoProgress` (its cause ``error``) once
        ``max_no_progress`` reads in a row reached the server and failed at
        :attr:`offset` with no successful answer between them (see
        :func:`reached_the_server`: an outage does not count).
        """
        if not is_retryable(error) or not reached_the_server(error):
            return error
        self.no_progress += 1
        if self.max_no_progress is None or self.no_progress < self.max_no_progress:
            return error
        stuck = _no_progress(self.offset, self.no_progress, error, self.url)
        stuck.__cause__ = error
        return stuck

    def from_earliest(self, error: BaseException) -> bool:
        """Whether the reader goes on at the earliest retained offset after
        ``error`` refused a read from the beginning (``-1``, nothing read yet)
        with 410 (see :func:`earliest_retained`); the next read is from there."""
        if self._got_any or self.offset != OFFSET_BEGINNING:
            return False
        earliest = earliest_retained(error)
        if earliest is None:
            return False
        self.offset = earliest
        return True

    def falls_back(self, error: BaseException) -> bool:
        """Whether the reader goes on with long-poll after ``error`` ended an SSE
        request (the server refuses SSE); if not, the error is the reader's."""
        if self.mode != "sse" or not self.fallback or not sse_refused(error, got_any=self._got_any):
            return False
        self.mode = "long-poll"
        return True

    def connection_ended(self) -> None:
        """An SSE response ended without an error: the next read resumes at once.

        Raises :class:`ConnectionLost` if it ended before any data.
        """
        if not self._got_any:
            raise ended_before_data(self.url)


# --- session subscriptions ---------------------------------------------------------


class SessionBatch(Protocol):
    """What :class:`SubscriptionState` reads of a batch (a ``TransportBatch``)."""

    @property
    def messages(self) -> Sequence[Any]: ...
    @property
    def start_offset(self) -> str: ...
    @property
    def offset(self) -> str: ...
    @property
    def up_to_date(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def incarnation(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Connected:
    """The connection delivers: the reconnect count starts again."""


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``event`` out and stand at ``position`` after it.

    ``event`` is ``None`` when only the position moves (past a duplicate, to
    the end of a batch, onto a named incarnation). ``caught_up`` marks the last
    delivery of the first up-to-date batch.
    """

    event: AnyEvent | None
    position: Position
    caught_up: bool = False


@dataclass(frozen=True, slots=True)
class Restart:
    """Stand at ``position`` and read from there now, dropping this connection:
    the stream was replaced (``position`` is the new stream's beginning), or
    its beginning was trimmed (``position`` is its earliest retained offset)."""

    position: Position


@dataclass(frozen=True, slots=True)
class End:
    """The stream is closed and read to its end: nothing more will come."""


@dataclass(frozen=True, slots=True)
class ResumeAt:
    """A failure that retrying may fix: after the reconnect policy's wait,
    connect again at ``position``."""

    position: Position


@dataclass(frozen=True, slots=True)
class Fail:
    """A failure that retrying cannot fix: stop with ``error``."""

    error: DurableError


class SubscriptionState:
    """A session subscription's decisions: batches in, deliveries out.

    Args:
        start: the position to start at (resolved: a real offset or ``-1``).
        on_replaced: ``"raise"`` or ``"restart"`` (see the module docstring).
        dedupe_capacity: how many event ids to remember to drop duplicates.
        max_no_progress: after this many connections in a row that reached the
            server and failed at one position before any batch, fail with
            :class:`~durable_client.NoProgress` (``None``: never).
        url: for the errors it makes.

    Per connection: :meth:`connect` (where to read from), then
    :meth:`batch_received` for each batch, then :meth:`connection_ended` or
    :meth:`failure`.
    """

    def __init__(
        self,
        start: Position,
        *,
        on_replaced: OnReplaced = "raise",
        dedupe_capacity: int = 10_000,
        max_no_progress: int | None = None,
        url: str | None = None,
    ) -> None:
        self.on_replaced: OnReplaced = on_replaced
        self.max_no_progress = max_no_progress
        #: Connections in a row that reached the server and failed before any
        #: batch, all at :attr:`position` (see :meth:`failure`).
        self.no_progress = 0
        self.url = url
        self._tracker = ResumeTracker(start)
        self._dedupe_capacity = dedupe_capacity
        self._dedupe = EventIdDeduper(dedupe_capacity)
        #: How often the stream was found replaced and reading started over.
        self.replacements = 0
        #: Whether the caught-up delivery was made.
        self.caught_up = False
        #: Whether the stream was read to its close.
        self.closed = False
        self._got_any = False

    @property
    def position(self) -> Position:
        """Where the next connection resumes: after every batch received."""
        return self._tracker.position

    def connect(self) -> Position:
        """A connection is about to open: the position to read from."""
        self._got_any = False
        return self.position

    def batch_received(self, batch: SessionBatch) -> list[Connected | Deliver | Restart | End]:
        """Take one batch of the current connection; what to do, in order.

        Raises :class:`~durable_client.ProtocolViolation` if the batch does not
        start where the last one ended or its offsets go backwards, and
        :class:`StreamReplaced` (``on_replaced="raise"``) for another incarnation.
        """
        out: list[Connected | Deliver | Restart | End] = []
        if not self._got_any:
            self._got_any = True
            self.no_progress = 0
            out.append(Connected())
        if batch.incarnation is not None:
            known = self.position.incarnation
            if known is None:
                # From now on the position (and what an offset store saves)
                # names the incarnation it belongs to.
                self._tracker.position = self.position.with_incarnation(batch.incarnation)
                out.append(Deliver(None, self.position))
            elif known != batch.incarnation:
                out.append(self._replaced(known, batch.incarnation))
                return out
        out.extend(self._take(batch))
        if batch.closed:
            self.closed = True
            out.append(End())
        return out

    def connection_ended(self) -> None:
        """The connection ended without an error: the next one resumes at once.

        Raises :class:`ConnectionLost` if it ended before any data, or
        :class:`NoProgress` (chained to it) once that was the
        ``max_no_progress``-th failure in a row at this position.
        """
        if not self._got_any:
            lost = ended_before_data(self.url)
            stuck = self._stuck(lost)
            if stuck is not None:
                raise stuck from lost
            raise lost

    def failure(self, error: DurableError) -> ResumeAt | Restart | Fail:
        """The connection failed with ``error``: resume, restart, or stop.

        **No progress is bounded**: a connection that reached the server
        (:func:`reached_the_server`) and failed before any batch, at the same
        position as the ones before it, counts; the ``max_no_progress``-th in a
        row fails with :class:`NoProgress` naming the offset and ``error``. A
        batch received starts the count again; an outage does not count.
        """
        if isinstance(error, BadRequest):
            # A server that tracks incarnations refuses an offset of an earlier
            # one (400) and says which incarnation it has now.
            actual = error.headers.get(_INCARNATION)
            known = self.position.incarnation
            if known is not None and actual is not None and actual != known:
                try:
                    return self._replaced(known, actual)
                except StreamReplaced as replaced:
                    return Fail(replaced)
        if isinstance(error, OffsetGone):
            earliest = self._earliest_retained(error)
            if earliest is not None:
                return Restart(self.position)
        if is_retryable(error):
            stuck = None if self._got_any else self._stuck(error)
            if stuck is not None:
                stuck.__cause__ = error
                return Fail(stuck)
            return ResumeAt(self.position)
        return Fail(error)

    def _stuck(self, error: DurableError) -> NoProgress | None:
        """Count a connection that failed before any batch; the error once the
        bound is reached."""
        if not reached_the_server(error):
            return None
        self.no_progress += 1
        limit = self.max_no_progress
        if limit is None or self.no_progress < limit:
            return None
        return _no_progress(self.position.offset, self.no_progress, error, self.url)

    def _earliest_retained(self, error: OffsetGone) -> Position | None:
        """Where "the beginning" is once the stream's start was trimmed away.

        A read from the beginning (``-1``, nothing read yet) that gets a 410
        naming the earliest retained offset (``Stream-Next-Offset``) starts
        there: the beginning of a trimmed stream is what it retains, as the
        protocol's ``-1`` means. Any other position refused with 410 is events
        missed, and raises."""
        position = self.position
        if position.offset != OFFSET_BEGINNING or position.skip or self._got_any:
            return None
        earliest = earliest_retained(error)
        if earliest is None:
            return None
        incarnation = position.incarnation or error.headers.get(_INCARNATION)
        self._tracker = ResumeTracker(Position(earliest, 0, incarnation))
        self.no_progress = 0
        return self.position

    def _replaced(self, expected: str, actual: str) -> Restart:
        if self.on_replaced == "raise":
            raise StreamReplaced(
                "the session's stream was deleted and re-created (or its server lost it) "
                f"since this position was taken (incarnation {expected}, now {actual}); "
                "its offsets mean nothing in the new stream. Subscribe from the beginning, "
                "or pass on_replaced='restart'",
                url=self.url,
                expected=expected,
                actual=actual,
            )
        self.replacements += 1
        self._dedupe = EventIdDeduper(self._dedupe_capacity)
        self._tracker = ResumeTracker(Position.beginning(actual))
        return Restart(self.position)

    def _take(self, batch: SessionBatch) -> list[Deliver]:
        before = self.position
        accepted = self._tracker.accept(batch.start_offset, batch.messages, batch.offset)
        caught_up = batch.up_to_date and not self.caught_up
        self.caught_up = self.caught_up or caught_up
        deliveries: list[Deliver] = []
        for message, position in accepted:
            event = parse_event(message)
            if event.event_id is not None and self._dedupe.seen(event.event_id):
                deliveries.append(Deliver(None, position))
            else:
                deliveries.append(Deliver(event, position))
        end = self.position
        last = deliveries[-1].position if deliveries else None
        # The batch moved the position past its last message (or it is the
        # caught-up point): say so, so that the consumer's position follows.
        if end != last and (end != before or caught_up):
            deliveries.append(Deliver(None, end))
        if caught_up:
            deliveries[-1] = Deliver(deliveries[-1].event, deliveries[-1].position, True)
        return deliveries
