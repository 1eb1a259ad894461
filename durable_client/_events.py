"""The session event schema: what clients and agents write into a session.

A session is one JSON-mode stream; every message in it is one event, a JSON
object with a ``type`` discriminator. Every event carries:

- ``event_id``: unique (a UUID by default); readers drop repeats of an id.
- ``author``: who wrote it, ``{"id", "kind", "name"}`` with kind one of
  ``user``, ``agent``, ``tool``, ``system``.
- ``turn_id``: the turn it belongs to. A user message opens a turn; the
  agents' replies, tool progress, steering and a cancel of that turn carry
  the same id.
- ``ts``: the author's wall clock (Unix seconds), informational only; order
  is the stream's order.

The types: ``user_message``, ``turn_start``, ``text_delta``, ``turn_end``
(reason ``complete`` | ``cancelled`` | ``error`` | ``abandoned``), ``cancel``
(scope ``turn`` | ``author`` | ``all``), ``steer`` (mode ``steer`` |
``follow_up``), ``progress``, the lease events ``turn_lease`` and
``turn_adopt`` (a reply's owner renews it, a new owner takes it over; see
``_core.leases``) and ``approval_request`` / ``approval`` (an agent asks
before it runs a tool, anyone in the session decides). Readers accept
events of types they do not know as
:class:`UnknownEvent` (kept, not dropped), so the schema can grow.
docs/session-events.md is the reference for humans.
"""

from __future__ import annotations

import time
import typing
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

__all__ = [
    "Approval",
    "ApprovalRequest",
    "Author",
    "AuthorKind",
    "Cancel",
    "CancelScope",
    "EndReason",
    "Progress",
    "ProgressStatus",
    "SessionEvent",
    "Steer",
    "SteerMode",
    "TextDelta",
    "TurnAdopt",
    "TurnEnd",
    "TurnLease",
    "TurnStart",
    "UnknownEvent",
    "UserMessage",
    "new_id",
    "parse_event",
]


def new_id() -> str:
    """A fresh id for an event or a turn (a UUID4 as 32 hex digits)."""
    return uuid.uuid4().hex


class AuthorKind(StrEnum):
    """What kind of participant wrote an event."""

    USER = "user"
    AGENT = "agent"
    TOOL = "tool"
    SYSTEM = "system"


class Author(BaseModel):
    """Who wrote an event. ``id`` is stable per participant (a user, an agent)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: Annotated[str, Field(min_length=1, max_length=256)]
    kind: AuthorKind
    name: str | None = None

    @classmethod
    def user(cls, id: str, name: str | None = None) -> Author:
        return cls(id=id, kind=AuthorKind.USER, name=name)

    @classmethod
    def agent(cls, id: str, name: str | None = None) -> Author:
        return cls(id=id, kind=AuthorKind.AGENT, name=name)

    @classmethod
    def tool(cls, id: str, name: str | None = None) -> Author:
        return cls(id=id, kind=AuthorKind.TOOL, name=name)

    @classmethod
    def system(cls, id: str = "system", name: str | None = None) -> Author:
        return cls(id=id, kind=AuthorKind.SYSTEM, name=name)


class _EventBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(default_factory=new_id)
    author: Author
    turn_id: Annotated[str, Field(min_length=1, max_length=256)]
    ts: float = Field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The event as the JSON object written to the stream."""
        return self.model_dump(mode="json", exclude_none=True)


class UserMessage(_EventBase):
    """A user's message; it opens the turn ``turn_id``.

    ``to`` names the agent ids that should answer (``None``: any agent).
    """

    type: Literal["user_message"] = "user_message"
    turn_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(default_factory=new_id)
    text: str
    to: tuple[str, ...] | None = None
    #: The turn this message asks again (a retry of a reply that failed or was abandoned).
    retry_of: str | None = None


class TurnStart(_EventBase):
    """An agent starts its reply in turn ``turn_id`` (``in_reply_to``: the message id).

    ``lease_ttl`` (seconds) says the reply is leased: its owner publishes
    something for it (text, progress, a ``turn_lease``) at least that often,
    and a reply that goes quiet for longer may be ended as ``abandoned`` by
    any reader. ``holder`` names the process that owns it (informational).
    """

    type: Literal["turn_start"] = "turn_start"
    in_reply_to: str | None = None
    lease_ttl: Annotated[float, Field(gt=0.05, le=3600.0)] | None = None  # seconds
    holder: Annotated[str, Field(max_length=256)] | None = None


class TurnLease(_EventBase):
    """The reply of ``author`` in ``turn_id`` is alive: its lease is renewed for ``ttl`` seconds.

    Published by the owner when it has had nothing else to publish for a
    third of the lease (waiting for a model, a tool or an approval).
    """

    type: Literal["turn_lease"] = "turn_lease"
    generation: Annotated[int, Field(ge=0)] = 0
    ttl: Annotated[float, Field(gt=0.05, le=3600.0)]  # seconds
    holder: Annotated[str, Field(max_length=256)] | None = None


class TurnAdopt(_EventBase):
    """A new owner (``holder``, the same agent ``author``) took over the reply in
    ``turn_id`` and continues it: generation ``generation`` of its lease.

    Whatever the previous owner still sends is refused by the server from now
    on (fenced), so the reply continues exactly after the text already in the log.
    """

    type: Literal["turn_adopt"] = "turn_adopt"
    generation: Annotated[int, Field(ge=1)]
    ttl: Annotated[float, Field(gt=0.05, le=3600.0)]  # seconds
    holder: Annotated[str, Field(max_length=256)] | None = None


class TextDelta(_EventBase):
    """A piece of an agent's reply text; ``index`` counts the deltas of one reply from 0."""

    type: Literal["text_delta"] = "text_delta"
    text: str
    index: Annotated[int, Field(ge=0)] = 0


class EndReason(StrEnum):
    """Why a reply ended."""

    COMPLETE = "complete"
    CANCELLED = "cancelled"
    ERROR = "error"
    #: Its owner stopped renewing the reply's lease (killed, lost, partitioned);
    #: a reader or a new owner ended it. The text so far is kept.
    ABANDONED = "abandoned"


class TurnEnd(_EventBase):
    """A reply in turn ``turn_id`` ended. Published exactly once per reply.

    The reply is ``reply_author_id``'s (default: the event's author): an
    ``abandoned`` end is written by whoever noticed the lapsed lease, under its
    own author, for the agent's reply. ``cancel_event_id`` names the cancel that
    stopped it (reason ``cancelled``); ``error`` says what failed (``error``) or
    what was noticed (``abandoned``). ``generation`` is the lease generation
    the end was written in (leased replies only).
    """

    type: Literal["turn_end"] = "turn_end"
    reason: EndReason
    error: str | None = None
    cancel_event_id: str | None = None
    reply_author_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    generation: Annotated[int, Field(ge=0)] | None = None

    @property
    def reply_author(self) -> str:
        """The id of the agent whose reply this ends."""
        return self.reply_author_id or self.author.id


class CancelScope(StrEnum):
    """What a cancel stops."""

    TURN = "turn"  # every reply in one turn
    AUTHOR = "author"  # every reply written by, or answering, one author
    ALL = "all"  # every reply in the session


class Cancel(_EventBase):
    """An explicit request to stop replies. Nothing else ever cancels a turn.

    ``scope`` says what it stops: ``turn`` (``target_turn_id``, which is also
    the event's ``turn_id`` by default), ``author`` (``target_author_id``:
    replies written by that author or answering that author's messages) or
    ``all`` (every reply in progress).
    """

    type: Literal["cancel"] = "cancel"
    turn_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(default_factory=new_id)
    scope: CancelScope = CancelScope.TURN
    target_turn_id: str | None = None
    target_author_id: str | None = None
    reason: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scope", "turn") == "turn":
            if data.get("target_turn_id") is None and data.get("turn_id") is not None:
                data = {**data, "target_turn_id": data["turn_id"]}
            elif data.get("turn_id") is None and data.get("target_turn_id") is not None:
                data = {**data, "turn_id": data["target_turn_id"]}
        return data

    @model_validator(mode="after")
    def _check_scope(self) -> Cancel:
        if self.scope is CancelScope.TURN and not self.target_turn_id:
            raise ValueError("a turn cancel needs target_turn_id")
        if self.scope is CancelScope.AUTHOR and not self.target_author_id:
            raise ValueError("an author cancel needs target_author_id")
        return self

    def applies_to(self, turn_id: str, reply_author_id: str, opener_id: str | None) -> bool:
        """Whether this cancel stops the reply by ``reply_author_id`` in ``turn_id``,
        a turn opened by ``opener_id``."""
        if self.scope is CancelScope.ALL:
            return True
        if self.scope is CancelScope.TURN:
            return self.target_turn_id == turn_id
        return self.target_author_id in (reply_author_id, opener_id)


class SteerMode(StrEnum):
    """How a steer applies to a running turn."""

    STEER = "steer"  # take it into account now, in the running reply
    FOLLOW_UP = "follow_up"  # handle it right after the running reply


class Steer(_EventBase):
    """Guidance for the running turn ``turn_id``, from the user (or another agent)."""

    type: Literal["steer"] = "steer"
    text: str
    mode: SteerMode = SteerMode.STEER


class ProgressStatus(StrEnum):
    STARTED = "started"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Progress(_EventBase):
    """Progress of a tool call or sub-agent (``source``) working for turn ``turn_id``.

    Written by the tool or sub-agent itself, straight into the session.
    """

    type: Literal["progress"] = "progress"
    source: Annotated[str, Field(min_length=1)]
    status: ProgressStatus = ProgressStatus.RUNNING
    message: str | None = None
    fraction: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    data: dict[str, Any] | None = None


class ApprovalRequest(_EventBase):
    """An agent asks before it runs ``tool`` for its reply in ``turn_id``.

    Anyone in the session may answer with an :class:`Approval` naming
    ``request_id``; the first answer in the log decides. A request still
    pending when its reply ends (for any reason) is void.
    """

    type: Literal["approval_request"] = "approval_request"
    request_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(default_factory=new_id)
    tool: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: dict[str, Any] | None = None
    description: str | None = None


class Approval(_EventBase):
    """An answer to the approval request ``request_id``: ``approved`` or not, by ``author``."""

    type: Literal["approval"] = "approval"
    request_id: Annotated[str, Field(min_length=1, max_length=256)]
    approved: bool
    note: str | None = None


class UnknownEvent(BaseModel):
    """A message a reader could not interpret: an unknown ``type`` (a newer
    writer) or an invalid event. Kept so nothing is silently lost."""

    model_config = ConfigDict(frozen=True)

    type: str | None
    raw: Any
    error: str | None = None
    event_id: str | None = None

    def to_json(self) -> Any:
        return self.raw


_Known: TypeAlias = (
    UserMessage
    | TurnStart
    | TextDelta
    | TurnEnd
    | Cancel
    | Steer
    | Progress
    | TurnLease
    | TurnAdopt
    | ApprovalRequest
    | Approval
)

SessionEvent: TypeAlias = Annotated[_Known, Field(discriminator="type")]

_ADAPTER: TypeAdapter[SessionEvent] = TypeAdapter(SessionEvent)
_KNOWN_TYPES = frozenset(member.model_fields["type"].default for member in typing.get_args(_Known))

AnyEvent: TypeAlias = _Known | UnknownEvent


def parse_event(message: Any) -> AnyEvent:
    """Decode one stream message into an event; never raises.

    Unknown types and invalid events come back as :class:`UnknownEvent`.
    """
    if not isinstance(message, dict):
        return UnknownEvent(type=None, raw=message, error="not a JSON object")
    type_ = message.get("type")
    raw_id = message.get("event_id")
    event_id = raw_id if isinstance(raw_id, str) else None
    if type_ not in _KNOWN_TYPES:
        return UnknownEvent(
            type=type_ if isinstance(type_, str) else None,
            raw=message,
            error=None if isinstance(type_, str) else "no type",
            event_id=event_id,
        )
    try:
        return _ADAPTER.validate_python(message)
    except ValidationError as exc:
        return UnknownEvent(
            type=type_,
            raw=message,
            error=str(exc.errors(include_url=False)[:3]),
            event_id=event_id,
        )
