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
handshake; ``transport="websocket"`` or ``"http"`` forces one. A transport
object carries its own settings (``HttpTransport(live="long-poll")``,
``AutoTransport(headers=...)``, ``MemoryTransport()`` for tests): the session
binds it to its stream (``_transport``). Either way the session does the same
things on top: resume, dedupe, retries.

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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import quote

from pydantic import ValidationError

from ._auth import TokenProvider, TokenSource
from ._auto import AutoTransport
from ._core.producer import ProducerStamp
from ._errors import ClientClosed, DurableError, UsageError
from ._events import (
    AnyEvent,
    Approval,
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
)
from ._http import HttpTransport
from ._offsets import OffsetStore
from ._producer import IdempotentProducer
from ._results import AppendResult
from ._retry import ReconnectPolicy, RetryPolicy
from ._state import ConnectionStatus, StatusFeed
from ._subscription import LeaseMode, OnReplaced, StartPoint, Subscription, _Link
from ._transport import (
    PresenceChange,
    PresenceTransport,
    SessionDefaults,
    SessionTransport,
    UnboundTransport,
    presence_unavailable,
)
from ._ws import WebSocketTransport
from ._ws_frames import Member

__all__ = ["DEFAULT_SESSION_PATH", "PublishAck", "Session", "TransportChoice"]

#: Where sessions live under the server's base URL.
DEFAULT_SESSION_PATH = "/v1/stream/sessions/{session_id}"

#: Which transport a session uses: ``"auto"`` (WebSocket if the server offers
#: it, else HTTP), ``"websocket"`` or ``"http"``.
TransportChoice: TypeAlias = Literal["auto", "websocket", "http"]


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

    @property
    def event_id(self) -> str | None:
        """The published event's id (what a subscriber sees as ``event.event_id``)."""
        return self.event.event_id


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


class Session:
    """One durable session: subscribe to it, publish into it, watch the connection.

    Args:
        base_url: the server's base URL, e.g. ``http://127.0.0.1:4437``.
        session_id: the session's name; the stream is at ``path_template``.
        author: who this participant is (every helper signs events with it).
        transport: ``"auto"`` (default: WebSocket when the server offers it,
            else HTTP), ``"websocket"``, ``"http"``, or a transport object:
            settings such as ``HttpTransport(live="long-poll", headers=...)``,
            ``WebSocketTransport(options=...)``, ``AutoTransport(headers=...)``
            or ``MemoryTransport()`` (bound to this session's stream), or any
            :class:`SessionTransport` (used as it is; its URL wins).
        path_template: the stream path under ``base_url`` (``{session_id}`` is filled in).
        retry: how single requests (create, tail) are retried, unless the
            transport object sets its own.
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
        max_in_flight: publish requests in flight at once.
        rng: random source for jitter (tests pass a seeded one).
        token: an access token (a JWT) sent with every request and WebSocket
            handshake, or a :data:`~durable_client.streams.TokenProvider`
            called for a fresh one at 80% of each token's lifetime, after a 401
            and when the server ends a socket whose token expired (4001). A
            transport object may carry its own token instead (not both).
    """

    def __init__(
        self,
        base_url: str,
        session_id: str,
        *,
        author: Author,
        transport: TransportChoice | UnboundTransport | SessionTransport = "auto",
        path_template: str = DEFAULT_SESSION_PATH,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass
        reconnect: ReconnectPolicy = ReconnectPolicy(),  # noqa: B008 - frozen dataclass
        producer_id: str | None = None,
        producer_epoch: int = 0,
        auto_claim: bool = True,
        publish_linger: float = 0.0,
        max_in_flight: int = 5,
        rng: random.Random | None = None,
        token: str | TokenProvider | None = None,
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
        url = base_url.rstrip("/") + path_template.format(session_id=quote(session_id, safe=""))
        self._transport = _bound(
            transport, url, retry=retry, reconnect=reconnect, rng=rng, token=token
        )
        self.url = self._transport.url
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
        #: Producers of replies' lease generations, and background work (ends
        #: written as an agent shuts down): aclose flushes and waits for them.
        self._reply_producers: set[IdempotentProducer] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Replies this session's agents own: its own readers never end them.
        self._held: set[tuple[str, str]] = set()
        self._closing = False
        self._closed = False

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
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout
        if self._tasks:  # e.g. the end of a reply whose agent is shutting down
            await asyncio.wait(set(self._tasks), timeout=flush_timeout)
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        producers = [p for p in (self._producer, *self._reply_producers) if p is not None]
        for producer in producers:
            try:
                await asyncio.wait_for(producer.detach(), max(0.0, deadline - loop.time()))
            except (TimeoutError, DurableError):
                pass
            finally:
                await producer.aclose()
        for task in list(self._tasks):
            task.cancel()
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
        return _no_presence(presence_unavailable(self.url))

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
            raise presence_unavailable(self.url)
        self._presence = member
        await transport.set_presence(member)

    def set_presence_nowait(
        self,
        status: str | None = None,
        *,
        label: str | None = None,
        kind: Literal["user", "agent"] | None = None,
    ) -> None:
        """Set presence as :meth:`set_presence` does, without waiting, where the
        session carries presence; over HTTP (or once closed) do nothing.

        Best effort: the status is sent when the socket is up, and again after
        each reconnect. An agent shows what it is doing this way.
        """
        transport = self._transport
        if self._closed or not isinstance(transport, PresenceTransport):
            return
        if transport.presence_available is False:
            return
        member = self._member(status, label, kind)
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
        leases: LeaseMode = "end",
    ) -> Subscription:
        """Events from ``start`` on: history, then live, each exactly once, in order.

        With an ``offset_store`` holding a position for ``consumer`` in this
        session, the subscription resumes there and ``start`` is ignored; it
        saves its position as events are processed. ``on_replaced`` says what
        happens if the stream was deleted and re-created since that position
        (see :class:`Subscription`).

        ``leases`` says what the subscription does about leased replies that
        go quiet (an agent that died mid-reply): ``"end"`` (default) re-checks
        the log once a reply's lease runs out and, if nothing more is there,
        ends the reply as ``abandoned`` (one end, whoever else tries);
        ``"watch"`` only re-checks (a missed wake-up makes it reconnect);
        ``"off"`` does neither.
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
            leases=leases,
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
        return self._publish_via(self._publisher(), event)

    def _reply_producer(self, producer_id: str, epoch: int) -> IdempotentProducer:
        """A producer of its own for one reply's lease generation (``_core.leases``):
        no auto-claim, since a 403 there means another owner took the reply."""
        self._check_open()
        producer = IdempotentProducer(
            _DroppableSink(self),
            producer_id,
            epoch=epoch,
            auto_claim=False,
            linger=self._publish_linger,
            max_in_flight=self._max_in_flight,
            retry=self.reconnect,
            on_retry=self._status.retrying,
            on_success=self._status.connected,
        )
        self._reply_producers.add(producer)
        return producer

    async def _release_producer(self, producer: IdempotentProducer) -> None:
        self._reply_producers.discard(producer)
        await producer.aclose()

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` beside the caller; :meth:`aclose` waits for it (within its flush time)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)

    def _publish_via(
        self, producer: IdempotentProducer, event: AnyEvent
    ) -> asyncio.Future[PublishAck]:
        inner = producer.append_json(event.to_json())
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
        self,
        text: str,
        *,
        to: tuple[str, ...] | None = None,
        turn_id: str | None = None,
        retry_of: str | None = None,
    ) -> PublishAck:
        """Publish a user message opening a new turn (``ack.event.turn_id``);
        ``retry_of`` names the turn it asks again (a reply that was abandoned or failed)."""
        event = UserMessage(
            author=self.author, text=text, to=to, turn_id=turn_id or new_id(), retry_of=retry_of
        )
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

    async def approve(
        self, turn_id: str, request_id: str, approved: bool = True, *, note: str | None = None
    ) -> PublishAck:
        """Answer an agent's approval request (``approved=False`` denies it).
        The first answer in the session decides; later ones change nothing."""
        return await self.publish(
            Approval(
                author=self.author,
                turn_id=turn_id,
                request_id=request_id,
                approved=approved,
                note=note,
            )
        )

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


async def _no_presence(error: DurableError) -> AsyncIterator[PresenceChange]:
    raise error
    yield  # pragma: no cover - makes this an async generator


#: The transports a session makes from a name.
_TRANSPORTS: dict[str, type[AutoTransport | WebSocketTransport | HttpTransport]] = {
    "auto": AutoTransport,
    "websocket": WebSocketTransport,
    "http": HttpTransport,
}


def _bound(
    transport: TransportChoice | UnboundTransport | SessionTransport | None,
    url: str,
    *,
    retry: RetryPolicy,
    reconnect: ReconnectPolicy,
    rng: random.Random | None,
    token: str | TokenProvider | None = None,
) -> SessionTransport:
    """The session's transport for the stream at ``url``."""
    if transport is None:
        transport = "auto"
    if isinstance(transport, str):
        make = _TRANSPORTS.get(transport)
        if make is None:
            raise UsageError(
                "transport must be 'auto', 'websocket', 'http' or a transport object: "
                f"{transport!r}"
            )
        transport = make()
    elif token is not None and getattr(transport, "token", None) is not None:
        raise UsageError("give the session a token or its transport one, not both")
    if isinstance(transport, UnboundTransport):
        # One source for every connection of the session: a token refreshed for
        # an HTTP request is the one the socket sends next, and vice versa.
        source = TokenSource.of(token)
        bound = transport.bind(url, SessionDefaults(retry, reconnect, rng, source))
        if source is not None and id(bound) == id(transport):  # it was made for a stream
            raise UsageError("a transport made for a stream carries its own token", url=url)
        return bound
    if isinstance(transport, SessionTransport):
        if token is not None:
            raise UsageError("a transport made for a stream carries its own token", url=url)
        return transport
    raise UsageError(f"not a transport: {transport!r}")
