"""Sessions: the API app developers use.

A :class:`Session` is one JSON-mode stream of session events shared by users
and agents. :meth:`Session.subscribe` gives history then live, exactly once
and in order, across any number of disconnects; :meth:`Session.publish`
appends events exactly once, queueing them while the server is unreachable;
:attr:`Session.status` and :meth:`Session.status_changes` tell a UI how the
connection is doing; :attr:`Session.members`, :meth:`Session.presence_changes`
and :meth:`Session.set_presence` say who else is here (over WebSocket).

Transports
----------
By default a session uses our WebSocket transport when the server offers it
(one socket for every subscription, publish and presence of the session) and
falls back to HTTP (SSE, then long-poll) for good when the server refuses the
handshake; ``transport="websocket"`` or ``"http"`` forces one. Either way the
session does the same things on top: resume, dedupe, retries.

How a subscription delivers each event exactly once
----------------------------------------------------
A background task (the pump) reads batches from the transport and runs them
through a :class:`ResumeTracker`: each message comes out once, paired with the
:class:`Position` just after it (offset plus the number of messages already
taken from the batch at that offset; see ``_offsets``). When the connection
drops, the pump reconnects from the tracker's position, so the server resends
nothing that was already taken and skips nothing. SSE data is taken only
together with the control event that carries its offset, so a connection cut
between the two loses nothing: the data is simply read again. As a second
guard, events whose ``event_id`` was already delivered are dropped (this
catches duplicates *in the log*, written by a publisher that re-sent an event
under a new producer id or epoch after a crash).

The consumer side hands events out in order and records the position of the
last one it handed out. With an :class:`OffsetStore`, that position is saved
when the consumer asks for the next event (the previous one is then
processed) and when the subscription is closed, so a restarted process
resumes right after the last event it finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from ._errors import (
    BadRequest,
    ClientClosed,
    ConnectionLost,
    DurableError,
    PresenceUnavailable,
    RetryableError,
    StreamReplaced,
    UsageError,
)
from ._events import (
    AnyEvent,
    Author,
    AuthorKind,
    Cancel,
    CancelScope,
    Progress,
    ProgressStatus,
    Steer,
    SteerMode,
    UserMessage,
    new_id,
    parse_event,
)
from ._offsets import EventIdDeduper, OffsetStore, Position, ResumeTracker
from ._producer import IdempotentProducer, ProducerStamp
from ._protocol import JSON_CONTENT_TYPE, OFFSET_BEGINNING, OFFSET_NOW, STREAM_INCARNATION
from ._retry import Backoff, ReconnectPolicy, RetryPolicy
from ._state import ConnectionStatus, StatusFeed
from ._stream import AppendResult, DurableStream, DynamicValue
from ._transport import HttpTransport, SessionTransport, TransportBatch
from ._ws import (
    AutoTransport,
    PresenceChange,
    PresenceTransport,
    WebSocketOptions,
    WebSocketTransport,
    stream_name_of,
    websocket_url_of,
)
from ._ws_frames import Member

__all__ = [
    "DEFAULT_SESSION_PATH",
    "OnReplaced",
    "PublishAck",
    "Session",
    "StartPoint",
    "Subscription",
    "TransportChoice",
]

#: Where sessions live under the server's base URL.
DEFAULT_SESSION_PATH = "/v1/stream/sessions/{session_id}"

#: Where a subscription starts: ``"beginning"``, ``"now"``, a saved
#: :class:`Position`, or an offset string from an earlier read.
StartPoint: TypeAlias = Literal["beginning", "now"] | Position | str

#: Which transport a session uses: ``"auto"`` (WebSocket if the server offers
#: it, else HTTP), ``"websocket"`` or ``"http"``.
TransportChoice: TypeAlias = Literal["auto", "websocket", "http"]

#: What a subscription does when the session's stream turns out to be a new
#: incarnation (deleted and re-created since its position was taken):
#: ``"raise"`` :class:`StreamReplaced`, or ``"restart"`` from the new stream's
#: beginning (``Subscription.replacements`` counts how often).
OnReplaced: TypeAlias = Literal["raise", "restart"]


@dataclass(frozen=True, slots=True)
class PublishAck:
    """A published event and where it landed.

    ``offset`` is the stream offset right after the event (after the request
    that carried it, when several events shared one request): a subscription
    started there sees only later events. It is ``None`` in one case: the
    append was retried after its answer was lost, and the server recognised
    the retry as a duplicate (``duplicate=True``). Servers do not say where the
    original landed then (the Node reference sends no offset, ours sends the
    current tail), so no offset is better than a wrong one. The event is in
    the session exactly once either way.
    """

    event: AnyEvent
    offset: str | None
    duplicate: bool


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_END = _Marker("end")


@dataclass(frozen=True, slots=True)
class _Delivery:
    event: AnyEvent | None  # None: nothing to hand out, only the position moves
    position: Position
    caught_up: bool = False  # the last delivery of the first up-to-date batch


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


_QueueItem: TypeAlias = _Delivery | _Failure | _Marker


async def _aclose_iter(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class _Link:
    """A wait on the network that :meth:`Session.drop_connections` may cut.

    Cutting cancels the wait (so an HTTP request or SSE read is abandoned and
    its connection closed) and raises :class:`ConnectionLost` in its place,
    which the session retries like any network failure.
    """

    __slots__ = ("_scope", "_session")

    def __init__(self, session: Session) -> None:
        self._session = session
        self._scope = asyncio.timeout(None)

    async def __aenter__(self) -> None:
        await self._scope.__aenter__()
        self._session._links.add(self._scope)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._session._links.discard(self._scope)
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except TimeoutError as error:
            raise ConnectionLost(
                "the connection was dropped (drop_connections)", url=self._session.url
            ) from error


class _DroppableSink:
    """The session's transport as the producer's sink, with each send cuttable."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def url(self) -> str:
        return self._session.url

    async def send_batch(
        self, items: Any, *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        async with _Link(self._session):
            return await self._session._transport.send_batch(items, stamp=stamp, close=close)


class Subscription:
    """History then live events of a session; iterate it, then close it.

    ::

        async with session.subscribe(start="beginning") as events:
            async for event in events:
                ...

    Iteration ends when the session's stream is closed, or when the
    subscription (or its session) is closed, from any task; a fatal error (for
    example :class:`OffsetGone`) is raised from the iteration after the events
    before it. Closing a subscription cancels nothing in the session.

    A position belongs to one incarnation of the stream. If the stream was
    deleted and re-created since (or its server lost it and it was created
    anew), the subscription raises :class:`StreamReplaced` rather than resume
    at an offset that means nothing there; with ``on_replaced="restart"`` it
    starts over from the new stream's beginning instead.
    """

    def __init__(
        self,
        session: Session,
        start: StartPoint,
        *,
        offset_store: OffsetStore | None,
        consumer: str,
        queue_size: int,
        dedupe_capacity: int,
        on_replaced: OnReplaced = "raise",
    ) -> None:
        if on_replaced not in ("raise", "restart"):
            raise UsageError(f"on_replaced must be 'raise' or 'restart': {on_replaced!r}")
        self._session = session
        self._start = start
        self.on_replaced: OnReplaced = on_replaced
        self._dedupe_capacity = dedupe_capacity
        #: How many times the stream was found replaced and reading started over
        #: from the new stream's beginning (``on_replaced="restart"``).
        self.replacements = 0
        self._store = offset_store
        self.consumer = consumer
        self.key = f"{session.url}#{consumer}"
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue(maxsize=queue_size)
        self._dedupe = EventIdDeduper(dedupe_capacity)
        self._task: asyncio.Task[None] | None = None
        self._pending: Position | None = None
        self._committed: Position | None = None
        self._done = False
        self._closed = False
        #: Set once every event that existed when the subscription first reached
        #: the tail has been handed out ("history loaded"): as the last of them is
        #: returned, or while the consumer waits for the next event.
        self.caught_up = asyncio.Event()
        #: The position right after the last event handed out (``None`` before).
        self.position: Position | None = None
        #: The position the subscription started from, once it is pinned.
        self.start_position: Position | None = None
        self._pinned = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._closed:
            raise ClientClosed("this subscription was closed", url=self._session.url)
        if self._task is None:
            self._session._check_open()
            self._task = asyncio.get_running_loop().create_task(
                self._pump(), name=f"durable-subscription:{self.key}"
            )

    async def start(self) -> Position | None:
        """Start reading and wait until the start point is pinned to a real
        offset (``"now"`` resolved), so that every event published after this
        returns is delivered. Returns the start position (``None`` if the
        subscription failed first; iterating raises the error)."""
        self._ensure_started()
        assert self._task is not None
        pinned = asyncio.ensure_future(self._pinned.wait())
        try:
            await asyncio.wait({pinned, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pinned.cancel()
        return self.start_position

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Subscription:
        return self

    async def aclose(self) -> None:
        """Stop reading. Saves the position of the last event handed out. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._commit()
        self._session._subscriptions.discard(self)

    # --- consumer side -------------------------------------------------------------

    async def __anext__(self) -> AnyEvent:
        if self._done or self._closed:
            raise StopAsyncIteration
        self._ensure_started()
        await self._commit()
        while True:
            item = await self._next_item()
            if isinstance(item, _Delivery):
                self.position = item.position
                if item.caught_up:
                    self.caught_up.set()
                if item.event is None:
                    self._pending = item.position
                    await self._commit()
                    continue
                self._pending = item.position
                return item.event
            self._done = True
            await self._commit()
            if isinstance(item, _Failure):
                raise item.error
            raise StopAsyncIteration

    async def _next_item(self) -> _QueueItem:
        """The next item of the pump, or the end once the subscription is closed
        or the pump stopped (a consumer never waits on a pump that is gone)."""
        queue = self._queue
        while True:
            if self._closed:
                return _END
            if not queue.empty():
                return queue.get_nowait()
            task = self._task
            if task is None or task.done():
                return _END
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()  # the item, if any, stays in the queue
            if getter.done() and not getter.cancelled():
                return getter.result()

    async def _commit(self) -> None:
        pending = self._pending
        if pending is None or pending == self._committed:
            return
        self._committed = pending
        if self._store is not None:
            await self._store.save(self.key, pending)

    # --- the pump ------------------------------------------------------------------

    async def _resolve_start(self) -> Position:
        if self._store is not None:
            saved = await self._store.load(self.key)
            if saved is not None:
                return saved
        start = self._start
        if isinstance(start, Position):
            return start
        if start == "beginning" or start == OFFSET_BEGINNING:
            return Position.beginning()
        if start == "now" or start == OFFSET_NOW:
            # Pin "now" to a real offset: a reconnect must not skip what came
            # between the first connection and the next.
            return Position(await self._session._transport.tail())
        if isinstance(start, str) and start:
            return Position(start)
        raise UsageError(f"invalid start point: {start!r}")

    async def _pump(self) -> None:
        session = self._session
        feed = session._status
        backoff = Backoff(session.reconnect, rng=session._rng)
        tracker: ResumeTracker | None = None
        caught_up_sent = False
        feed.connecting()
        try:
            while True:
                try:
                    if tracker is None:
                        start = await self._resolve_start()
                        tracker = ResumeTracker(start)
                        self.start_position = start
                        self._pinned.set()
                        await self._queue.put(_Delivery(None, start))
                    productive = False
                    batches = session._transport.subscribe(tracker.position.offset)
                    try:
                        while True:
                            # Only the wait for the next batch may be cut by
                            # drop_connections(): a batch being handed out is
                            # already taken by the tracker and must not be lost.
                            async with _Link(session):
                                try:
                                    batch = await anext(batches)
                                except StopAsyncIteration:
                                    break
                            if not productive:
                                productive = True
                                backoff.reset()
                                feed.connected()
                            if batch.incarnation is not None:
                                known = tracker.position.incarnation
                                if known is None:
                                    # From now on the position (and what an offset
                                    # store saves) names the incarnation it is in.
                                    tracker.position = tracker.position.with_incarnation(
                                        batch.incarnation
                                    )
                                    await self._queue.put(_Delivery(None, tracker.position))
                                elif known != batch.incarnation:
                                    tracker = await self._replaced(known, batch.incarnation)
                                    break
                            caught_up = batch.up_to_date and not caught_up_sent
                            caught_up_sent = caught_up_sent or caught_up
                            await self._take(tracker, batch, caught_up=caught_up)
                            if batch.closed:
                                feed.closed()
                                await self._queue.put(_END)
                                return
                    finally:
                        await _aclose_iter(batches)
                    if not productive:
                        raise ConnectionLost(
                            "the connection ended before any data", url=session.url
                        )
                    # The server ended the connection cleanly: resume at once.
                except BadRequest as exc:
                    # A server that tracks incarnations refuses an offset of an
                    # earlier one (400) and says which incarnation it has now.
                    actual = exc.headers.get(STREAM_INCARNATION.lower())
                    known = tracker.position.incarnation if tracker is not None else None
                    if known is None or actual is None or actual == known:
                        raise
                    tracker = await self._replaced(known, actual)
                except RetryableError as exc:
                    delay = backoff.failure(exc)
                    if delay is None:
                        raise
                    feed.retrying(backoff.failures, delay, exc)
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except DurableError as exc:
            feed.failed(exc)
            await self._queue.put(_Failure(exc))
        except Exception as exc:  # a bug: surface it to the consumer, not the loop
            await self._queue.put(_Failure(exc))

    async def _replaced(self, expected: str, actual: str) -> ResumeTracker:
        """The stream is a new incarnation: raise, or start over at its beginning."""
        if self.on_replaced == "raise":
            raise StreamReplaced(
                "the session's stream was deleted and re-created (or its server lost it) "
                f"since this position was taken (incarnation {expected}, now {actual}); "
                "its offsets mean nothing in the new stream. Subscribe from the beginning, "
                "or pass on_replaced='restart'",
                url=self._session.url,
                expected=expected,
                actual=actual,
            )
        self.replacements += 1
        self._dedupe = EventIdDeduper(self._dedupe_capacity)
        start = Position.beginning(actual)
        await self._queue.put(_Delivery(None, start))
        return ResumeTracker(start)

    async def _take(
        self, tracker: ResumeTracker, batch: TransportBatch, *, caught_up: bool
    ) -> None:
        before = tracker.position
        deliveries: list[_Delivery] = []
        for message, position in tracker.accept(batch.start_offset, batch.messages, batch.offset):
            event = parse_event(message)
            if event.event_id is not None and self._dedupe.seen(event.event_id):
                deliveries.append(_Delivery(None, position))
            else:
                deliveries.append(_Delivery(event, position))
        last = deliveries[-1].position if deliveries else None
        if tracker.position != last and (tracker.position != before or caught_up):
            deliveries.append(_Delivery(None, tracker.position))
        if caught_up:
            deliveries[-1] = _Delivery(deliveries[-1].event, deliveries[-1].position, True)
        for delivery in deliveries:
            await self._queue.put(delivery)


class Session:
    """One durable session: subscribe to it, publish into it, watch the connection.

    Args:
        base_url: the server's base URL, e.g. ``http://127.0.0.1:4437``.
        session_id: the session's name; the stream is at ``path_template``.
        author: who this participant is (every helper signs events with it).
        transport: ``"auto"`` (default: WebSocket when the server offers it,
            else HTTP), ``"websocket"``, ``"http"``, or a :class:`SessionTransport`
            instance. ``None`` means ``"auto"``.
        client: an ``httpx.AsyncClient`` for HTTP requests (one is made if omitted).
        path_template: the stream path under ``base_url`` (``{session_id}`` is filled in).
        headers: extra headers on every request and WebSocket handshake (values
            may be functions, e.g. a token provider called before each request).
        live: how HTTP reads live: ``"sse"`` (falls back to long-poll) or
            ``"long-poll"``. Giving it asks for HTTP (with ``"auto"``).
        websocket: keepalive, timeouts and limits of the WebSocket transport.
        retry: retry policy of single requests (create, tail).
        reconnect: how subscriptions reconnect and publishes are retried
            (default: forever, with capped jittered backoff).
        producer_id: the idempotent producer id for publishes (default: the
            author id plus a random suffix, unique per Session object). A
            stable id is opt-in; a rerun with it must start a new epoch, which
            ``auto_claim`` does for it (a reused epoch raises
            :class:`EpochReused` otherwise, and never drops a publish).
        producer_epoch: the producer's starting epoch.
        auto_claim: take over the producer id on 403 (stale or reused epoch).
        publish_linger: seconds a publish waits to share a request with others.
        rng: random source for jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        base_url: str,
        session_id: str,
        *,
        author: Author,
        transport: TransportChoice | SessionTransport | None = "auto",
        client: httpx.AsyncClient | None = None,
        path_template: str = DEFAULT_SESSION_PATH,
        headers: Mapping[str, DynamicValue] | None = None,
        live: Literal["sse", "long-poll"] | None = None,
        websocket: WebSocketOptions = WebSocketOptions(),  # noqa: B008 - frozen dataclass
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass
        reconnect: ReconnectPolicy = ReconnectPolicy(),  # noqa: B008 - frozen dataclass
        producer_id: str | None = None,
        producer_epoch: int = 0,
        auto_claim: bool = True,
        publish_linger: float = 0.0,
        max_in_flight: int = 5,
        rng: random.Random | None = None,
    ) -> None:
        if not session_id:
            raise UsageError("session_id must not be empty")
        if "{session_id}" not in path_template:
            raise UsageError("path_template must contain {session_id}")
        self.session_id = session_id
        self.author = author
        self.retry = retry
        self.reconnect = reconnect
        self._rng = rng
        if transport is None:
            transport = "auto"
        if isinstance(transport, str):
            url = base_url.rstrip("/") + path_template.format(session_id=quote(session_id, safe=""))
            stream = DurableStream(
                url,
                client=client,
                content_type=JSON_CONTENT_TYPE,
                headers=headers,
                retry=retry,
                reconnect=reconnect,
                rng=rng,
            )
            transport = self._make_transport(transport, stream, base_url, live, websocket)
        self._transport: SessionTransport = transport
        self.url = transport.url
        self._producer_id = producer_id or f"{author.id}-{new_id()[:12]}"
        self._producer_epoch = producer_epoch
        self._auto_claim = auto_claim
        self._publish_linger = publish_linger
        self._max_in_flight = max_in_flight
        self._producer: IdempotentProducer | None = None
        self._producer_generation = 0
        self._status = StatusFeed(offline_after=getattr(reconnect, "offline_after", 3))
        self._subscriptions: set[Subscription] = set()
        self._links: set[asyncio.Timeout] = set()
        self._presence: Member | None = None
        self._closed = False

    def _make_transport(
        self,
        choice: str,
        stream: DurableStream,
        base_url: str,
        live: Literal["sse", "long-poll"] | None,
        options: WebSocketOptions,
    ) -> SessionTransport:
        http = HttpTransport(stream, live=live or "sse")
        if choice == "http" or (choice == "auto" and live is not None):
            return http
        if choice not in ("auto", "websocket"):
            raise UsageError(
                f"transport must be 'auto', 'websocket', 'http' or a SessionTransport: {choice!r}"
            )
        name = stream_name_of(stream.url)
        if choice == "websocket" and (live is not None or name is None):
            raise UsageError(
                "the WebSocket transport reads live on its socket and addresses streams "
                f"under /v1/stream/ (live={live!r}, stream {stream.url})"
            )
        if name is None:
            return http  # a stream the WebSocket protocol cannot address
        websocket = WebSocketTransport(
            stream,
            ws_url=websocket_url_of(base_url),
            stream_name=name,
            options=options,
            reconnect=self.reconnect,
            rng=self._rng,
        )
        return websocket if choice == "websocket" else AutoTransport(http, websocket)

    def __repr__(self) -> str:
        return f"<Session {self.session_id!r} as {self.author.id!r} ({self.status.state})>"

    # --- lifecycle -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the session was closed", url=self.url)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, *, flush_timeout: float = 5.0) -> None:
        """Close this client: stop subscriptions, send what is queued (waiting
        at most ``flush_timeout`` seconds), release connections. Publishes
        nothing: closing a client never cancels a turn. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        producer = self._producer
        if producer is not None:
            try:
                await asyncio.wait_for(producer.detach(), flush_timeout)
            except (TimeoutError, DurableError):
                pass
            finally:
                await producer.aclose()
        await self._transport.aclose()
        self._status.closed()

    # --- connection state ---------------------------------------------------------------

    @property
    def status(self) -> ConnectionStatus:
        """The connection state now."""
        return self._status.current

    def status_changes(self) -> AsyncIterator[ConnectionStatus]:
        """The current state, then every change, until closed or failed."""
        return self._status.changes()

    @property
    def transport_name(self) -> str:
        """The transport in use: ``websocket``, ``sse`` or ``long-poll`` (HTTP);
        ``auto`` until the first connection decides it."""
        return str(getattr(self._transport, "name", type(self._transport).__name__))

    def drop_connections(self) -> None:
        """Cut this session's connections now, as a network failure would.

        Subscriptions reconnect and resume, publishes in flight are retried
        (never duplicated), presence is set again: a way to show (or test)
        that nothing is lost. Cancels nothing in the session.
        """
        drop = getattr(self._transport, "drop_connections", None)
        if drop is not None:
            drop()
        if self._links:
            now = asyncio.get_running_loop().time()
            for scope in list(self._links):
                with contextlib.suppress(RuntimeError):  # already ending
                    scope.reschedule(now)

    # --- presence --------------------------------------------------------------------

    @property
    def presence_available(self) -> bool | None:
        """Whether this session carries presence: ``True`` over WebSocket,
        ``False`` over HTTP, ``None`` until the first connection decides."""
        transport = self._transport
        if isinstance(transport, PresenceTransport):
            return transport.presence_available
        return False

    @property
    def members(self) -> tuple[Member, ...]:
        """Who is in the session now, as last heard (empty over HTTP).

        Presence is heard while this session has a subscription open or has
        set its own presence; after a reconnect the list is refreshed.
        """
        transport = self._transport
        if isinstance(transport, PresenceTransport):
            return transport.members
        return ()

    def presence_changes(self) -> AsyncIterator[PresenceChange]:
        """Every join, status update and leave from this call on (none is
        missed before the first ``anext``), each with the full member list
        after it, until the session closes. The first snapshot the session
        hears reports everyone already present as joins. Stop iterating
        whenever you like: a feed nobody holds is dropped.

        Raises :class:`PresenceUnavailable` (on first iteration) over HTTP.
        Changes missed while reconnecting are reported from the fresh snapshot.
        """
        self._check_open()
        transport = self._transport
        if isinstance(transport, PresenceTransport):
            return transport.presence_changes()
        return _no_presence(self.url)

    def _member(
        self, status: str | None, label: str | None, kind: Literal["user", "agent"] | None
    ) -> Member:
        previous = self._presence
        if kind is None:
            if previous is not None:
                kind = previous.kind
            else:
                kind = "agent" if self.author.kind is AuthorKind.AGENT else "user"
        if label is None:
            label = previous.label if previous is not None else (self.author.name or "")
        if status is None:
            status = previous.status if previous is not None else "idle"
        try:
            return Member(client_id=self.author.id, kind=kind, label=label, status=status)
        except ValidationError as exc:
            raise UsageError(f"invalid presence: {exc.errors()[0]['msg']}", url=self.url) from exc

    async def set_presence(
        self,
        status: str | None = None,
        *,
        label: str | None = None,
        kind: Literal["user", "agent"] | None = None,
    ) -> None:
        """Join the session's presence, or update it (as ``author.id``).

        Omitted fields keep their last value (at first: status ``idle``, the
        author's name as label, the author's kind). Kept across reconnects and
        sent again after each one, so a reconnect does not show as a leave;
        :meth:`aclose` leaves. Raises :class:`PresenceUnavailable` over HTTP.
        """
        self._check_open()
        member = self._member(status, label, kind)
        transport = self._transport
        if not isinstance(transport, PresenceTransport):
            raise PresenceUnavailable(
                "presence needs the WebSocket transport; this session uses HTTP", url=self.url
            )
        self._presence = member
        await transport.set_presence(member)

    def _want_presence(self, status: str) -> None:
        """Set the status without waiting, where presence is available (agents)."""
        transport = self._transport
        if self._closed or not isinstance(transport, PresenceTransport):
            return
        if transport.presence_available is False:
            return
        member = self._member(status, None, None)
        self._presence = member
        transport.want_presence(member)

    # --- the stream --------------------------------------------------------------------

    async def create(self) -> bool:
        """Create the session's stream if it does not exist; True if created now."""
        self._check_open()
        return await self._transport.create()

    def subscribe(
        self,
        start: StartPoint = "beginning",
        *,
        offset_store: OffsetStore | None = None,
        consumer: str = "default",
        queue_size: int = 1024,
        dedupe_capacity: int = 10_000,
        on_replaced: OnReplaced = "raise",
    ) -> Subscription:
        """Events from ``start`` on: history, then live, each exactly once, in order.

        With an ``offset_store`` holding a position for ``consumer`` in this
        session, the subscription resumes there and ``start`` is ignored; it
        saves its position as events are processed. ``on_replaced`` says what
        happens if the stream was deleted and re-created since that position
        (see :class:`Subscription`).
        """
        self._check_open()
        subscription = Subscription(
            self,
            start,
            offset_store=offset_store,
            consumer=consumer,
            queue_size=queue_size,
            dedupe_capacity=dedupe_capacity,
            on_replaced=on_replaced,
        )
        self._subscriptions.add(subscription)
        return subscription

    # --- publishing -----------------------------------------------------------------

    def _publisher(self) -> IdempotentProducer:
        producer = self._producer
        if producer is None or producer.error is not None:
            # A producer that failed (e.g. the stream did not exist yet) stays
            # failed; later publishes get a fresh producer id.
            self._producer_generation += 1
            pid = self._producer_id
            if self._producer_generation > 1:
                pid = f"{pid}.{self._producer_generation}"
            producer = IdempotentProducer(
                _DroppableSink(self),
                pid,
                epoch=self._producer_epoch,
                auto_claim=self._auto_claim,
                linger=self._publish_linger,
                max_in_flight=self._max_in_flight,
                retry=self.reconnect,
                on_retry=self._status.retrying,
                on_success=self._status.connected,
            )
            self._producer = producer
        return producer

    def publish_nowait(self, event: AnyEvent) -> asyncio.Future[PublishAck]:
        """Queue ``event`` for publishing; the future resolves when it landed.

        Events published by one Session land in the order they were queued.
        """
        self._check_open()
        inner = self._publisher().append_json(event.to_json())
        outer: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()

        def transfer(fut: asyncio.Future[Any]) -> None:
            if outer.done():
                return
            if fut.cancelled():
                outer.cancel()
            elif (exc := fut.exception()) is not None:
                outer.set_exception(exc)
            else:
                result = fut.result()
                # A duplicate's offset, if any, is the tail at retry time, not
                # where the event landed: report no offset rather than a wrong one.
                offset = None if result.duplicate else result.offset
                outer.set_result(PublishAck(event, offset, result.duplicate))

        inner.add_done_callback(transfer)
        outer.add_done_callback(_retrieve)
        return outer

    async def publish(self, event: AnyEvent) -> PublishAck:
        """Publish ``event`` exactly once and return where it landed.

        Retried (same producer stamp, so never duplicated) while the server is
        unreachable, for as long as the reconnect policy allows; the connection
        state shows the retries. If you stop waiting (cancel or time out), the
        event stays queued and is still sent.
        """
        return await asyncio.shield(self.publish_nowait(event))

    async def flush(self) -> None:
        """Wait until every queued publish landed."""
        if self._producer is not None:
            await self._producer.flush()

    # --- helpers for common events ------------------------------------------------------

    async def send_message(
        self, text: str, *, to: tuple[str, ...] | None = None, turn_id: str | None = None
    ) -> PublishAck:
        """Publish a user message opening a new turn (``ack.event.turn_id``)."""
        event = UserMessage(author=self.author, text=text, to=to, turn_id=turn_id or new_id())
        return await self.publish(event)

    async def cancel(
        self,
        turn_id: str | None = None,
        *,
        author_id: str | None = None,
        everything: bool = False,
        reason: str | None = None,
    ) -> PublishAck:
        """Publish an explicit cancel: of one turn, of one author's replies
        (``author_id``), or of every reply in progress (``everything=True``)."""
        chosen = sum([turn_id is not None, author_id is not None, everything])
        if chosen != 1:
            raise UsageError("cancel needs exactly one of turn_id, author_id, everything=True")
        if turn_id is not None:
            event = Cancel(author=self.author, turn_id=turn_id, reason=reason)
        elif author_id is not None:
            event = Cancel(
                author=self.author,
                scope=CancelScope.AUTHOR,
                target_author_id=author_id,
                reason=reason,
            )
        else:
            event = Cancel(author=self.author, scope=CancelScope.ALL, reason=reason)
        return await self.publish(event)

    async def steer(
        self, turn_id: str, text: str, *, mode: SteerMode = SteerMode.STEER
    ) -> PublishAck:
        """Publish guidance for the running turn ``turn_id``."""
        return await self.publish(Steer(author=self.author, turn_id=turn_id, text=text, mode=mode))

    async def report_progress(
        self,
        turn_id: str,
        source: str,
        *,
        status: ProgressStatus = ProgressStatus.RUNNING,
        message: str | None = None,
        fraction: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> PublishAck:
        """Publish progress of a tool or sub-agent (``source``) working on ``turn_id``."""
        return await self.publish(
            Progress(
                author=self.author,
                turn_id=turn_id,
                source=source,
                status=status,
                message=message,
                fraction=fraction,
                data=data,
            )
        )


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _no_presence(url: str) -> AsyncIterator[PresenceChange]:
    raise PresenceUnavailable(
        "presence needs the WebSocket transport; this session uses HTTP", url=url
    )
    yield  # pragma: no cover - makes this an async generator
