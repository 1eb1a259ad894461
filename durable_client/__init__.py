"""durable_client: durable sessions for Python, on the Durable Streams protocol.

Two layers, both async:

- The **stream client** (:class:`DurableStream`, :class:`IdempotentProducer`)
  speaks the Durable Streams HTTP protocol for one stream: create, append,
  read (catch-up, long-poll, SSE), head, delete, close, and exactly-once
  appends.
- The **session layer** (:class:`Session`, :class:`Agent`, :class:`Transcript`)
  is what apps use: a session is one JSON stream of typed events; subscribers
  get history then live exactly once across disconnects, publishes are
  idempotent and queued while offline, cancel is an explicit event.

A session talks to the server over our WebSocket transport when the server
offers it (:class:`WebSocketTransport`: one socket, presence included) and
over HTTP otherwise (:class:`HttpTransport`), with the same guarantees.

Every error is a :class:`DurableError`; see ``docs/errors.md`` for the tree.
"""

from ._agent import Agent, AgentReply, IncomingTurn
from ._errors import (
    BadRequest,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    DurableError,
    EpochReused,
    FatalError,
    Forbidden,
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
    Unauthorized,
    UnexpectedStatus,
    UsageError,
)
from ._events import (
    AnyEvent,
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
    TurnEnd,
    TurnStart,
    UnknownEvent,
    UserMessage,
    new_id,
    parse_event,
)
from ._offsets import FileOffsetStore, MemoryOffsetStore, OffsetStore, Position
from ._producer import IdempotentProducer, ProducerStamp
from ._retry import ReconnectPolicy, RetryPolicy
from ._session import (
    DEFAULT_SESSION_PATH,
    OnReplaced,
    PublishAck,
    Session,
    StartPoint,
    Subscription,
    TransportChoice,
)
from ._state import ConnectionState, ConnectionStatus
from ._stream import (
    AppendResult,
    CloseResult,
    CreateResult,
    DurableStream,
    HeadResult,
    LiveMode,
    ReadBatch,
)
from ._transcript import Reply, ReplyStatus, Transcript, Turn
from ._transport import HttpTransport, SessionTransport, TransportBatch
from ._ws import PresenceChange, WebSocketOptions, WebSocketTransport
from ._ws_frames import Member

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SESSION_PATH",
    "Agent",
    "AgentReply",
    "AnyEvent",
    "AppendResult",
    "Author",
    "AuthorKind",
    "BadRequest",
    "Cancel",
    "CancelScope",
    "ClientClosed",
    "CloseResult",
    "ConnectError",
    "ConnectionLost",
    "ConnectionState",
    "ConnectionStatus",
    "CreateResult",
    "DurableError",
    "DurableStream",
    "EndReason",
    "EpochReused",
    "FatalError",
    "FileOffsetStore",
    "Forbidden",
    "HeadResult",
    "HttpTransport",
    "IdempotentProducer",
    "IncomingTurn",
    "LiveMode",
    "Member",
    "MemoryOffsetStore",
    "OffsetGone",
    "OffsetStore",
    "OnReplaced",
    "PayloadTooLarge",
    "Position",
    "PresenceChange",
    "PresenceUnavailable",
    "ProducerStamp",
    "Progress",
    "ProgressStatus",
    "ProtocolViolation",
    "PublishAck",
    "RateLimited",
    "ReadBatch",
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
    "SessionTransport",
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
    "TransportBatch",
    "TransportChoice",
    "TransportError",
    "Turn",
    "TurnCancelled",
    "TurnEnd",
    "TurnStart",
    "Unauthorized",
    "UnexpectedStatus",
    "UnknownEvent",
    "UsageError",
    "UserMessage",
    "WebSocketOptions",
    "WebSocketTransport",
    "__version__",
    "new_id",
    "parse_event",
]
