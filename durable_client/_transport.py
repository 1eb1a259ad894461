"""The seam between sessions and the wire.

A :class:`Session` needs four things from a transport, and nothing more:

- ``tail()``: the current tail offset (to start a subscription "now");
- ``create()``: make sure the session's stream exists;
- ``subscribe(offset)``: *one* connection's worth of batches from ``offset``,
  each with its messages, the offset after them, and the up-to-date and
  closed flags. It raises from the error tree when the connection fails and
  simply ends when the server ends the connection; the session reconnects,
  resumes and deduplicates, so transports stay thin;
- ``send_batch(items, stamp=...)``: one append with producer headers,
  answering the offset it landed at (what :class:`IdempotentProducer` needs).

:class:`HttpTransport` implements it with the Durable Streams HTTP protocol
(SSE by default, long-poll as fallback). :class:`WebSocketTransport`
(``_ws``) implements it on one socket, and adds presence.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from . import _protocol as P
from ._errors import BadRequest, ConnectionLost, UnexpectedStatus
from ._producer import ProducerStamp
from ._stream import AppendResult, DurableStream, ReadBatch

__all__ = ["HttpTransport", "SessionTransport", "TransportBatch"]


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


def _transport_batch(batch: ReadBatch) -> TransportBatch:
    return TransportBatch(
        batch.messages,
        batch.start_offset,
        batch.offset,
        batch.up_to_date,
        batch.closed,
        batch.incarnation,
    )


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


class HttpTransport:
    """:class:`SessionTransport` over the Durable Streams HTTP protocol.

    ``live="sse"`` (default) tails with Server-Sent Events and falls back to
    long-poll for good if the server refuses SSE; ``live="long-poll"`` uses
    long-poll only.
    """

    def __init__(self, stream: DurableStream, *, live: Literal["sse", "long-poll"] = "sse") -> None:
        self.stream = stream
        self.live: Literal["sse", "long-poll"] = live
        self._cursor: str | None = None
        if stream.content_type is None:
            stream.content_type = P.JSON_CONTENT_TYPE

    @property
    def name(self) -> str:
        """How it reads live: ``sse`` or ``long-poll``."""
        return self.live

    @property
    def url(self) -> str:
        return self.stream.url

    async def create(self) -> bool:
        result = await self.stream.create(content_type=P.JSON_CONTENT_TYPE)
        return result.created

    async def tail(self) -> str:
        head = await self.stream.head()
        if head.offset is None:
            # A server that omits the tail on HEAD: a catch-up read at "now" gives it.
            batch = await self.stream.read(P.OFFSET_NOW)
            return batch.offset
        return head.offset

    async def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        if self.live == "sse":
            got_any = False
            try:
                async with contextlib.aclosing(
                    self.stream.sse(offset, cursor=self._cursor)
                ) as events:
                    async for batch in events:
                        got_any = True
                        self._cursor = batch.cursor or self._cursor
                        yield _transport_batch(batch)
                        if batch.closed:
                            return
                return
            except (BadRequest, UnexpectedStatus) as exc:
                if got_any or P.STREAM_INCARNATION.lower() in exc.headers:
                    # A refusal from the stream itself (a bad offset), not of SSE.
                    raise
                self.live = "long-poll"  # the server refuses SSE: long-poll from now on
        while True:
            batch = await self.stream.read(
                offset, live="long-poll", cursor=self._cursor, retry=False
            )
            if batch.status == 200 and batch.offset == offset and not batch.data:
                # An answer with nothing new would make us spin: let the session back off.
                raise ConnectionLost("long-poll answer made no progress", url=self.url)
            self._cursor = batch.cursor or self._cursor
            yield _transport_batch(batch)
            if batch.closed:
                return
            offset = batch.offset

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        return await self.stream.send_batch(items, stamp=stamp, close=close)

    async def aclose(self) -> None:
        await self.stream.aclose()
