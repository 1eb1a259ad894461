"""The HTTP session transport: the Durable Streams protocol, SSE then long-poll.

:class:`HttpTransport` implements :class:`SessionTransport` on a
:class:`DurableStream`. It reads live with Server-Sent Events and, if the
server refuses SSE, with long-poll from then on. It retries nothing itself:
the session resumes and retries above it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Literal

import httpx

from . import _protocol as P
from ._auth import TokenProvider
from ._core.producer import ProducerStamp
from ._core.subscription import HttpReadState
from ._errors import BadRequest, UnexpectedStatus, UsageError
from ._results import AppendResult
from ._retry import RetryPolicy
from ._stream import DurableStream, DynamicValue, ReadBatch, session_stream
from ._transport import SessionDefaults, TransportBatch

__all__ = ["HttpLiveMode", "HttpTransport"]

#: How the HTTP transport reads live.
HttpLiveMode = Literal["sse", "long-poll"]


def _transport_batch(batch: ReadBatch) -> TransportBatch:
    return TransportBatch(
        batch.messages,
        batch.start_offset,
        batch.offset,
        batch.up_to_date,
        batch.closed,
        batch.incarnation,
    )


class HttpTransport:
    """:class:`SessionTransport` over the Durable Streams HTTP protocol.

    ``HttpTransport(live=..., headers=...)`` is settings a :class:`Session`
    binds to its stream; ``HttpTransport(stream)`` is bound to ``stream``.

    Args:
        stream: the stream to use (omit it to let a session make one).
        live: ``"sse"`` (default; falls back to long-poll for good if the server
            refuses SSE) or ``"long-poll"``.
        client: an ``httpx.AsyncClient`` for the requests (one is made if omitted).
        headers: extra headers on every request; values may be functions,
            called before each request (a token provider).
        params: extra query parameters on every request, likewise.
        retry: how single requests (create, tail) are retried (default: the
            session's policy).
        token: an access token for ``Authorization: Bearer`` on every request,
            or a :data:`~durable_client.streams.TokenProvider` (default: the
            session's).
    """

    def __init__(
        self,
        stream: DurableStream | None = None,
        *,
        live: HttpLiveMode = "sse",
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, DynamicValue] | None = None,
        params: Mapping[str, DynamicValue] | None = None,
        retry: RetryPolicy | None = None,
        token: str | TokenProvider | None = None,
    ) -> None:
        if live not in ("sse", "long-poll"):
            raise UsageError(f"live must be 'sse' or 'long-poll': {live!r}")
        if stream is not None and (client, headers, params, retry, token) != (None,) * 5:
            raise UsageError("give the stream its client, headers, retry policy and token")
        self._stream = stream
        self.live: HttpLiveMode = live
        self.client = client
        self.headers = dict(headers or {})
        self.params = dict(params or {})
        self.retry = retry
        self.token = token
        self._cursor: str | None = None
        if stream is not None and stream.content_type is None:
            stream.content_type = P.JSON_CONTENT_TYPE

    def bind(self, url: str, defaults: SessionDefaults) -> HttpTransport:
        """This transport for the stream at ``url`` (itself, if made for a stream)."""
        if self._stream is not None:
            return self
        stream = session_stream(self, url, defaults)
        return HttpTransport(stream, live=self.live)

    @property
    def stream(self) -> DurableStream:
        """The stream this transport reads and writes."""
        if self._stream is None:
            raise UsageError("this HttpTransport is settings: give it to a Session, or a stream")
        return self._stream

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
        # One connection's worth; which read comes next (SSE, or long-poll once
        # the server refused SSE) and what counts as no progress is decided by
        # the same HttpReadState that DurableStream.follow uses.
        stream = self.stream
        state = HttpReadState(
            offset, catch_up=False, live=self.live, fallback=True, cursor=self._cursor, url=self.url
        )
        while not state.done:
            read = state.next_read()
            if read.mode == "sse":
                try:
                    async with contextlib.aclosing(
                        stream.sse(read.offset, cursor=read.cursor)
                    ) as events:
                        async for batch in events:
                            state.batch_received(batch)
                            self._cursor = state.cursor
                            yield _transport_batch(batch)
                            if state.done:
                                return
                    return  # the server ended the connection; the session resumes
                except (BadRequest, UnexpectedStatus) as exc:
                    if not state.falls_back(exc):
                        raise
                    self.live = "long-poll"  # the server refuses SSE: long-poll from now on
                    continue
            batch = await stream.read(
                read.offset, live="long-poll", cursor=read.cursor, retry=False
            )
            if not state.batch_received(batch):
                state.next_read()  # raises: an answer with nothing new must not spin
            self._cursor = state.cursor
            yield _transport_batch(batch)

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        return await self.stream.send_batch(items, stamp=stamp, close=close)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
