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
- ``turn_end`` closes the reply once: later ends and later deltas of that
  reply are ignored, so the reply's text is exactly what was streamed before
  its end. A cancelled reply keeps its partial text.
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
    Author,
    Cancel,
    EndReason,
    Progress,
    Steer,
    TextDelta,
    TurnEnd,
    TurnStart,
    UnknownEvent,
    UserMessage,
)
from ._offsets import EventIdDeduper

__all__ = ["Reply", "ReplyStatus", "Transcript", "Turn"]


class ReplyStatus(StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    ERROR = "error"


_END_STATUS = {
    EndReason.COMPLETE: ReplyStatus.COMPLETE,
    EndReason.CANCELLED: ReplyStatus.CANCELLED,
    EndReason.ERROR: ReplyStatus.ERROR,
}


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
    cancel_requested: bool = False

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
            self._reply(self._turn(event.turn_id), event.author)
        elif isinstance(event, TextDelta):
            reply = self._reply(self._turn(event.turn_id), event.author)
            if not reply.done:
                reply.text += event.text
                reply.deltas += 1
        elif isinstance(event, TurnEnd):
            reply = self._reply(self._turn(event.turn_id), event.author)
            if not reply.done:
                reply.status = _END_STATUS[event.reason]
                reply.error = event.error
        elif isinstance(event, Cancel):
            self._apply_cancel(event)
        elif isinstance(event, Steer):
            self._turn(event.turn_id).steers.append(event)
        elif isinstance(event, Progress):
            self._turn(event.turn_id).progress.append(event)
        return True

    def _apply_cancel(self, cancel: Cancel) -> None:
        self.cancels.append(cancel)
        for turn in self.turns:
            if not turn.replies and turn.open and self.cancel_applies(cancel, turn.turn_id):
                turn.cancel_requested = True
            for reply in turn.replies.values():
                if not reply.done and self.cancel_applies(cancel, turn.turn_id, reply.author.id):
                    reply.cancel_requested = True
                    turn.cancel_requested = True
