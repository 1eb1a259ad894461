"""The agent side of a session: take user turns, stream replies, stop on cancel.

::

    async with Session(url, "demo", author=Author.agent("helper")) as session:
        async with Agent(session) as agent:
            async for turn in agent.turns():
                async with agent.reply(turn) as reply:
                    async for token in model.generate(turn.text):
                        await reply.write(token)   # raises TurnCancelled on cancel

An :class:`Agent` runs one subscription in the background. It hands out user
messages as :class:`IncomingTurn` objects and routes ``cancel`` and ``steer``
events to the replies they concern, so a reply notices a cancel while the
agent is busy generating. An :class:`AgentReply` publishes ``turn_start``, then the
text in coalesced ``text_delta`` events (one per rollup window, 40 ms by
default, instead of one per token), then exactly one ``turn_end`` with its
reason: ``complete``, ``cancelled`` (text so far kept) or ``error``.

Several agents, each with its own :class:`Session` and author, can answer in
one session; each sees only the cancels that apply to its own replies.

Where the session carries presence (WebSocket), the agent keeps its own
status up to date: ``idle`` once it reads the session, ``thinking`` when a
turn arrives, ``streaming`` while a reply writes, ``idle`` again when the
last reply in progress ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ._errors import ClientClosed, DurableError, TurnCancelled, UsageError
from ._events import (
    AnyEvent,
    Cancel,
    EndReason,
    Progress,
    ProgressStatus,
    Steer,
    TextDelta,
    TurnEnd,
    TurnStart,
    UserMessage,
)
from ._offsets import OffsetStore
from ._session import PublishAck, Session
from ._subscription import StartPoint
from ._transcript import Transcript

__all__ = ["Agent", "AgentReply", "IncomingTurn"]

DEFAULT_ROLLUP_WINDOW = 0.04


@dataclass(frozen=True)
class IncomingTurn:
    """A user message the agent should answer."""

    message: UserMessage
    agent: Agent

    @property
    def turn_id(self) -> str:
        return self.message.turn_id

    @property
    def text(self) -> str:
        return self.message.text

    @property
    def cancelled(self) -> bool:
        """Whether a cancel for this turn (for this agent) has arrived already."""
        return bool(self.agent.transcript.cancels_for(self.turn_id, self.agent.author.id))


class Agent:
    """Receives user turns from a session and answers them.

    Args:
        session: the agent's own session object (its author is the agent).
        start: where to start reading (default ``"now"``: only new messages).
        offset_store: resume from a saved position after a restart.
        consumer: the offset-store key (default: the agent's author id).
        accept: which user messages to answer (default: those addressed to
            this agent or to no one in particular).
        rollup_window: seconds of tokens coalesced into one ``text_delta``.
    """

    def __init__(
        self,
        session: Session,
        *,
        start: StartPoint = "now",
        offset_store: OffsetStore | None = None,
        consumer: str | None = None,
        accept: Callable[[UserMessage], bool] | None = None,
        rollup_window: float = DEFAULT_ROLLUP_WINDOW,
    ) -> None:
        if rollup_window < 0:
            raise UsageError("rollup_window must be >= 0")
        self.session = session
        self.author = session.author
        self.rollup_window = rollup_window
        self.transcript = Transcript()
        self._start = start
        self._store = offset_store
        self._consumer = consumer or f"agent:{self.author.id}"
        self._accept = accept or self._addressed_to_me
        self._turns: asyncio.Queue[IncomingTurn | BaseException | None] = asyncio.Queue()
        self._replies: dict[str, AgentReply] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closed = False

    def _addressed_to_me(self, message: UserMessage) -> bool:
        return message.to is None or self.author.id in message.to

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start reading the session (idempotent). Returns once the read position is fixed."""
        if self._closed:
            raise ClientClosed("the agent was closed", url=self.session.url)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._read(), name=f"durable-agent:{self.author.id}"
            )
            self.session.set_presence_nowait("idle")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()

    async def aclose(self) -> None:
        """Stop reading. Replies in progress are not ended or cancelled."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._turns.put_nowait(None)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- reading -------------------------------------------------------------------

    async def _read(self) -> None:
        subscription = self.session.subscribe(
            self._start, offset_store=self._store, consumer=self._consumer
        )
        try:
            async with subscription:
                # Entering pinned the start position: turns() sees every later message.
                self._ready.set()
                async for event in subscription:
                    self._dispatch(event)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._turns.put_nowait(exc)
        finally:
            self._ready.set()
            self._turns.put_nowait(None)

    def _dispatch(self, event: AnyEvent) -> None:
        self.transcript.apply(event)
        if isinstance(event, UserMessage):
            if event.author.id != self.author.id and self._accept(event):
                self._turns.put_nowait(IncomingTurn(event, self))
                if not self._replies:
                    self.session.set_presence_nowait("thinking")
        elif isinstance(event, Cancel):
            for reply in list(self._replies.values()):
                if self.transcript.cancel_applies(event, reply.turn_id, self.author.id):
                    reply._on_cancel(event)
        elif isinstance(event, Steer):
            steered = self._replies.get(event.turn_id)
            if steered is not None:
                steered._on_steer(event)

    async def turns(self) -> AsyncIterator[IncomingTurn]:
        """User messages to answer, in order, until the agent or session closes."""
        await self.start()
        while True:
            item = await self._turns.get()
            if item is None:
                self._turns.put_nowait(None)  # let other iterators end too
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # --- replying ------------------------------------------------------------------

    def reply(self, turn: IncomingTurn | UserMessage | str) -> AgentReply:
        """A reply to ``turn`` (an incoming turn, a user message or a turn id).

        Use it as an async context manager: it starts the turn on entry and
        ends it on exit: ``complete``, ``cancelled`` (after a cancel, with the
        text so far kept) or ``error`` (an exception escaped; it is re-raised).
        """
        if isinstance(turn, IncomingTurn):
            turn_id, in_reply_to = turn.turn_id, turn.message.event_id
        elif isinstance(turn, UserMessage):
            turn_id, in_reply_to = turn.turn_id, turn.event_id
        else:
            turn_id, in_reply_to = turn, None
        if turn_id in self._replies:
            raise UsageError(f"a reply to turn {turn_id!r} is already in progress")
        return AgentReply(self, turn_id, in_reply_to=in_reply_to)


class AgentReply:
    """One agent's answer in one turn. Create it with :meth:`Agent.reply`."""

    def __init__(self, agent: Agent, turn_id: str, *, in_reply_to: str | None) -> None:
        self.agent = agent
        self.turn_id = turn_id
        self.in_reply_to = in_reply_to
        self._session = agent.session
        self._buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._index = 0
        self._pending: list[asyncio.Future[PublishAck]] = []
        self._publishes: list[asyncio.Future[PublishAck]] = []
        self._cancelled = asyncio.Event()
        self.cancel_event: Cancel | None = None
        self.steers: list[Steer] = []
        self._steered = asyncio.Event()
        self._started = False
        self._ended: PublishAck | None = None
        self.text = ""

    # --- state --------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether a cancel for this reply has arrived."""
        return self._cancelled.is_set()

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def published(self) -> tuple[PublishAck, ...]:
        """What this reply published and the session acknowledged, in the order
        it was published: ``turn_start``, each ``text_delta`` and ``progress``,
        ``turn_end``. Each ack has the event (``ack.event_id``) and the offset
        right after it (``ack.offset``; ``None`` for a retry the server
        recognised as a duplicate). Complete once :meth:`end` has returned (the
        context manager's exit); an event whose publish failed is left out.

        It is the publish history a history checker needs::

            for ack in reply.published:
                history.published(ack.event_id, offset=ack.offset)
        """
        acks = []
        for fut in self._publishes:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                acks.append(fut.result())
        return tuple(acks)

    async def wait_cancelled(self) -> Cancel | None:
        """Wait until a cancel for this reply arrives; returns it."""
        await self._cancelled.wait()
        return self.cancel_event

    def _on_cancel(self, cancel: Cancel) -> None:
        if self._ended is None and not self._cancelled.is_set():
            self.cancel_event = cancel
            self._cancelled.set()

    def _on_steer(self, steer: Steer) -> None:
        self.steers.append(steer)
        self._steered.set()

    def take_steers(self) -> list[Steer]:
        """The steering received since the last call (and forget it)."""
        steers, self.steers = self.steers, []
        self._steered.clear()
        return steers

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Publish ``turn_start`` (the context manager does this). Idempotent."""
        if self._started:
            return
        self._started = True
        agent = self.agent
        agent._replies[self.turn_id] = self
        # A cancel may have arrived before this reply started.
        for cancel in agent.transcript.cancels_for(self.turn_id, agent.author.id):
            self._on_cancel(cancel)
            break
        self._publish(
            TurnStart(author=agent.author, turn_id=self.turn_id, in_reply_to=self.in_reply_to)
        )

    async def __aenter__(self) -> AgentReply:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._ended is not None:
            return isinstance(exc, TurnCancelled)
        if isinstance(exc, TurnCancelled) or (exc is None and self.cancelled):
            await self.end(EndReason.CANCELLED)
            return isinstance(exc, TurnCancelled)
        if isinstance(exc, asyncio.CancelledError):
            # The agent's task was cancelled (shutdown): say so without waiting,
            # and never let a closed session mask the cancellation.
            with contextlib.suppress(DurableError):
                self._finish(EndReason.ERROR, error="the agent stopped")
            return False
        if exc is not None:
            await self.end(EndReason.ERROR, error=f"{type(exc).__name__}: {exc}")
            return False
        await self.end(EndReason.COMPLETE)
        return False

    # --- writing ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._ended is not None:
            raise UsageError(f"the reply to turn {self.turn_id!r} has ended")
        if self.cancelled:
            raise TurnCancelled(
                f"turn {self.turn_id!r} was cancelled",
                url=self._session.url,
                cancel=self.cancel_event,
            )

    async def write(self, text: str) -> None:
        """Add ``text`` to the reply. Raises :class:`TurnCancelled` once cancelled.

        Text is coalesced: one ``text_delta`` per rollup window.
        """
        self._check_writable()
        if not self._started:
            await self.start()
        if not text:
            return
        if not self.text:
            self._session.set_presence_nowait("streaming")
        self._buffer.append(text)
        self.text += text
        window = self.agent.rollup_window
        if window <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(window, self._flush_later)

    async def stream(self, tokens: AsyncIterable[str]) -> EndReason:
        """Write every token of ``tokens``; stop at once if a cancel arrives.

        The token source is closed promptly on cancel (its task is cancelled
        rather than waiting for the next token). Returns ``COMPLETE`` or
        ``CANCELLED``; the turn itself ends when the context manager exits.
        """

        async def pump() -> None:
            async for token in tokens:
                await self.write(token)

        task = asyncio.ensure_future(pump())
        waiter = asyncio.ensure_future(self._cancelled.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            exc = task.exception()
            if exc is None:
                return EndReason.COMPLETE
            if isinstance(exc, TurnCancelled):
                return EndReason.CANCELLED
            raise exc
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TurnCancelled):
            await task
        return EndReason.CANCELLED

    async def progress(
        self,
        source: str,
        *,
        status: ProgressStatus = ProgressStatus.RUNNING,
        message: str | None = None,
        fraction: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Publish progress of a tool call made for this reply."""
        self._publish(
            Progress(
                author=self.agent.author,
                turn_id=self.turn_id,
                source=source,
                status=status,
                message=message,
                fraction=fraction,
                data=data,
            )
        )

    async def end(
        self, reason: EndReason = EndReason.COMPLETE, *, error: str | None = None
    ) -> PublishAck:
        """End the reply (once): flush the text, publish ``turn_end``, and wait
        until every event of the reply has landed. A second call returns the first ack."""
        if self._ended is not None:
            return self._ended
        fut = self._finish(reason, error=error)
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)
        ack = await fut
        self._ended = ack
        return ack

    # --- internals -----------------------------------------------------------------------

    def _finish(self, reason: EndReason, *, error: str | None) -> asyncio.Future[PublishAck]:
        if not self._started:
            # Ending a reply that never started still opens it first, so readers
            # see start, (text), end in that order.
            self._started = True
            self.agent._replies[self.turn_id] = self
            self._publish(
                TurnStart(
                    author=self.agent.author, turn_id=self.turn_id, in_reply_to=self.in_reply_to
                )
            )
        self._flush()
        self.agent._replies.pop(self.turn_id, None)
        if not self.agent._replies:
            self._session.set_presence_nowait("idle")
        end = TurnEnd(
            author=self.agent.author,
            turn_id=self.turn_id,
            reason=reason,
            error=error,
            cancel_event_id=self.cancel_event.event_id
            if reason is EndReason.CANCELLED and self.cancel_event is not None
            else None,
        )
        return self._publish(end, track=False)

    def _flush_later(self) -> None:
        """The rollup timer's callback. If the session was closed meanwhile the text
        has nowhere to go; raising here would only reach the event loop's log."""
        try:
            self._flush()
        except ClientClosed:
            self._buffer.clear()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        delta = TextDelta(
            author=self.agent.author, turn_id=self.turn_id, text=text, index=self._index
        )
        self._index += 1
        self._publish(delta)

    def _publish(self, event: AnyEvent, *, track: bool = True) -> asyncio.Future[PublishAck]:
        fut = self._session.publish_nowait(event)
        self._publishes.append(fut)
        if track:
            self._pending.append(fut)
        return fut
