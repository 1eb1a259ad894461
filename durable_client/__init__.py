"""durable_client: durable sessions for Python, on the Durable Streams protocol.

What apps use is here, at the root: a :class:`Session` is one JSON stream of
typed events shared by users and agents; subscribers get history then live,
exactly once across disconnects; publishes are idempotent and queued while
offline; cancel is an explicit event. :class:`Agent` answers turns,
:class:`Transcript` folds events into a conversation, the connection state
is a :class:`ConnectionStatus`, and every error is a :class:`DurableError`
(``docs/errors.md`` draws the tree).

Three namespaces hold the rest:

- :mod:`durable_client.transports`: how a session reaches its stream
  (``AutoTransport``, ``HttpTransport``, ``WebSocketTransport``, and
  ``MemoryTransport`` for tests without a server), and the seam they share;
- :mod:`durable_client.streams`: the stream layer underneath, one Durable
  Streams stream over HTTP (``DurableStream``, ``IdempotentProducer``);
- :mod:`durable_client.wire`: the wire format itself, for other peers.
"""

from . import streams as streams
from . import transports as transports
from . import wire as wire
from ._agent import Agent, AgentReply, IncomingTurn, Unfinished
from ._errors import (
    BadRequest,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    DurableError,
    EpochReused,
    FatalError,
    Forbidden,
    NoProgress,
    OffsetGone,
    PayloadTooLarge,
    PresenceUnavailable,
    ProtocolViolation,
    RateLimited,
    RequestTimeout,
    RetryableError,
    SequenceConflict,
    SequenceGap,
    ServerBusy,
    ServerError,
    StaleEpoch,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
    StreamReplaced,
    TransportError,
    TurnCancelled,
    TurnFenced,
    Unauthorized,
    UnexpectedStatus,
    UsageError,
)
from ._events import (
    AnyEvent,
    Approval,
    ApprovalRequest,
    Author,
    AuthorKind,
    Cancel,
    CancelScope,
    EndReason,
    Progress,
    ProgressStatus,
    SessionEvent,
    Steer,
    SteerMode,
    TextDelta,
    TurnAdopt,
    TurnEnd,
    TurnLease,
    TurnStart,
    UnknownEvent,
    UserMessage,
    new_id,
    parse_event,
)
from ._offsets import FileOffsetStore, MemoryOffsetStore, OffsetStore, Position
from ._retry import ReconnectPolicy, RetryPolicy
from ._session import DEFAULT_SESSION_PATH, PublishAck, Session, TransportChoice
from ._state import ConnectionState, ConnectionStatus
from ._subscription import LeaseMode, OnReplaced, StartPoint, Subscription
from ._transcript import ApprovalState, ApprovalStatus, Reply, ReplyStatus, Transcript, Turn
from ._transport import PresenceChange
from ._ws_frames import Member

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SESSION_PATH",
    "Agent",
    "AgentReply",
    "AnyEvent",
    "Approval",
    "ApprovalRequest",
    "ApprovalState",
    "ApprovalStatus",
    "Author",
    "AuthorKind",
    "BadRequest",
    "Cancel",
    "CancelScope",
    "ClientClosed",
    "ConnectError",
    "ConnectionLost",
    "ConnectionState",
    "ConnectionStatus",
    "DurableError",
    "EndReason",
    "EpochReused",
    "FatalError",
    "FileOffsetStore",
    "Forbidden",
    "IncomingTurn",
    "LeaseMode",
    "Member",
    "MemoryOffsetStore",
    "NoProgress",
    "OffsetGone",
    "OffsetStore",
    "OnReplaced",
    "PayloadTooLarge",
    "Position",
    "PresenceChange",
    "PresenceUnavailable",
    "Progress",
    "ProgressStatus",
    "ProtocolViolation",
    "PublishAck",
    "RateLimited",
    "ReconnectPolicy",
    "Reply",
    "ReplyStatus",
    "RequestTimeout",
    "RetryPolicy",
    "RetryableError",
    "SequenceConflict",
    "SequenceGap",
    "ServerBusy",
    "ServerError",
    "Session",
    "SessionEvent",
    "StaleEpoch",
    "StartPoint",
    "Steer",
    "SteerMode",
    "StreamClosed",
    "StreamConflict",
    "StreamNotFound",
    "StreamReplaced",
    "Subscription",
    "TextDelta",
    "Transcript",
    "TransportChoice",
    "TransportError",
    "Turn",
    "TurnAdopt",
    "TurnCancelled",
    "TurnEnd",
    "TurnFenced",
    "TurnLease",
    "TurnStart",
    "Unauthorized",
    "UnexpectedStatus",
    "Unfinished",
    "UnknownEvent",
    "UsageError",
    "UserMessage",
    "__version__",
    "new_id",
    "parse_event",
]
