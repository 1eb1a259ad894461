"""Subscriptions: one reader of a session, history then live, exactly once.

See ``_session`` for how a subscription delivers each event exactly once. The
decisions (resume where, deliver what, replaced, caught up) are made by
``_core.subscription.SubscriptionState`` and the waits between connections by
the reconnect engine (``_retry.Retrying``); this module is the asyncio glue:
the pump task that reads the transport, and the consumer side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from ._core.subscription import (
    Connected,
    Deliver,
    Fail,
    OnReplaced,
    Restart,
    SubscriptionState,
)
from ._errors import ClientClosed, ConnectionLost, DurableError, UsageError
from ._events import AnyEvent
from ._leases import LeaseMode, LeaseWatch
from ._offsets import OffsetStore, Position
from ._protocol import OFFSET_BEGINNING, OFFSET_NOW
from ._retry import Retrying

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["LeaseMode", "OnReplaced", "StartPoint", "Subscription"]

#: Where a subscription starts: ``"beginning"``, ``"now"``, a saved
#: :class:`Position`, or an offset string from an earlier read.
StartPoint: TypeAlias = Literal["beginning", "now"] | Position | str


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_END = _Marker("end")


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


_QueueItem: TypeAlias = Deliver | _Failure | _Marker


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
        leases: LeaseMode = "end",
    ) -> None:
        if on_replaced not in ("raise", "restart"):
            raise UsageError(f"on_replaced must be 'raise' or 'restart': {on_replaced!r}")
        if leases not in ("end", "watch", "off"):
            raise UsageError(f"leases must be 'end', 'watch' or 'off': {leases!r}")
        self._session = session
        self._start = start
        self.on_replaced: OnReplaced = on_replaced
        self._dedupe_capacity = dedupe_capacity
        self._state: SubscriptionState | None = None
        self._store = offset_store
        self.consumer = consumer
        self.key = f"{session.url}#{consumer}"
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue(maxsize=queue_size)
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
        #: The reader watchdog over leased replies (``None`` with ``leases="off"``).
        self.leases: LeaseWatch | None = (
            LeaseWatch(self, session, leases) if leases != "off" else None
        )

    @property
    def replacements(self) -> int:
        """How many times the stream was found replaced and reading started over
        from the new stream's beginning (``on_replaced="restart"``)."""
        return self._state.replacements if self._state is not None else 0

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
        if self.leases is not None:
            self.leases.close()
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
            if isinstance(item, Deliver):
                self.position = item.position
                if item.caught_up:
                    self.caught_up.set()
                if item.event is None:
                    self._pending = item.position
                    await self._commit()
                    continue
                self._pending = item.position
                if self.leases is not None:
                    self.leases.observe(item.event)
                return item.event
            self._done = True
            if self.leases is not None:
                self.leases.close()
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
        retrying = session.reconnect.retrying(rng=session._rng, on_retry=feed.retrying)
        feed.connecting()
        try:
            async for attempt in retrying:
                with attempt:
                    state = self._state or await self._begin()
                    # Connections that end cleanly are resumed at once, in
                    # this attempt; a failure ends it, and the engine waits.
                    while not await self._read_connection(state, retrying):
                        pass
        except asyncio.CancelledError:
            raise
        except DurableError as exc:
            feed.failed(exc)
            await self._queue.put(_Failure(exc))
        except Exception as exc:  # a bug: surface it to the consumer, not the loop
            await self._queue.put(_Failure(exc))

    async def _begin(self) -> SubscriptionState:
        start = await self._resolve_start()
        self._state = SubscriptionState(
            start,
            on_replaced=self.on_replaced,
            dedupe_capacity=self._dedupe_capacity,
            max_no_progress=getattr(self._session.reconnect, "max_no_progress", None),
            url=self._session.url,
        )
        self.start_position = start
        self._pinned.set()
        await self._queue.put(Deliver(None, start))
        return self._state

    async def _read_connection(self, state: SubscriptionState, retrying: Retrying) -> bool:
        """One connection of the transport, its batches handed out; True once
        the stream is read to its close. Raises what the connection failed with."""
        session = self._session
        batches = session._transport.subscribe(state.connect().offset)
        try:
            while True:
                # Only the wait for the next batch may be cut by
                # drop_connections(): a batch being handed out is already
                # taken by the state and must not be lost.
                async with _Link(session):
                    try:
                        batch = await anext(batches)
                    except StopAsyncIteration:
                        break
                for action in state.batch_received(batch):
                    if isinstance(action, Connected):
                        retrying.reset()
                        session._status.connected()
                    elif isinstance(action, Deliver):
                        await self._queue.put(action)
                    elif isinstance(action, Restart):
                        await self._queue.put(Deliver(None, action.position))
                        return False
                    else:  # End: the stream is closed
                        session._status.closed()
                        await self._queue.put(_END)
                        return True
        except DurableError as exc:
            decision = state.failure(exc)
            if isinstance(decision, Restart):
                await self._queue.put(Deliver(None, decision.position))
                return False
            if isinstance(decision, Fail) and decision.error is not exc:
                raise decision.error from exc
            raise
        finally:
            await _aclose_iter(batches)
        state.connection_ended()
        return False
