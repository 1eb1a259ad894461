"""The seam between a session and the wire.

A :class:`Session` needs six things from a transport, and nothing more
(:class:`SessionTransport`):

- ``url``: the session stream's URL (for errors and offset-store keys);
- ``create()``: make sure the session's stream exists;
- ``tail()``: the current tail offset (to start a subscription "now");
- ``subscribe(offset)``: *one* connection's worth of batches from ``offset``
  (:class:`TransportBatch`: messages, the offset after them, the up-to-date
  and closed flags). It raises from the error tree when the connection fails
  and simply ends when the server ends it; the session reconnects, resumes
  and deduplicates, so transports stay thin;
- ``send_batch(items, stamp=...)``: one append with producer stamp, answering
  the offset it landed at (what :class:`IdempotentProducer` needs), no retry;
- ``aclose()``: release what the transport owns.

A transport may offer more, and the session uses it where it is there: a
``name`` (``Session.transport_name``), ``drop_connections()`` (cut its
connections as a network failure would) and presence
(:class:`PresenceTransport`).

Transports a user configures are not tied to a stream yet:
``HttpTransport(live="long-poll")`` is settings. Such an object is an
:class:`UnboundTransport`; the session calls its ``bind()`` once, with its
stream URL and its policies, and uses the :class:`SessionTransport` that comes
back. A transport made for one stream (``HttpTransport(stream)``, a test's
scripted transport) is used as it is.

The adapters: ``_http`` (HTTP: SSE, then long-poll), ``_ws`` (our WebSocket
extension, with presence), ``_auto`` (WebSocket where offered, else HTTP) and
``_memory`` (a log in this process, for tests).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ._auth import TokenProvider
from ._errors import PresenceUnavailable
from ._ws_frames import Member

if TYPE_CHECKING:
    from ._core.producer import ProducerStamp
    from ._results import AppendResult
    from ._retry import ReconnectPolicy, RetryPolicy

__all__ = [
    "PresenceChange",
    "PresenceTransport",
    "SessionDefaults",
    "SessionTransport",
    "TransportBatch",
    "UnboundTransport",
    "presence_unavailable",
]


@dataclass(frozen=True, slots=True)
class TransportBatch:
    """Messages read from ``start_offset`` up to ``offset`` (the next offset)."""

    messages: tuple[Any, ...]
    start_offset: str
    offset: str
    up_to_date: bool
    closed: bool
    #: The stream incarnation that served the batch, when the server says
    #: (``Stream-Incarnation``); the session checks it against its position.
    incarnation: str | None = None


@runtime_checkable
class SessionTransport(Protocol):
    """What a session needs from the wire (see the module docstring)."""

    @property
    def url(self) -> str:
        """The session stream's URL (for errors and offset-store keys)."""
        ...

    async def create(self) -> bool:
        """Create the stream if needed (JSON mode); True if it was created now."""
        ...

    async def tail(self) -> str:
        """The current tail offset."""
        ...

    def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        """One connection's batches from ``offset`` (see the module docstring)."""
        ...

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        """One append of ``items`` (JSON values as text) with ``stamp``; no retry."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections the transport owns)."""
        ...


@dataclass(frozen=True, slots=True)
class SessionDefaults:
    """What a session lends the transport it binds, for settings the transport
    left unset: its retry policy (single requests), its reconnect policy, its
    random source (jitter) and its access token (or token provider)."""

    retry: RetryPolicy
    reconnect: ReconnectPolicy
    rng: random.Random | None = None
    token: str | TokenProvider | None = None


@runtime_checkable
class UnboundTransport(Protocol):
    """Transport settings not yet tied to a stream; a session binds them to its own."""

    def bind(self, url: str, defaults: SessionDefaults) -> SessionTransport:
        """The transport for the stream at ``url``; ``defaults`` are the session's."""
        ...


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """Someone joined, changed status or left; ``members`` is everyone present after it."""

    event: Literal["join", "update", "leave"]
    member: Member
    members: tuple[Member, ...]


@runtime_checkable
class PresenceTransport(Protocol):
    """A transport that carries presence (the session asks it through this)."""

    @property
    def presence_available(self) -> bool | None:
        """True if it carries presence, False if not, None until it knows."""
        ...

    @property
    def members(self) -> tuple[Member, ...]:
        """Who is present, as last heard."""
        ...

    def presence_changes(self) -> AsyncIterator[PresenceChange]:
        """Every change from this call on (see ``Session.presence_changes``)."""
        ...

    async def set_presence(self, member: Member) -> None:
        """Join or update presence as ``member``, and wait until the server has it."""
        ...

    def want_presence(self, member: Member) -> None:
        """Set presence without waiting (best effort; kept across reconnects)."""
        ...


def presence_unavailable(url: str) -> PresenceUnavailable:
    """The error of asking a transport without presence (HTTP) for it."""
    return PresenceUnavailable(
        "presence needs the WebSocket transport; this session uses HTTP", url=url
    )
