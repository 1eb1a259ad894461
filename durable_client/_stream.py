"""The stream client: one Durable Streams stream over HTTP, async, on httpx.

:class:`DurableStream` speaks the protocol for one stream URL: create (PUT),
append and close (POST), read (GET: catch-up, long-poll, SSE), head (HEAD)
and delete (DELETE). Reads come back as :class:`ReadBatch` objects; a batch
always carries the offset to read next, so a reader can stop and resume
anywhere. :meth:`DurableStream.follow` is the resilient reader: it catches
up, tails live, reconnects from the last offset after any retryable failure,
and ends cleanly at ``Stream-Closed`` in every mode, with no further request.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import random
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

import httpx

from . import _protocol as P
from ._auth import TokenProvider, TokenSource, bearer
from ._core.producer import ProducerStamp
from ._core.subscription import HttpReadState
from ._errors import (
    BadRequest,
    ClientClosed,
    ConnectError,
    DurableError,
    OffsetGone,
    ProtocolViolation,
    RateLimited,
    ServerError,
    StreamNotFound,
    UnexpectedStatus,
    UsageError,
)
from ._http_errors import error_from_httpx, error_from_response
from ._results import AppendResult
from ._retry import OnRetry, ReconnectPolicy, RetryPolicy, retry_call
from ._sse import SSEDecoder

__all__ = [
    "AppendResult",
    "CloseResult",
    "CreateResult",
    "DurableStream",
    "HeadResult",
    "LiveMode",
    "ReadBatch",
]

#: A header or query value: a string, or a function evaluated before every
#: request (sync or async), e.g. to refresh a token without losing the stream.
DynamicValue: TypeAlias = str | Callable[[], str] | Callable[[], Awaitable[str]]

#: How :meth:`DurableStream.follow` reads once caught up. ``True`` means "auto".
LiveMode: TypeAlias = Literal["auto", "sse", "long-poll"] | bool

_DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=30.0, write=30.0, pool=30.0)


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """What one read returned: data up to ``offset``, plus the stream's state.

    Attributes:
        data: the bytes of the batch. For JSON streams, a JSON array of ``items``.
        items: the messages of a JSON stream, in order; ``None`` for other streams.
        start_offset: the offset this batch was read from.
        offset: the offset to read next (``Stream-Next-Offset`` / ``streamNextOffset``).
        up_to_date: the batch reached the tail as it was when served.
        closed: the stream is closed and this batch reached its end (EOF).
        cursor: the server's cursor, echoed on the next live request.
        status: the HTTP status of the response that carried the batch.
        incarnation: which incarnation of the stream answered
            (``Stream-Incarnation``; ``None`` if the server does not say).
    """

    data: bytes
    items: tuple[Any, ...] | None
    start_offset: str
    offset: str
    up_to_date: bool
    closed: bool
    cursor: str | None = None
    status: int = 200
    incarnation: str | None = None

    @property
    def messages(self) -> tuple[Any, ...]:
        """The JSON messages (empty for a non-JSON stream)."""
        return self.items or ()

    def text(self, encoding: str = "utf-8") -> str:
        """``data`` decoded as text."""
        return self.data.decode(encoding)


@dataclass(frozen=True, slots=True)
class CreateResult:
    """The answer to a create: ``created`` is false when an identical stream existed.

    A create whose first answer was lost is retried with the same
    ``Idempotency-Key``; a server that keeps the key (ours does) answers the
    retry as it answered the original, so ``created`` is true when this call's
    own request created the stream. A server that ignores the key answers 200
    to the retry: ``created`` is then false although this call may have
    created the stream (``retried`` says the answer came from a retry).
    """

    created: bool
    offset: str | None
    content_type: str | None
    closed: bool
    status: int
    incarnation: str | None = None
    retried: bool = False


@dataclass(frozen=True, slots=True)
class CloseResult:
    """The answer to a close: the stream's final offset."""

    final_offset: str | None
    status: int


@dataclass(frozen=True, slots=True)
class HeadResult:
    """Stream metadata from HEAD."""

    offset: str | None
    content_type: str | None
    closed: bool
    ttl_seconds: int | None
    expires_at: str | None
    status: int
    incarnation: str | None = None


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def _resolve(value: DynamicValue) -> str:
    if isinstance(value, str):
        return value
    result = value()
    if isinstance(result, str):
        return result
    return await result


def _plain_append_retryable(exc: BaseException) -> bool:
    """A plain append (no producer headers) is retried only when the failure shows
    that the server did not apply it: the connection was never made, or the
    server answered 429/5xx. A connection lost after sending is ambiguous."""
    return isinstance(exc, ConnectError | RateLimited | ServerError)


class DurableStream:
    """A client for one stream URL.

    Args:
        url: the stream's full URL, e.g. ``http://127.0.0.1:4437/v1/stream/chat``.
        client: an ``httpx.AsyncClient`` to use; one is created (and closed by
            :meth:`aclose`) if omitted.
        content_type: the stream's content type, if known (learned on create/head).
        headers: extra headers for every request; values may be functions
            evaluated per request (for tokens that refresh).
        params: extra query parameters for every request, likewise.
        retry: how single requests are retried (``None``: never).
        reconnect: how :meth:`follow` reconnects (default: forever, capped backoff).
        timeout: the httpx timeout of ordinary requests.
        live_timeout: the read timeout of long-poll and SSE requests, in seconds;
            longer than the server's long-poll / keep-alive interval.
        rng: random source for jitter (tests pass a seeded one).
        token: an access token sent as ``Authorization: Bearer`` on every
            request, or a :data:`TokenProvider` (refreshed at 80% of each
            token's lifetime; a 401 fetches a fresh one and retries once).
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        content_type: str | None = None,
        headers: Mapping[str, DynamicValue] | None = None,
        params: Mapping[str, DynamicValue] | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen dataclass
        reconnect: RetryPolicy | None = None,
        timeout: httpx.Timeout | float | None = None,
        live_timeout: float = 90.0,
        rng: random.Random | None = None,
        token: str | TokenProvider | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"stream URL must be http(s): {url!r}")
        if token is not None and any(k.lower() == "authorization" for k in headers or {}):
            raise UsageError("give a token or an Authorization header, not both", url=url)
        self._token = TokenSource.of(token)
        self.url = url
        self.content_type = content_type
        self._headers: dict[str, DynamicValue] = dict(headers or {})
        self._params: dict[str, DynamicValue] = dict(params or {})
        self.retry = retry
        self.reconnect = reconnect or ReconnectPolicy()
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=_DEFAULT_TIMEOUT)
        if timeout is None:
            self._timeout = _DEFAULT_TIMEOUT
        elif isinstance(timeout, httpx.Timeout):
            self._timeout = timeout
        else:
            self._timeout = httpx.Timeout(timeout)
        self.live_timeout = live_timeout
        self._rng = rng
        self._closed = False

    # --- lifecycle -----------------------------------------------------------

    async def aclose(self) -> None:
        """Release the HTTP client if this object created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> DurableStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<DurableStream {self.url}>"

    # --- request plumbing ----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this DurableStream was closed", url=self.url)

    async def _build_headers(
        self, extra: Mapping[str, str] | None, token: str | None = None
    ) -> dict[str, str]:
        headers = {name: await _resolve(value) for name, value in self._headers.items()}
        if extra:
            headers.update(extra)
        if token is not None:
            headers["authorization"] = bearer(token)
        return headers

    def _retry_unauthorized(self, response: httpx.Response, token: str | None) -> bool:
        """Whether a 401 to a request sent with ``token`` is worth one retry with a
        fresh token (the token is then marked stale)."""
        if response.status_code != 401 or token is None or self._token is None:
            return False
        if not self._token.refreshes:
            return False
        self._token.invalidate(token)
        return True

    async def _build_params(self, extra: Mapping[str, str] | None) -> httpx.QueryParams:
        params = {name: await _resolve(value) for name, value in self._params.items()}
        if extra:
            params.update(extra)
        # The protocol asks clients to sort query parameters (better CDN hit rates).
        return httpx.QueryParams(sorted(params.items()))

    async def _send(
        self,
        method: str,
        *,
        operation: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        timeout: httpx.Timeout | None = None,
        ok: Sequence[int] = (200, 201, 204),
    ) -> httpx.Response:
        """One request, answered in full; non-``ok`` statuses raise from the tree.

        With a token provider, a 401 is retried once with a fresh token."""
        self._check_open()
        for attempt in (1, 2):
            token = await self._token.get() if self._token is not None else None
            request = self._client.build_request(
                method,
                self.url,
                params=await self._build_params(params),
                headers=await self._build_headers(headers, token),
                content=content,
                timeout=timeout or self._timeout,
            )
            try:
                response = await self._client.send(request)
            except httpx.HTTPError as exc:
                raise error_from_httpx(exc, url=self.url, operation=operation) from exc
            if attempt == 1 and self._retry_unauthorized(response, token):
                continue
            break
        if response.status_code not in ok:
            raise error_from_response(
                response, url=self.url, operation=operation, body=_safe_text(response)
            )
        return response

    async def _with_retry(
        self,
        fn: Callable[[], Awaitable[Any]],
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
        on_retry: OnRetry | None = None,
    ) -> Any:
        if self.retry is None:
            return await fn()
        return await retry_call(fn, self.retry, rng=self._rng, on_retry=on_retry, retry_if=retry_if)

    # --- create / head / delete ----------------------------------------------

    async def create(
        self,
        *,
        content_type: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: str | None = None,
        closed: bool = False,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> CreateResult:
        """Create the stream (PUT); idempotent when the configuration matches.

        Raises :class:`StreamConflict` if it exists with another configuration.
        """
        if ttl_seconds is not None and expires_at is not None:
            raise UsageError("give ttl_seconds or expires_at, not both", url=self.url)
        if ttl_seconds is not None and ttl_seconds < 0:
            raise UsageError("ttl_seconds must be >= 0", url=self.url)
        ctype = content_type or self.content_type or P.DEFAULT_CONTENT_TYPE
        req_headers: dict[str, str] = {"content-type": ctype}
        if ttl_seconds is not None:
            req_headers[P.STREAM_TTL] = str(int(ttl_seconds))
        if expires_at is not None:
            req_headers[P.STREAM_EXPIRES_AT] = expires_at
        if closed:
            req_headers[P.STREAM_CLOSED] = "true"
        # One key for every attempt of this call: a retry is the same request.
        req_headers[P.IDEMPOTENCY_KEY] = uuid.uuid4().hex
        if headers:
            req_headers.update(headers)
        body = data.encode("utf-8") if isinstance(data, str) else data
        attempts = 0

        async def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return await self._send(
                "PUT", operation="create", headers=req_headers, content=body, ok=(200, 201)
            )

        response: httpx.Response = await self._with_retry(attempt)
        self.content_type = response.headers.get("content-type") or ctype
        return CreateResult(
            created=response.status_code == 201,
            offset=response.headers.get(P.STREAM_NEXT_OFFSET),
            content_type=self.content_type,
            closed=P.header_true(response.headers.get(P.STREAM_CLOSED)),
            status=response.status_code,
            incarnation=response.headers.get(P.STREAM_INCARNATION),
            retried=attempts > 1,
        )

    async def head(self, *, headers: Mapping[str, str] | None = None) -> HeadResult:
        """The stream's metadata (tail offset, content type, closed, TTL).

        Raises :class:`StreamNotFound` if there is no such stream.
        """

        async def attempt() -> httpx.Response:
            return await self._send("HEAD", operation="head", headers=headers, ok=(200,))

        response: httpx.Response = await self._with_retry(attempt)
        ctype = response.headers.get("content-type")
        if ctype:
            self.content_type = ctype
        return HeadResult(
            offset=response.headers.get(P.STREAM_NEXT_OFFSET),
            content_type=ctype,
            closed=P.header_true(response.headers.get(P.STREAM_CLOSED)),
            ttl_seconds=_int_or_none(response.headers.get(P.STREAM_TTL)),
            expires_at=response.headers.get(P.STREAM_EXPIRES_AT),
            status=response.status_code,
            incarnation=response.headers.get(P.STREAM_INCARNATION),
        )

    async def exists(self) -> bool:
        """Whether the stream exists (HEAD; ``False`` on 404)."""
        try:
            await self.head()
        except StreamNotFound:
            return False
        return True

    async def delete(self, *, headers: Mapping[str, str] | None = None) -> None:
        """Delete the stream. Raises :class:`StreamNotFound` if it does not exist."""

        async def attempt() -> httpx.Response:
            return await self._send(
                "DELETE", operation="delete", headers=headers, ok=(200, 202, 204)
            )

        await self._with_retry(attempt, retry_if=_plain_append_retryable)

    # --- append / close ------------------------------------------------------

    def _encode_body(self, data: bytes | str) -> bytes:
        return data.encode("utf-8") if isinstance(data, str) else bytes(data)

    async def append(
        self,
        data: bytes | str,
        *,
        seq: str | None = None,
        close: bool = False,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AppendResult:
        """Append raw bytes (a JSON stream expects a JSON value or array as text).

        ``seq`` sets ``Stream-Seq`` (must increase; else :class:`SequenceConflict`).
        ``close=True`` appends and closes the stream in one step.

        Plain appends are retried only when the failure proves nothing was
        written (connect error, 429, 5xx); use :class:`IdempotentProducer` for
        retries that can never duplicate. Raises :class:`StreamClosed` if the
        stream is closed.
        """
        body = self._encode_body(data)
        if not body and not close:
            raise UsageError("cannot append an empty body", url=self.url)
        req_headers = {"content-type": content_type or self.content_type or P.DEFAULT_CONTENT_TYPE}
        if seq is not None:
            req_headers[P.STREAM_SEQ] = seq
        if close:
            req_headers[P.STREAM_CLOSED] = "true"
        if headers:
            req_headers.update(headers)

        async def attempt() -> AppendResult:
            return await self.append_raw(body, headers=req_headers)

        result: AppendResult = await self._with_retry(attempt, retry_if=_plain_append_retryable)
        return result

    async def append_json(
        self, *values: Any, seq: str | None = None, close: bool = False
    ) -> AppendResult:
        """Append each value as one JSON message (one request, one batch)."""
        if not values:
            raise UsageError("append_json needs at least one value", url=self.url)
        body = _json_array(values)
        return await self.append(body, seq=seq, close=close, content_type=P.JSON_CONTENT_TYPE)

    async def append_raw(
        self, body: bytes, *, headers: Mapping[str, str], operation: str = "append"
    ) -> AppendResult:
        """One POST with exactly these headers, no retry. The building block of
        producers and transports; most callers want :meth:`append`."""
        response = await self._send(
            "POST", operation=operation, headers=headers, content=body, ok=(200, 204)
        )
        h = response.headers
        return AppendResult(
            offset=h.get(P.STREAM_NEXT_OFFSET),
            closed=P.header_true(h.get(P.STREAM_CLOSED)),
            duplicate=response.status_code == 204
            and any(k.lower() == P.PRODUCER_ID.lower() for k in headers),
            status=response.status_code,
            producer_epoch=_int_or_none(h.get(P.PRODUCER_EPOCH)),
            producer_seq=_int_or_none(h.get(P.PRODUCER_SEQ)),
        )

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        """Send ``items`` as one append request, no retry (the producer's building block).

        For a JSON stream each item is one JSON value (as text) and the request
        body is their array; for other streams the items are concatenated.
        """
        json_mode = await self._is_json()
        body = b"".join(items)
        if json_mode and items:
            body = b"[" + b",".join(items) + b"]"
        req_headers: dict[str, str] = {}
        if body:
            req_headers["content-type"] = self.content_type or P.DEFAULT_CONTENT_TYPE
        if stamp is not None:
            req_headers.update(stamp.headers())
        if close:
            req_headers[P.STREAM_CLOSED] = "true"
        return await self.append_raw(
            body, headers=req_headers, operation="close" if close and not body else "append"
        )

    async def close(
        self, data: bytes | str | None = None, *, content_type: str | None = None
    ) -> CloseResult:
        """Close the stream, optionally appending ``data`` first in the same step.

        Closing a closed stream without data succeeds (idempotent). Raises
        :class:`StreamClosed` when ``data`` is given and the stream is already closed.
        """
        body = self._encode_body(data) if data is not None else b""
        req_headers: dict[str, str] = {P.STREAM_CLOSED: "true"}
        if body:
            req_headers["content-type"] = (
                content_type or self.content_type or P.DEFAULT_CONTENT_TYPE
            )

        async def attempt() -> CloseResult:
            response = await self._send(
                "POST", operation="close", headers=req_headers, content=body, ok=(200, 204)
            )
            return CloseResult(
                final_offset=response.headers.get(P.STREAM_NEXT_OFFSET),
                status=response.status_code,
            )

        result: CloseResult = await self._with_retry(
            attempt, retry_if=None if not body else _plain_append_retryable
        )
        return result

    # --- reads ---------------------------------------------------------------

    def _live_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            self._timeout.connect,
            read=self.live_timeout,
            write=self._timeout.write,
            pool=self._timeout.pool,
        )

    async def _is_json(self) -> bool:
        if self.content_type is None:
            await self.head()
        return P.is_json(self.content_type)

    def _batch_from_response(self, response: httpx.Response, start: str) -> ReadBatch:
        h = response.headers
        next_offset = h.get(P.STREAM_NEXT_OFFSET)
        if next_offset is None:
            raise ProtocolViolation(
                "read response has no Stream-Next-Offset", url=self.url, status=response.status_code
            )
        ctype = h.get("content-type")
        if ctype and response.status_code == 200:
            self.content_type = ctype
        data = response.content if response.status_code == 200 else b""
        items: tuple[Any, ...] | None = None
        if P.is_json(self.content_type):
            items = _parse_json_array(data, url=self.url) if data.strip() else ()
        return ReadBatch(
            data=data,
            items=items,
            start_offset=start,
            offset=next_offset,
            up_to_date=P.header_true(h.get(P.STREAM_UP_TO_DATE)),
            closed=P.header_true(h.get(P.STREAM_CLOSED)),
            cursor=h.get(P.STREAM_CURSOR),
            status=response.status_code,
            incarnation=h.get(P.STREAM_INCARNATION),
        )

    async def _read_once(
        self,
        offset: str,
        *,
        live: Literal[False, "long-poll"] = False,
        cursor: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ReadBatch:
        params: dict[str, str] = {P.OFFSET_PARAM: offset}
        timeout = None
        if live == "long-poll":
            params[P.LIVE_PARAM] = P.LIVE_LONG_POLL
            if cursor is not None:
                params[P.CURSOR_PARAM] = cursor
            timeout = self._live_timeout()
        response = await self._send(
            "GET", operation="read", params=params, headers=headers, timeout=timeout, ok=(200, 204)
        )
        return self._batch_from_response(response, offset)

    async def read(
        self,
        offset: str = P.OFFSET_BEGINNING,
        *,
        live: Literal[False, "long-poll"] = False,
        cursor: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> ReadBatch:
        """One read (retried per the retry policy unless ``retry=False``):
        catch-up, or one long-poll.

        A catch-up read returns data from ``offset`` up to a server-chosen size;
        check ``up_to_date`` and read again from ``batch.offset`` for more. A
        long-poll waits for data (status 204 and no data on timeout).
        Raises :class:`OffsetGone` for an offset that is no longer retained.
        """

        async def attempt() -> ReadBatch:
            return await self._read_once(offset, live=live, cursor=cursor, headers=headers)

        if not retry:
            return await attempt()
        result: ReadBatch = await self._with_retry(attempt)
        return result

    async def sse(
        self,
        offset: str,
        *,
        cursor: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[ReadBatch, None]:
        """One SSE connection, no retry: a batch per control event, until the
        server ends the response. The last batch has ``closed=True`` if the
        stream closed; a response that simply ends means "reconnect from the
        last offset". Data not yet confirmed by a control event is dropped if
        the connection breaks, so nothing is delivered twice on resume.
        """
        self._check_open()
        is_json = await self._is_json()
        params: dict[str, str] = {P.OFFSET_PARAM: offset, P.LIVE_PARAM: P.LIVE_SSE}
        if cursor is not None:
            params[P.CURSOR_PARAM] = cursor
        timeout = self._live_timeout()
        for attempt in (1, 2):
            # The token travels in the header: the access_token query parameter
            # is only for browsers' EventSource, which cannot set one.
            token = await self._token.get() if self._token is not None else None
            request = self._client.build_request(
                "GET",
                self.url,
                params=await self._build_params(params),
                headers=await self._build_headers(
                    {"accept": "text/event-stream", **(headers or {})}, token
                ),
                timeout=timeout,
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise error_from_httpx(exc, url=self.url, operation="read (sse)") from exc
            if attempt == 1 and self._retry_unauthorized(response, token):
                await response.aclose()
                continue
            break
        try:
            if response.status_code != 200:
                try:
                    await response.aread()
                except httpx.HTTPError as exc:
                    raise error_from_httpx(exc, url=self.url, operation="read (sse)") from exc
                raise error_from_response(
                    response, url=self.url, operation="read (sse)", body=_safe_text(response)
                )
            ctype = P.media_type(response.headers.get("content-type"))
            if ctype != "text/event-stream":
                raise UnexpectedStatus(
                    f"read (sse) failed: expected text/event-stream, got {ctype or 'nothing'}",
                    url=self.url,
                    status=response.status_code,
                )
            use_base64 = (
                response.headers.get(P.STREAM_SSE_DATA_ENCODING, "").strip().lower() == "base64"
            )
            reader = _SSEBatchReader(
                start=offset,
                is_json=is_json,
                base64_data=use_base64,
                url=self.url,
                incarnation=response.headers.get(P.STREAM_INCARNATION),
            )
            decoder = SSEDecoder()
            try:
                async for chunk in response.aiter_raw():
                    try:
                        events = decoder.feed(chunk)
                    except UnicodeDecodeError as exc:
                        raise ProtocolViolation(
                            "SSE stream is not valid UTF-8", url=self.url
                        ) from exc
                    for event in events:
                        batch = reader.on_event(event.event, event.data)
                        if batch is not None:
                            yield batch
                            if batch.closed:
                                return
            except httpx.HTTPError as exc:
                raise error_from_httpx(exc, url=self.url, operation="read (sse)") from exc
        finally:
            await response.aclose()

    async def follow(
        self,
        offset: str = P.OFFSET_BEGINNING,
        *,
        live: LiveMode = "auto",
        reconnect: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[ReadBatch]:
        """Read from ``offset`` on, reconnecting as needed; yields batches.

        ``live``:
            ``False``: catch up, stop at the tail (``up_to_date``).
            ``"auto"`` / ``True``: catch up with plain reads, then tail with SSE,
            falling back to long-poll if the server refuses SSE.
            ``"sse"`` / ``"long-poll"``: that mode from the start.

        Retryable failures reconnect from the last offset after a backoff
        (``reconnect`` policy; by default the stream's ``reconnect`` policy for
        live reads and its ``retry`` policy for ``live=False``;
        ``on_retry(attempt, delay, error)`` is told). A long-poll answer that
        makes no progress, and an SSE response that ends before any event,
        count as such failures (``_core.subscription.HttpReadState`` decides).
        The iteration ends after the batch with ``closed=True``: no request is
        made after the stream is known to be closed. Fatal errors raise,
        :class:`OffsetGone` among them. Use ``contextlib.aclosing`` to release
        the connection if you stop early.
        """
        if live is True:
            live = "auto"
        if reconnect is not None:
            policy = reconnect
        elif live is False:
            # A finite read: give up as a single request would.
            policy = self.retry or RetryPolicy(max_attempts=1)
        else:
            policy = self.reconnect
        state = HttpReadState(
            offset,
            catch_up=live in (False, "auto"),
            live=None if live is False else ("long-poll" if live == "long-poll" else "sse"),
            fallback=live == "auto",
            max_no_progress=getattr(policy, "max_no_progress", None),
            url=self.url,
        )
        retrying = policy.retrying(rng=self._rng, on_retry=on_retry)
        async for attempt in retrying:
            with attempt, _bounded(state):
                while not state.done:
                    read = state.next_read()
                    if read.mode != "sse":
                        try:
                            batch = await self._read_once(
                                read.offset,
                                live="long-poll" if read.mode == "long-poll" else False,
                                cursor=read.cursor if read.mode == "long-poll" else None,
                                headers=headers,
                            )
                        except OffsetGone as exc:
                            if not state.from_earliest(exc):  # a trimmed beginning
                                raise
                            continue
                        if state.batch_received(batch):
                            retrying.reset()
                        yield batch
                        continue
                    try:
                        # aclosing: the connection is released even if our
                        # consumer stops in the middle of it.
                        async with contextlib.aclosing(
                            self.sse(read.offset, cursor=read.cursor, headers=headers)
                        ) as events:
                            async for batch in events:
                                if state.batch_received(batch):
                                    retrying.reset()
                                yield batch
                                if state.done:
                                    return
                    except (BadRequest, UnexpectedStatus) as exc:
                        if not state.falls_back(exc):
                            raise
                        continue
                    except OffsetGone as exc:
                        if not state.from_earliest(exc):  # a trimmed beginning
                            raise
                        continue
                    # A clean end (servers recycle SSE connections): again at once.
                    state.connection_ended()


@contextlib.contextmanager
def _bounded(state: HttpReadState) -> Iterator[None]:
    """A failed read raises what ``state`` makes of it (:class:`NoProgress`
    once the reader is stuck at one offset), chained to the failure."""
    try:
        yield
    except DurableError as exc:
        error = state.failure(exc)
        if error is not exc:
            raise error from exc
        raise


class StreamSettings(Protocol):
    """The HTTP settings a transport keeps for the session stream it will make."""

    client: httpx.AsyncClient | None
    headers: dict[str, DynamicValue]
    params: dict[str, DynamicValue]
    retry: RetryPolicy | None
    token: str | TokenProvider | None


class SessionPolicies(Protocol):
    """A session's policies, lent to the stream its transport makes."""

    @property
    def retry(self) -> RetryPolicy: ...
    @property
    def reconnect(self) -> ReconnectPolicy: ...
    @property
    def rng(self) -> random.Random | None: ...
    @property
    def token(self) -> str | TokenProvider | None: ...


def session_stream(settings: StreamSettings, url: str, session: SessionPolicies) -> DurableStream:
    """The JSON-mode stream a transport reads and writes for a session at ``url``
    (the session's retry policy stands in where the transport set none)."""
    return DurableStream(
        url,
        client=settings.client,
        content_type=P.JSON_CONTENT_TYPE,
        headers=settings.headers,
        params=settings.params,
        retry=settings.retry or session.retry,
        reconnect=session.reconnect,
        rng=session.rng,
        token=settings.token if settings.token is not None else session.token,
    )


class _SSEBatchReader:
    """Groups SSE events into batches: data events wait for their control event."""

    def __init__(
        self, *, start: str, is_json: bool, base64_data: bool, url: str, incarnation: str | None
    ) -> None:
        self.offset = start
        self.incarnation = incarnation
        self.is_json = is_json
        self.base64_data = base64_data
        self.url = url
        self._chunks: list[bytes] = []
        self._items: list[Any] = []

    def on_event(self, event: str, data: str) -> ReadBatch | None:
        if event == "data":
            self._on_data(data)
            return None
        if event == "control":
            return self._on_control(data)
        # Unknown event types are ignored (forward compatibility).
        return None

    def _on_data(self, data: str) -> None:
        if self.base64_data:
            text = data.replace("\r", "").replace("\n", "")
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ProtocolViolation("SSE data is not valid base64", url=self.url) from exc
            self._chunks.append(raw)
            return
        raw = data.encode("utf-8")
        if self.is_json:
            if not data.strip():
                return
            try:
                value = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ProtocolViolation("SSE data is not valid JSON", url=self.url) from exc
            if not isinstance(value, list):
                raise ProtocolViolation("SSE data of a JSON stream is not an array", url=self.url)
            self._items.extend(value)
        else:
            self._chunks.append(raw)

    def _on_control(self, data: str) -> ReadBatch:
        try:
            control = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ProtocolViolation(
                f"SSE control event is not valid JSON: {data[:80]!r}", url=self.url
            ) from exc
        if not isinstance(control, dict):
            raise ProtocolViolation("SSE control event is not a JSON object", url=self.url)
        next_offset = control.get(P.SSE_NEXT_OFFSET)
        if not isinstance(next_offset, str) or not next_offset:
            raise ProtocolViolation("SSE control event has no streamNextOffset", url=self.url)
        closed = control.get(P.SSE_CLOSED) is True
        up_to_date = control.get(P.SSE_UP_TO_DATE) is True or closed
        cursor = control.get(P.SSE_CURSOR)
        items: tuple[Any, ...] | None = None
        if self.is_json:
            items = tuple(self._items)
            data_bytes = _json_array(items) if items else b""
        else:
            data_bytes = b"".join(self._chunks)
        batch = ReadBatch(
            data=data_bytes,
            items=items,
            start_offset=self.offset,
            offset=next_offset,
            up_to_date=up_to_date,
            closed=closed,
            cursor=cursor if isinstance(cursor, str) else None,
            status=200,
            incarnation=self.incarnation,
        )
        self.offset = next_offset
        self._chunks = []
        self._items = []
        return batch


def _json_array(values: Sequence[Any]) -> bytes:
    """``values`` as one JSON array (each element one message)."""
    try:
        return json.dumps(list(values), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"value is not JSON-serializable: {exc}") from exc


def _parse_json_array(data: bytes, *, url: str) -> tuple[Any, ...]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolViolation("read body is not valid JSON", url=url) from exc
    if not isinstance(value, list):
        raise ProtocolViolation("read body of a JSON stream is not an array", url=url)
    return tuple(value)


def _safe_text(response: httpx.Response) -> str:
    try:
        return response.text
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return ""
