"""WebSocket session transport: the frames, as pydantic models.

This is the one definition of the WebSocket wire format (``docs/websocket.md``),
shared by the SDK's WebSocket transport and the bundled server. Every frame is
one JSON text message. Client frames carry ``op``; server frames carry ``type``.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WS_PATH: Final = "/v1/ws"

# Close codes (besides the standard 1000 normal, 1001 going away, 1009 too big).
CLOSE_SLOW_CONSUMER: Final = 4008  # outbound queue over its limit; resume from your offset
CLOSE_PROTOCOL_ERROR: Final = 4002  # too many malformed frames in a row
CLOSE_TOO_MANY_SUBSCRIPTIONS: Final = 4029
CLOSE_TOKEN_EXPIRED: Final = 4001  # the token in force expired: reconnect with a fresh one

Id = Annotated[str, Field(min_length=1, max_length=128)]
StreamName = Annotated[str, Field(min_length=1, max_length=1024)]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- client -> server


class ProducerRef(_Frame):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    epoch: Annotated[int, Field(ge=0, le=2**53 - 1)]
    seq: Annotated[int, Field(ge=0, le=2**53 - 1)]


class Subscribe(_Frame):
    """Deliver ``stream`` from ``offset`` (``-1`` beginning, ``now`` tail, or an offset)."""

    op: Literal["subscribe"] = "subscribe"
    sub: Id
    stream: StreamName
    offset: Annotated[str, Field(min_length=1, max_length=256)] = "-1"


class Unsubscribe(_Frame):
    op: Literal["unsubscribe"] = "unsubscribe"
    sub: Id


class Append(_Frame):
    """Append to ``stream``; answered by ``Ack`` or ``Error`` with the same ``req``.

    ``data`` is a JSON value for JSON streams (an array appends its items, as
    over HTTP), a string for text streams; ``data_base64`` carries bytes.
    An empty append with ``close`` only closes the stream.
    """

    op: Literal["append"] = "append"
    req: Id
    stream: StreamName
    data: Any = None
    data_base64: str | None = None
    content_type: str | None = None
    close: bool = False
    stream_seq: str | None = None
    producer: ProducerRef | None = None


class SetPresence(_Frame):
    """Join (or update) this client's presence in the session ``stream``."""

    op: Literal["presence"] = "presence"
    stream: StreamName
    client_id: Id
    kind: Literal["user", "agent"] = "user"
    label: Annotated[str, Field(max_length=128)] = ""
    status: Annotated[str, Field(max_length=64)] = "idle"


class LeavePresence(_Frame):
    op: Literal["presence.leave"] = "presence.leave"
    stream: StreamName
    client_id: Id


class Ping(_Frame):
    op: Literal["ping"] = "ping"
    req: Id | None = None


class Auth(_Frame):
    """Replace the socket's token (same ``sub`` and ``kind``); answered by
    ``AuthOk`` or ``Error`` with the same ``req``. The old token stays in
    force until the new one is accepted."""

    op: Literal["auth"] = "auth"
    token: Annotated[str, Field(min_length=1, max_length=16384, repr=False)]
    req: Id | None = None


ClientFrame = Annotated[
    Subscribe | Unsubscribe | Append | SetPresence | LeavePresence | Ping | Auth,
    Field(discriminator="op"),
]
CLIENT_FRAME: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)


# ---------------------------------------------------------------- server -> client


class Subscribed(_Frame):
    type: Literal["subscribed"] = "subscribed"
    sub: str
    stream: str
    offset: str  # where delivery starts (``now`` and ``-1`` resolved)
    content_type: str
    incarnation: str | None = None  # as the Stream-Incarnation header over HTTP


class Data(_Frame):
    """A batch for subscription ``sub``; ``offset`` is where to resume after it.

    JSON streams carry ``messages``; text streams ``text``; others ``data_base64``.
    """

    type: Literal["data"] = "data"
    sub: str
    offset: str
    messages: list[Any] | None = None
    text: str | None = None
    data_base64: str | None = None
    up_to_date: bool = False
    closed: bool = False


class Ack(_Frame):
    type: Literal["ack"] = "ack"
    req: str
    offset: str
    duplicate: bool = False
    closed: bool = False
    producer_epoch: int | None = None
    producer_seq: int | None = None


class Error(_Frame):
    """A refused request (``req``) or an ended subscription (``sub``).

    ``status`` is the HTTP status the same request gets over HTTP; ``headers``
    the protocol headers it would carry (e.g. ``Producer-Expected-Seq``).
    """

    type: Literal["error"] = "error"
    status: int
    code: str
    message: str
    req: str | None = None
    sub: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class Member(_Frame):
    client_id: str
    kind: Literal["user", "agent"]
    label: str = ""
    status: str = "idle"


class Presence(_Frame):
    """A change in who is in the session ``stream``, with everyone present after it."""

    type: Literal["presence"] = "presence"
    stream: str
    event: Literal["snapshot", "join", "update", "leave"]
    member: Member | None = None
    members: list[Member] = Field(default_factory=list)


class Pong(_Frame):
    type: Literal["pong"] = "pong"
    req: str | None = None


class AuthOk(_Frame):
    """The token of an ``Auth`` frame is in force now, until ``expires_at`` (unix seconds)."""

    type: Literal["auth_ok"] = "auth_ok"
    req: str | None = None
    expires_at: float | None = None


ServerFrame = Annotated[
    Subscribed | Data | Ack | Error | Presence | Pong | AuthOk,
    Field(discriminator="type"),
]
SERVER_FRAME: TypeAdapter[ServerFrame] = TypeAdapter(ServerFrame)

ERROR_CODES: Final = {
    400: "bad_request",
    403: "stale_epoch",
    404: "not_found",
    409: "conflict",
    410: "gone",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}
