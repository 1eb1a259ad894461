"""The transcript: a pure fold of session events into conversation state.

The same fold serves the SDK (an agent knows which turns are open and which
cancels apply), the tests (the state every client must agree on) and the TUI
(what to draw). Applying an event twice changes nothing (events are
deduplicated by id, by the same bounded :class:`EventIdDeduper` a
subscription uses), so a fold over "history, then live" is safe even if a
caller feeds an event twice.

Rules, in stream order:

- ``user_message`` opens its turn. ``turn_start`` opens the reply of its
  author in that turn; a ``text_delta`` appends to it (opening it if the
  start was not seen).
- ``turn_end`` closes the reply once (the reply of ``reply_author_id``, by
  default its author): later ends and later deltas of that reply are
  ignored, so the reply's text is exactly what was streamed before its end.
  A cancelled or abandoned reply keeps its partial text.
- ``turn_lease`` renews a reply's lease; ``turn_adopt`` hands the reply to a
  new owner (its ``generation`` and ``holder``), which continues its text.
- ``approval_request`` opens a pending approval on its turn; the first
  ``approval`` naming it decides; a request still pending when the reply
  that asked ends is void (``expired``).
- ``cancel`` marks every open reply it applies to (and open turns no agent
  has answered yet) as *cancel requested*; the reply ends when its agent
  publishes ``turn_end`` with reason ``cancelled``. Nothing else cancels.
  Which replies a cancel applies to is :meth:`Transcript.cancel_applies`, the
  one routing rule: an :class:`~durable_client.Agent` asks it too.
- ``steer`` and ``progress`` are recorded on their turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from ._events import (
    AnyEvent,
    Approval,
    ApprovalRequest,
    Author,
    Cancel,
    EndReason,
    Progress,
    Steer,
    TextDelta,
    TurnAdopt,
    TurnEnd,
    TurnLease,
    TurnStart,
    UnknownEvent,
    UserMessage,
)
from ._offsets import EventIdDeduper

__all__ = ["ApprovalState", "ApprovalStatus", "Reply", "ReplyStatus", "Transcript", "Turn"]


class ReplyStatus(StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    ERROR = "error"
    ABANDONED = "abandoned"


_END_STATUS = {
    EndReason.COMPLETE: ReplyStatus.COMPLETE,
    EndReason.CANCELLED: ReplyStatus.CANCELLED,
    EndReason.ERROR: ReplyStatus.ERROR,
    EndReason.ABANDONED: ReplyStatus.ABANDONED,
}


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    #: The reply that asked ended before anyone answered.
    EXPIRED = "expired"


@dataclass
class ApprovalState:
    """An agent's request to run a tool, and its answer once there is one."""

    request: ApprovalRequest
    decision: Approval | None = None
    status: ApprovalStatus = ApprovalStatus.PENDING

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Reply:
    """One agent's reply in one turn."""

    turn_id: str
    author: Author
    text: str = ""
    status: ReplyStatus = ReplyStatus.STREAMING
    error: str | None = None
    cancel_requested: bool = False
    deltas: int = 0
    #: Seconds the reply's owner promised to renew its lease in (``None``: not leased).
    lease_ttl: float | None = None
    #: The lease generation: 0 from ``turn_start``, one more per ``turn_adopt``.
    generation: int = 0
    #: The process that owns the reply now, as it named itself.
    holder: str | None = None
    #: How many times a new owner took the reply over.
    adoptions: int = 0
    #: The ``turn_end`` that ended it (who wrote it: ``end.author``).
    end: TurnEnd | None = None

    @property
    def done(self) -> bool:
        return self.status is not ReplyStatus.STREAMING


@dataclass
class Turn:
    """A user message and the replies, steering and progress around it."""

    turn_id: str
    message: UserMessage | None = None
    replies: dict[str, Reply] = field(default_factory=dict)
    steers: list[Steer] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)
    approvals: dict[str, ApprovalState] = field(default_factory=dict)
    cancel_requested: bool = False

    @property
    def retry_of(self) -> str | None:
        """The turn this one asks again, if its message is a retry."""
        return self.message.retry_of if self.message is not None else None

    @property
    def pending_approvals(self) -> list[ApprovalState]:
        return [a for a in self.approvals.values() if a.status is ApprovalStatus.PENDING]

    @property
    def opener_id(self) -> str | None:
        """The id of the author whose message opened the turn."""
        return self.message.author.id if self.message is not None else None

    @property
    def open(self) -> bool:
        """True while a reply streams, or while the message waits for a first reply."""
        if not self.replies:
            return self.message is not None and not self.cancel_requested
        return any(not r.done for r in self.replies.values())

    def reply_of(self, author_id: str) -> Reply | None:
        return self.replies.get(author_id)


class Transcript:
    """Conversation state folded from events. Use :meth:`apply` or :meth:`fold`.

    ``dedupe_capacity`` is how many event ids it remembers to drop repeats
    (duplicates in a log are written close to their original).
    """

    def __init__(self, *, dedupe_capacity: int = 10_000) -> None:
        self.turns: list[Turn] = []
        self._turns: dict[str, Turn] = {}
        self._dedupe = EventIdDeduper(dedupe_capacity)
        self.cancels: list[Cancel] = []
        self.unknown: list[UnknownEvent] = []
        self.applied = 0

    @classmethod
    def fold(cls, events: Iterable[AnyEvent]) -> Transcript:
        """The transcript of ``events``, in order."""
        transcript = cls()
        for event in events:
            transcript.apply(event)
        return transcript

    def turn(self, turn_id: str) -> Turn | None:
        return self._turns.get(turn_id)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    @property
    def replies(self) -> list[Reply]:
        """Every reply, in the order the turns opened."""
        return [reply for turn in self.turns for reply in turn.replies.values()]

    @property
    def active_replies(self) -> list[Reply]:
        """Replies still streaming."""
        return [reply for reply in self.replies if not reply.done]

    def cancel_applies(self, cancel: Cancel, turn_id: str, author_id: str | None = None) -> bool:
        """Whether ``cancel`` stops ``author_id``'s reply in ``turn_id``, or with
        ``author_id=None`` the turn itself while no agent has answered it.

        A turn cancel names the turn, an author cancel the author of the reply
        or of the message that opened the turn, and ``all`` stops everything.
        """
        turn = self._turns.get(turn_id)
        opener = turn.opener_id if turn is not None else None
        if author_id is None:
            # No reply yet: the turn stands for its opener's request.
            author_id = opener or ""
        return cancel.applies_to(turn_id, author_id, opener)

    def cancels_for(self, turn_id: str, author_id: str) -> list[Cancel]:
        """The cancels seen so far that apply to ``author_id``'s reply in ``turn_id``."""
        return [c for c in self.cancels if self.cancel_applies(c, turn_id, author_id)]

    def _turn(self, turn_id: str) -> Turn:
        turn = self._turns.get(turn_id)
        if turn is None:
            turn = Turn(turn_id)
            self._turns[turn_id] = turn
            self.turns.append(turn)
        return turn

    def _reply(self, turn: Turn, author: Author) -> Reply:
        reply = turn.replies.get(author.id)
        if reply is None:
            reply = Reply(turn.turn_id, author, cancel_requested=turn.cancel_requested)
            turn.replies[author.id] = reply
        return reply

    def apply(self, event: AnyEvent) -> bool:
        """Fold one event in. Returns False if its id was already applied."""
        if event.event_id is not None and self._dedupe.seen(event.event_id):
            return False
        self.applied += 1
        if isinstance(event, UnknownEvent):
            self.unknown.append(event)
        elif isinstance(event, UserMessage):
            turn = self._turn(event.turn_id)
            if turn.message is None:
                turn.message = event
        elif isinstance(event, TurnStart):
            reply = self._reply(self._turn(event.turn_id), event.author)
            if not reply.done and reply.lease_ttl is None and event.lease_ttl is not None:
                reply.lease_ttl = event.lease_ttl
                reply.holder = event.holder
        elif isinstance(event, TextDelta):
            reply = self._reply(self._turn(event.turn_id), event.author)
            if not reply.done:
                reply.text += event.text
                reply.deltas += 1
        elif isinstance(event, TurnLease | TurnAdopt):
            reply = self._reply(self._turn(event.turn_id), event.author)
            if not reply.done and event.generation >= reply.generation:
                if isinstance(event, TurnAdopt) and event.generation > reply.generation:
                    reply.adoptions += 1
                reply.generation = event.generation
                reply.lease_ttl = event.ttl
                reply.holder = event.holder
        elif isinstance(event, TurnEnd):
            self._end(event)
        elif isinstance(event, ApprovalRequest):
            turn = self._turn(event.turn_id)
            asking = turn.replies.get(event.author.id)
            if event.request_id not in turn.approvals and not (asking is not None and asking.done):
                turn.approvals[event.request_id] = ApprovalState(event)
        elif isinstance(event, Approval):
            self._decide(event)
        elif isinstance(event, Cancel):
            self._apply_cancel(event)
        elif isinstance(event, Steer):
            self._turn(event.turn_id).steers.append(event)
        elif isinstance(event, Progress):
            self._turn(event.turn_id).progress.append(event)
        return True

    def _end(self, end: TurnEnd) -> None:
        turn = self._turn(end.turn_id)
        author = end.author
        if end.reply_author_id is not None and end.reply_author_id != author.id:
            known = turn.replies.get(end.reply_author_id)
            author = known.author if known is not None else Author.agent(end.reply_author_id)
        reply = self._reply(turn, author)
        if reply.done:
            return
        reply.status = _END_STATUS[end.reason]
        reply.error = end.error
        reply.end = end
        for approval in turn.approvals.values():
            if approval.status is ApprovalStatus.PENDING and (
                approval.request.author.id == reply.author.id
            ):
                approval.status = ApprovalStatus.EXPIRED

    def _decide(self, decision: Approval) -> None:
        turn = self._turns.get(decision.turn_id)
        approval = turn.approvals.get(decision.request_id) if turn is not None else None
        if approval is None or approval.status is not ApprovalStatus.PENDING:
            return  # unknown request, or decided (or void) already: the first answer stands
        approval.decision = decision
        approval.status = ApprovalStatus.APPROVED if decision.approved else ApprovalStatus.DENIED

    def approval(self, request_id: str) -> ApprovalState | None:
        """The approval request ``request_id`` and its state, in any turn."""
        for turn in self.turns:
            found = turn.approvals.get(request_id)
            if found is not None:
                return found
        return None

    def _apply_cancel(self, cancel: Cancel) -> None:
        self.cancels.append(cancel)
        for turn in self.turns:
            if not turn.replies and turn.open and self.cancel_applies(cancel, turn.turn_id):
                turn.cancel_requested = True
            for reply in turn.replies.values():
                if not reply.done and self.cancel_applies(cancel, turn.turn_id, reply.author.id):
                    reply.cancel_requested = True
                    turn.cancel_requested = True
