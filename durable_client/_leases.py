"""Reply leases, the asyncio side: a reader's watchdog, and the one write that ends a reply.

The rules are in ``_core.leases``. Here:

- :func:`end_reply` writes a reply's end into the slot that decides its next
  generation (epoch ``g + 1``, seq 0 of the reply's producer) and says
  whether this caller won it. Readers use it for lapsed replies, agents for
  replies they drop after a restart.
- :class:`LeaseWatch` is what a subscription runs for the leased replies it
  reads. When one's lease runs out it does not trust its own connection:
  it asks the server for the stream's tail. A tail past what the reader was
  handed means the reader is behind (a slow consumer: wait) or its live
  connection missed a wake-up (reconnect at once, then wait again); only a
  log with nothing more in it ends the reply as ``abandoned``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal, TypeAlias

from ._core.leases import LeaseTable, OpenLease, reply_producer_id
from ._errors import ClientClosed, DurableError, FatalError, StaleEpoch
from ._events import AnyEvent, EndReason, TurnEnd

if TYPE_CHECKING:
    from ._session import Session
    from ._subscription import Subscription

__all__ = ["LeaseMode", "LeaseWatch", "end_reply"]

log = logging.getLogger("durable_client.leases")

#: What a subscription does about leased replies that go quiet.
LeaseMode: TypeAlias = Literal["end", "watch", "off"]

#: How long to wait before asking again when the server could not say its tail.
RECHECK_AFTER_ERROR = 1.0
#: The longest a tail check may take (and at least this long): the request can
#: land on a pooled connection as dead as the live one it checks on.
RECHECK_TIMEOUT = (1.0, 5.0)


async def end_reply(
    session: Session,
    turn_id: str,
    reply_author_id: str,
    generation: int,
    *,
    reason: EndReason = EndReason.ABANDONED,
    error: str | None = None,
) -> bool:
    """End ``reply_author_id``'s reply in ``turn_id``, now in lease generation
    ``generation``, as ``session.author``. True if this call wrote the end;
    False if another end, or an adoption, already took that generation's slot
    (the reply is then ended or owned by someone else; nothing was written)."""
    end = TurnEnd(
        author=session.author,
        turn_id=turn_id,
        reason=reason,
        error=error,
        reply_author_id=None if reply_author_id == session.author.id else reply_author_id,
        generation=generation + 1,
    )
    producer = session._reply_producer(reply_producer_id(turn_id, reply_author_id), generation + 1)
    try:
        await session._publish_via(producer, end)
        return True
    except StaleEpoch:  # EpochReused included: the slot was someone else's
        return False
    finally:
        await session._release_producer(producer)


class LeaseWatch:
    """One subscription's watch over the leased replies it has read.

    ``observe`` every event handed out; the watch wakes at the earliest lease
    deadline and re-checks the log (see the module docstring). ``rechecks``
    counts the times the reader was found behind, ``ended`` the replies this
    watch ended.
    """

    def __init__(self, subscription: Subscription, session: Session, mode: LeaseMode) -> None:
        self._subscription = subscription
        self._session = session
        self._mode = mode
        self._table = LeaseTable()
        self._timer: asyncio.TimerHandle | None = None
        self._check: asyncio.Task[None] | None = None
        self._closed = False
        self.rechecks = 0
        self.ended = 0

    @property
    def table(self) -> LeaseTable:
        return self._table

    def observe(self, event: AnyEvent) -> None:
        if self._closed:
            return
        self._table.observe(event, asyncio.get_running_loop().time())
        self._arm()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._check is not None:
            self._check.cancel()

    def _arm(self) -> None:
        if self._check is not None:
            return  # the check re-arms when it is done
        deadline = self._table.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._closed or self._check is not None:
            return
        self._check = asyncio.get_running_loop().create_task(
            self._recheck(), name=f"durable-lease-watch:{self._session.url}"
        )

    async def _recheck(self) -> None:
        try:
            await self._recheck_once()
        except asyncio.CancelledError:
            raise
        except ClientClosed:
            self._closed = True
        except DurableError as exc:  # the server could not be asked: ask again soon
            log.debug("lease re-check failed: %s", exc)
            now = asyncio.get_running_loop().time()
            for lease in self._table.lapsed(now):
                lease.deadline = now + min(lease.ttl, RECHECK_AFTER_ERROR)
        finally:
            self._check = None
            if not self._closed:
                self._arm()

    async def _recheck_once(self) -> None:
        loop = asyncio.get_running_loop()
        session = self._session
        lapsed = [
            lease for lease in self._table.lapsed(loop.time()) if lease.key not in session._held
        ]
        for lease in self._table.lapsed(loop.time()):
            if lease.key in session._held:  # this process owns it and is alive
                self._table.extend(lease, loop.time())
        if not lapsed:
            return
        low, high = RECHECK_TIMEOUT
        try:
            async with asyncio.timeout(min(high, max(low, min(le.ttl for le in lapsed)))):
                tail = await session._transport.tail()
        except TimeoutError:
            # No answer in time: this reader's connections are as suspect as the
            # silence. Cut them (the live read resumes on a new one) and ask again.
            log.info("a leased reply went quiet and the tail check hung: reconnecting")
            self.rechecks += 1
            session.drop_connections()
            now = loop.time()
            for lease in lapsed:
                lease.deadline = now + min(lease.ttl, RECHECK_AFTER_ERROR)
            return
        now = loop.time()
        if self._behind(tail):
            # More in the log than this reader was handed. A full queue is a
            # slow consumer; an empty one is a live read that missed its wake-up.
            self.rechecks += 1
            if self._subscription._queue.empty():
                log.info("a leased reply went quiet but the log moved on: reconnecting")
                session.drop_connections()
            for lease in lapsed:
                self._table.extend(lease, now)
            return
        for lease in lapsed:
            self._table.forget(lease)
            if self._mode != "end":
                continue
            if await self._end(lease):
                self.ended += 1

    def _behind(self, tail: str) -> bool:
        position = self._subscription.position
        return position is None or position.skip > 0 or position.offset != tail

    async def _end(self, lease: OpenLease) -> bool:
        quiet = f"{lease.ttl:g} s" if lease.ttl < 60 else f"{lease.ttl / 60:g} min"
        try:
            won = await end_reply(
                self._session,
                lease.turn_id,
                lease.author_id,
                lease.generation,
                error=f"the agent stopped responding (no word for {quiet})",
            )
        except ClientClosed:
            return False
        except FatalError as exc:  # e.g. a read-only token: someone else must end it
            log.info(
                "could not end %s's lapsed reply in turn %s: %s",
                lease.author_id,
                lease.turn_id,
                exc,
            )
            return False
        if won:
            log.info(
                "ended %s's reply in turn %s: its lease lapsed", lease.author_id, lease.turn_id
            )
        return won
