"""Reply leases, without I/O: who owns a reply, when it lapses, which write decides.

A reply that an agent starts with a lease (``turn_start`` with ``lease_ttl``)
is owned by that agent until it ends. The owner keeps the lease by publishing
something for the reply at least every ``ttl`` seconds (text, progress, or a
``turn_lease`` heartbeat when it has nothing else to say). A reply whose
owner goes quiet for longer, because it was killed, lost its host or sits
behind a partition, has *lapsed*: any reader may end it as ``abandoned``,
and a new owner may adopt it instead.

Exactly one of those things happens, with no coordinator, because every write
for a reply goes through one idempotent producer named after the reply
(:func:`reply_producer_id`), and the lease *generation* is that producer's
epoch:

- generation ``g``'s owner writes the reply's events at epoch ``g`` from
  seq 1 on;
- the next generation begins with the one event at epoch ``g + 1``, seq 0:
  ``turn_start`` (generation 0 begins at epoch 0), ``turn_adopt`` (a new
  owner continues), or ``turn_end`` (the owner finished, or someone ended the
  lapsed reply). Whoever writes that slot first wins it; the server answers
  every other contender with 403 (another producer already used the epoch
  and seq, with other data) or, on servers that do not compare, a duplicate
  on the first attempt, which the producer reads the same way
  (:class:`~durable_client.EpochReused`);
- once epoch ``g + 1`` exists, the server refuses every write of epoch ``g``
  (403, a stale epoch): the old owner is fenced, so no late text lands after
  an end or into an adopted reply.

Two readers racing to end a lapsed reply therefore write one end; an owner
finishing while a reader ends it writes one end too (one of them learns it
lost). The rules live in the producer protocol every server already
enforces, so they hold with several servers on one store as well.

:class:`LeaseTable` is the reader's side: fed the events it reads and the
time it read them (the caller's monotonic clock), it says which replies have
lapsed and when to look next. It trusts only what it saw: the lease is
measured from the last event of the reply this reader received, never from
the author's wall clock.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .._events import (
    AnyEvent,
    ApprovalRequest,
    Progress,
    TextDelta,
    TurnAdopt,
    TurnEnd,
    TurnLease,
    TurnStart,
)

__all__ = ["LeaseTable", "OpenLease", "reply_producer_id"]


def reply_producer_id(turn_id: str, author_id: str) -> str:
    """The idempotent producer id every write for ``author_id``'s reply in ``turn_id`` uses.

    Derived, so every participant names the same producer without asking: a
    hash keeps it short and free of characters a header cannot carry.
    """
    pair = json.dumps([turn_id, author_id], ensure_ascii=False)  # unambiguous for any two strings
    digest = hashlib.sha256(pair.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"reply-{digest}"


@dataclass(slots=True)
class OpenLease:
    """A leased reply a reader has seen start and not end."""

    turn_id: str
    author_id: str
    generation: int
    ttl: float
    holder: str | None
    #: When it lapses, on the reader's clock: the last event seen plus ``ttl``.
    deadline: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.turn_id, self.author_id)


class LeaseTable:
    """The open leased replies one reader knows of, and their deadlines."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], OpenLease] = {}

    def __len__(self) -> int:
        return len(self._open)

    def get(self, turn_id: str, author_id: str) -> OpenLease | None:
        return self._open.get((turn_id, author_id))

    @property
    def leases(self) -> list[OpenLease]:
        return list(self._open.values())

    def observe(self, event: AnyEvent, now: float) -> None:
        """Take one event read at ``now`` into account."""
        if isinstance(event, TurnStart):
            if event.lease_ttl is not None:
                key = (event.turn_id, event.author.id)
                if key not in self._open:
                    self._open[key] = OpenLease(
                        event.turn_id,
                        event.author.id,
                        0,
                        event.lease_ttl,
                        event.holder,
                        now + event.lease_ttl,
                    )
        elif isinstance(event, TurnEnd):
            self._open.pop((event.turn_id, event.reply_author), None)
        elif isinstance(event, TurnLease | TurnAdopt):
            lease = self._open.get((event.turn_id, event.author.id))
            if lease is not None and event.generation >= lease.generation:
                lease.generation = event.generation
                lease.ttl = event.ttl
                lease.holder = event.holder
                lease.deadline = now + event.ttl
        elif isinstance(event, TextDelta | Progress | ApprovalRequest):
            lease = self._open.get((event.turn_id, event.author.id))
            if lease is not None:
                lease.deadline = now + lease.ttl

    def lapsed(self, now: float) -> list[OpenLease]:
        """The replies whose lease ran out by ``now``, oldest deadline first."""
        due = [lease for lease in self._open.values() if lease.deadline <= now]
        return sorted(due, key=lambda lease: lease.deadline)

    def next_deadline(self) -> float | None:
        """The earliest deadline (``None``: nothing to watch)."""
        return min((lease.deadline for lease in self._open.values()), default=None)

    def extend(self, lease: OpenLease, now: float) -> None:
        """Give ``lease`` another full ``ttl`` from ``now`` (the reader found it
        was behind, not the owner)."""
        lease.deadline = now + lease.ttl

    def forget(self, lease: OpenLease) -> None:
        self._open.pop(lease.key, None)
