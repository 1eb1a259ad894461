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

Every reply is *leased* (``_core.leases``): the agent renews the lease while
it works (a ``turn_lease`` heartbeat when it has had nothing else to publish
for a third of ``lease_ttl``), and a reply whose agent dies is ended as
``abandoned`` by the session's readers once the lease lapses. The same lease
makes a turn's reply exclusive: of two agent processes with the same author
starting a reply to one turn, one owns it and the other gets
:class:`TurnFenced` from ``start()``. A restarted agent finds the replies it
left open with :meth:`Agent.unfinished` and continues one with
:meth:`Agent.adopt` (or ends it with :meth:`Agent.abandon`); the process it
replaced, if it still runs, is fenced: its writes are refused.

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
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ._core.leases import reply_producer_id
from ._errors import (
    ClientClosed,
    StaleEpoch,
    TurnCancelled,
    TurnFenced,
    UsageError,
)
from ._events import (
    AnyEvent,
    Approval,
    ApprovalRequest,
    Cancel,
    EndReason,
    Progress,
    ProgressStatus,
    Steer,
    TextDelta,
    TurnAdopt,
    TurnEnd,
    TurnLease,
    TurnStart,
    UserMessage,
    new_id,
)
from ._leases import end_reply
from ._offsets import OffsetStore
from ._producer import IdempotentProducer
from ._session import PublishAck, Session
from ._subscription import StartPoint
from ._transcript import Reply, Transcript

__all__ = ["Agent", "AgentReply", "IncomingTurn", "Unfinished"]

log = logging.getLogger("durable_client.agent")

DEFAULT_ROLLUP_WINDOW = 0.04
#: Seconds an agent's reply may go without a word before readers end it as abandoned.
DEFAULT_LEASE_TTL = 10.0


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
        lease_ttl: seconds a reply may go without a word before readers may
            end it as ``abandoned`` (the agent renews it at a third of that).
        holder: this process's name in the lease (default: the author id and
            a random suffix); an agent that restarts under the same name can
            tell its own unfinished replies from another live process's.
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
        lease_ttl: float = DEFAULT_LEASE_TTL,
        holder: str | None = None,
    ) -> None:
        if rollup_window < 0:
            raise UsageError("rollup_window must be >= 0")
        if not 0.05 < lease_ttl <= 3600:
            raise UsageError("lease_ttl must be more than 0.05 and at most 3600 seconds")
        self.lease_ttl = lease_ttl
        self.holder = holder or f"{session.author.id}@{new_id()[:8]}"
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
        elif isinstance(event, TurnEnd | TurnAdopt):
            mine = self._replies.get(event.turn_id)
            if mine is not None and mine._taken_by(event):
                mine._on_fenced(event)
        elif isinstance(event, Approval):
            asking = self._replies.get(event.turn_id)
            if asking is not None:
                asking._on_approval(event)

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

    # --- after a restart ------------------------------------------------------------

    async def unfinished(self) -> list[Unfinished]:
        """The replies of this agent's author that started and never ended, read
        from the whole session (whatever the agent's own start point): what a
        restarted agent left open. ``holder`` says which process owned each."""
        transcript = await read_transcript(self.session)
        found = []
        for turn in transcript:
            reply = turn.reply_of(self.author.id)
            if reply is not None and not reply.done:
                found.append(Unfinished(turn.message, reply))
        return found

    async def adopt(self, unfinished: Unfinished) -> AgentReply:
        """Take over an unfinished reply and continue it (use it as ``agent.reply``
        gives it: ``async with``). Its text so far is ``reply.text``; what is
        written next follows it. Raises :class:`TurnFenced` if the reply was
        ended or adopted by someone else first; the previous owner, if it is
        still running, can write nothing more."""
        left = unfinished.reply
        if left.turn_id in self._replies:
            raise UsageError(f"a reply to turn {left.turn_id!r} is already in progress")
        in_reply_to = unfinished.message.event_id if unfinished.message is not None else None
        reply = AgentReply(self, left.turn_id, in_reply_to=in_reply_to, adopting=left)
        await reply.start()
        return reply

    async def abandon(self, unfinished: Unfinished, *, error: str | None = None) -> bool:
        """End an unfinished reply as ``abandoned`` instead of continuing it.
        True if this call ended it; False if someone else ended or adopted it first."""
        left = unfinished.reply
        return await end_reply(
            self.session,
            left.turn_id,
            self.author.id,
            left.generation,
            error=error or "the agent restarted and did not continue this reply",
        )


@dataclass(frozen=True)
class Unfinished:
    """A reply its agent started and never ended (see :meth:`Agent.unfinished`)."""

    message: UserMessage | None
    reply: Reply

    @property
    def turn_id(self) -> str:
        return self.reply.turn_id

    @property
    def holder(self) -> str | None:
        """The process that owned it last."""
        return self.reply.holder


async def read_transcript(session: Session) -> Transcript:
    """The transcript of the whole session as it is now (one read, no live tail)."""
    transcript = Transcript()
    async with session.subscribe("beginning", leases="off") as events:
        while not events.caught_up.is_set():
            step = asyncio.ensure_future(anext(events, None))
            caught_up = asyncio.ensure_future(events.caught_up.wait())
            try:
                await asyncio.wait({step, caught_up}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                caught_up.cancel()
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                break
            event = step.result()
            if event is None:
                break
            transcript.apply(event)
    return transcript


class AgentReply:
    """One agent's answer in one turn. Create it with :meth:`Agent.reply` (or
    :meth:`Agent.adopt` to continue one a previous process left open)."""

    def __init__(
        self,
        agent: Agent,
        turn_id: str,
        *,
        in_reply_to: str | None,
        adopting: Reply | None = None,
    ) -> None:
        self.agent = agent
        self.turn_id = turn_id
        self.in_reply_to = in_reply_to
        self._session = agent.session
        self._key = (turn_id, agent.author.id)
        self._producer_id = reply_producer_id(turn_id, agent.author.id)
        #: The lease generation this reply writes in: 0, or one more than the
        #: reply it adopted.
        self.generation = adopting.generation + 1 if adopting is not None else 0
        self._adopting = adopting is not None
        self._producer: IdempotentProducer | None = None
        self._buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._index = adopting.deltas if adopting is not None else 0
        self._pending: list[asyncio.Future[PublishAck]] = []
        self._publishes: list[asyncio.Future[PublishAck]] = []
        self._cancelled = asyncio.Event()
        self._stopped = asyncio.Event()  # cancelled or fenced: stop writing
        self.cancel_event: Cancel | None = None
        self.steers: list[Steer] = []
        self._steered = asyncio.Event()
        self._approvals: dict[str, asyncio.Future[Approval]] = {}
        self._started = False
        self._starting: asyncio.Future[None] | None = None
        self._ended: PublishAck | None = None
        self._fence: TurnFenced | None = None
        self._own_ids: set[str] = set()
        #: The reply's text so far (an adopted reply starts with what is in the log).
        self.text = adopting.text if adopting is not None else ""

    # --- state --------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether a cancel for this reply has arrived."""
        return self._cancelled.is_set()

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def fenced(self) -> TurnFenced | None:
        """Why this reply may not write any more, if another owner took it."""
        return self._fence

    @property
    def published(self) -> tuple[PublishAck, ...]:
        """What this reply published and the session acknowledged, in the order
        it was published: ``turn_start`` (or ``turn_adopt``), each
        ``text_delta``, ``progress`` and ``turn_lease``, ``turn_end``. Each ack
        has the event (``ack.event_id``) and the offset right after it
        (``ack.offset``; ``None`` for a retry the server recognised as a
        duplicate). Complete once :meth:`end` has returned (the context
        manager's exit); an event whose publish failed is left out.

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
            self._stopped.set()

    def _on_steer(self, steer: Steer) -> None:
        self.steers.append(steer)
        self._steered.set()

    def _taken_by(self, event: TurnEnd | TurnAdopt) -> bool:
        """Whether ``event`` (read from the session) ends or takes over this reply
        and was not written by this reply itself."""
        if event.event_id in self._own_ids:
            return False
        if isinstance(event, TurnEnd):
            return event.reply_author == self.agent.author.id
        return event.author.id == self.agent.author.id and event.generation > self.generation

    def _on_fenced(self, by: AnyEvent | StaleEpoch) -> None:
        if self._fence is not None or self._ended is not None:
            return
        if isinstance(by, TurnEnd):
            who = by.author.name or by.author.id
            what = f"ended it as {by.reason.value} ({who}" + (f": {by.error})" if by.error else ")")
            event: AnyEvent | None = by
        elif isinstance(by, TurnAdopt):
            what = f"another process ({by.holder or 'unnamed'}) adopted it"
            event = by
        else:
            what = "another owner holds its lease now (the server refused this owner's write)"
            event = None
        self._fence = TurnFenced(
            f"the reply to turn {self.turn_id!r} is no longer this agent's to write: {what}",
            url=self._session.url,
            by=event,
        )
        log.warning("%s (session %s)", self._fence, self._session.session_id)
        self._stopped.set()
        self._release()
        for waiter in self._approvals.values():
            if not waiter.done():
                waiter.set_exception(self._fence)

    def _on_approval(self, approval: Approval) -> None:
        waiter = self._approvals.get(approval.request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(approval)

    def take_steers(self) -> list[Steer]:
        """The steering received since the last call (and forget it)."""
        steers, self.steers = self.steers, []
        self._steered.clear()
        return steers

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Claim the reply and publish ``turn_start`` (the context manager does
        this); returns once the session confirmed it. Idempotent.

        Raises :class:`TurnFenced` if another process already started (or
        ended) this agent's reply to the turn, or, for an adopted reply, if
        someone else adopted or ended it first.
        """
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._claim())
        await asyncio.shield(self._starting)

    async def _claim(self) -> None:
        self._started = True
        agent = self.agent
        agent._replies[self.turn_id] = self
        self._session._held.add(self._key)
        # A cancel may have arrived before this reply started.
        for cancel in agent.transcript.cancels_for(self.turn_id, agent.author.id):
            self._on_cancel(cancel)
            break
        self._producer = self._session._reply_producer(self._producer_id, self.generation)
        first: AnyEvent
        if self._adopting:
            first = TurnAdopt(
                author=agent.author,
                turn_id=self.turn_id,
                generation=self.generation,
                ttl=agent.lease_ttl,
                holder=agent.holder,
            )
        else:
            first = TurnStart(
                author=agent.author,
                turn_id=self.turn_id,
                in_reply_to=self.in_reply_to,
                lease_ttl=agent.lease_ttl,
                holder=agent.holder,
            )
        try:
            await self._publish(first)
        except TurnFenced:
            raise
        except StaleEpoch as exc:
            self._on_fenced(exc)
            assert self._fence is not None
            raise self._fence from exc
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        """This reply is over for this process: stop renewing, let go of the turn."""
        for timer in (self._timer, self._heartbeat):
            if timer is not None:
                timer.cancel()
        self._timer = self._heartbeat = None
        agent = self.agent
        if agent._replies.get(self.turn_id) is self:
            del agent._replies[self.turn_id]
            if not agent._replies:
                self._session.set_presence_nowait("idle")
        self._session._held.discard(self._key)
        producer, self._producer = self._producer, None
        if producer is not None:
            self._session._background(
                self._session._release_producer(producer), name="durable-reply-producer"
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
        if isinstance(exc, TurnFenced) or (exc is None and self._fence is not None):
            self._release()
            return isinstance(exc, TurnFenced)
        if self._ended is not None:
            return isinstance(exc, TurnCancelled)
        if isinstance(exc, TurnCancelled) or (exc is None and self.cancelled):
            await self._end_quietly(EndReason.CANCELLED)
            return isinstance(exc, TurnCancelled)
        if isinstance(exc, asyncio.CancelledError):
            # The agent's task was cancelled (shutdown): end the reply in the
            # background (the session waits for it as it closes), and never let
            # a closed session mask the cancellation.
            if self._session._closed:
                self._release()
            else:
                self._session._background(
                    self._end_quietly(EndReason.ERROR, error="the agent stopped"),
                    name="durable-reply-end",
                )
            return False
        if exc is not None:
            await self._end_quietly(EndReason.ERROR, error=f"{type(exc).__name__}: {exc}")
            return False
        await self._end_quietly(EndReason.COMPLETE)
        return False

    async def _end_quietly(self, reason: EndReason, *, error: str | None = None) -> None:
        """End the reply; if another owner took it meanwhile, there is nothing to end."""
        with contextlib.suppress(TurnFenced):
            await self.end(reason, error=error)

    # --- writing ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._fence is not None:
            raise self._fence
        if self._ended is not None:
            raise UsageError(f"the reply to turn {self.turn_id!r} has ended")
        if self.cancelled:
            raise TurnCancelled(
                f"turn {self.turn_id!r} was cancelled",
                url=self._session.url,
                cancel=self.cancel_event,
            )

    async def write(self, text: str) -> None:
        """Add ``text`` to the reply. Raises :class:`TurnCancelled` once cancelled,
        :class:`TurnFenced` once another owner took the reply.

        Text is coalesced: one ``text_delta`` per rollup window.
        """
        self._check_writable()
        if not self._started:
            await self.start()
        if not text:
            return
        if not self._buffer and not self.text:
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
        Raises :class:`TurnFenced` (the context manager catches it) if another
        owner took the reply.
        """

        async def pump() -> None:
            async for token in tokens:
                await self.write(token)

        task = asyncio.ensure_future(pump())
        waiter = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TurnCancelled, TurnFenced):
                await task
        elif (exc := task.exception()) is not None and not isinstance(
            exc, TurnCancelled | TurnFenced
        ):
            raise exc
        if self._fence is not None:
            raise self._fence
        return EndReason.CANCELLED if self.cancelled else EndReason.COMPLETE

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
        if self._fence is not None:
            raise self._fence
        if not self._started:
            await self.start()
        self._publish_nowait(
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

    async def request_approval(
        self,
        tool: str,
        *,
        arguments: dict[str, Any] | None = None,
        description: str | None = None,
    ) -> Approval:
        """Ask the session whether to run ``tool`` and wait for the first answer.

        Publishes an ``approval_request``; anyone in the session answers with
        :meth:`Session.approve`. The lease is renewed while waiting. Returns
        the answer (``approval.approved``, who: ``approval.author``); raises
        :class:`TurnCancelled` if the turn is cancelled meanwhile and
        :class:`TurnFenced` if the reply is taken over.
        """
        self._check_writable()
        if not self._started:
            await self.start()
        self._flush()
        request = ApprovalRequest(
            author=self.agent.author,
            turn_id=self.turn_id,
            tool=tool,
            arguments=arguments,
            description=description,
        )
        waiter: asyncio.Future[Approval] = asyncio.get_running_loop().create_future()
        self._approvals[request.request_id] = waiter
        known = self.agent.transcript.approval(request.request_id)
        if known is not None and known.decision is not None:
            waiter.set_result(known.decision)
        self._publish_nowait(request)
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        either: set[asyncio.Future[Any]] = {waiter, cancelled}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            self._approvals.pop(request.request_id, None)
        if waiter.done():
            return waiter.result()  # raises TurnFenced if the reply was taken over
        waiter.cancel()
        self._check_writable()  # raises TurnCancelled
        raise AssertionError("unreachable")  # pragma: no cover

    async def end(
        self, reason: EndReason = EndReason.COMPLETE, *, error: str | None = None
    ) -> PublishAck:
        """End the reply (once): flush the text, wait until every event of the
        reply has landed, then publish ``turn_end``. A second call returns the
        first ack. Raises :class:`TurnFenced` if another owner ended or took
        the reply first (this end is then not written)."""
        if self._ended is not None:
            return self._ended
        if self._fence is not None:
            raise self._fence
        if not self._started:
            # Ending a reply that never started still opens it first, so readers
            # see start, (text), end in that order.
            await self.start()
        self._flush()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, StaleEpoch):
                self._on_fenced(result)
        if self._fence is not None:
            raise self._fence
        end = TurnEnd(
            author=self.agent.author,
            turn_id=self.turn_id,
            reason=reason,
            error=error,
            cancel_event_id=self.cancel_event.event_id
            if reason is EndReason.CANCELLED and self.cancel_event is not None
            else None,
            generation=self.generation + 1,
        )
        # The end opens the next lease generation: one write decides between it
        # and a reader ending the reply as abandoned (``_core.leases``).
        closer = self._session._reply_producer(self._producer_id, self.generation + 1)
        self._own_ids.add(end.event_id)
        fut = self._session._publish_via(closer, end)
        self._publishes.append(fut)
        try:
            ack = await fut
        except StaleEpoch as exc:
            self._on_fenced(exc)
            assert self._fence is not None
            raise self._fence from exc
        finally:
            await self._session._release_producer(closer)
        self._ended = ack
        self._release()
        return ack

    # --- internals -----------------------------------------------------------------------

    def _flush_later(self) -> None:
        """The rollup timer's callback. If the session was closed meanwhile the text
        has nowhere to go; raising here would only reach the event loop's log."""
        self._timer = None
        try:
            self._flush()
        except (ClientClosed, TurnFenced):
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
        self._publish_nowait(delta)

    def _beat(self) -> None:
        """The lease timer: nothing was published for a third of the lease."""
        self._heartbeat = None
        if self._fence is not None or self._ended is not None or self._producer is None:
            return
        with contextlib.suppress(ClientClosed):
            self._publish_nowait(
                TurnLease(
                    author=self.agent.author,
                    turn_id=self.turn_id,
                    generation=self.generation,
                    ttl=self.agent.lease_ttl,
                    holder=self.agent.holder,
                )
            )

    async def _publish(self, event: AnyEvent) -> PublishAck:
        return await asyncio.shield(self._publish_nowait(event))

    def _publish_nowait(self, event: AnyEvent) -> asyncio.Future[PublishAck]:
        if self._fence is not None:
            raise self._fence
        producer = self._producer
        if producer is None:
            raise UsageError(f"the reply to turn {self.turn_id!r} is not started or is over")
        if event.event_id is not None:
            self._own_ids.add(event.event_id)
        fut = self._session._publish_via(producer, event)
        fut.add_done_callback(self._landed)
        self._publishes.append(fut)
        self._pending.append(fut)
        # Every publish renews the lease; the heartbeat fills the silences.
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._heartbeat = asyncio.get_running_loop().call_later(
            self.agent.lease_ttl / 3, self._beat
        )
        return fut

    def _landed(self, fut: asyncio.Future[PublishAck]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, StaleEpoch):
            self._on_fenced(exc)
