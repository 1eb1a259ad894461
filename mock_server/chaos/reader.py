"""A reference reader and writer of the Durable Streams protocol, for chaos runs.

Small, strict clients that do what every correct client must, and nothing
clever, so a chaos run can tell a server's faults from a client's bugs:

- :class:`ProtocolReader` follows a JSON stream from an offset to its end
  (the stream is closed), over SSE, over catch-up reads then long-poll, or
  over this project's WebSocket extension (``/v1/ws``). It
  keeps an event only once it knows the offset after it (an SSE ``data`` event
  counts when its ``control`` event arrives), so a cut anywhere never loses or
  repeats anything; it resumes from the last offset after any failure, honours
  ``Retry-After``, reports a ``410`` (offset no longer retained) as an explicit
  gap, and can drop events it has already seen by id.
- :class:`ProtocolWriter` appends JSON events as an idempotent producer
  (``Producer-Id``/``Epoch``/``Seq``) and retries each append with the same
  sequence number until it is acknowledged, so a lost response never
  duplicates an event.

Both use ``httpx``. Retries back off exponentially without jitter
(deterministic), capped by :class:`RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

import durable_client as sdk
from durable_client import wire as P

from .checker import Published, Seen, SubscriberHistory

__all__ = [
    "ProtocolReader",
    "ProtocolWriter",
    "ReaderGaveUp",
    "RetryPolicy",
    "WriterGaveUp",
    "event_id",
]

Transport = Literal["sse", "long-poll", "ws"]
WS_PATH = "/v1/ws"  # this project's WebSocket extension (docs/websocket.md)


class ReaderGaveUp(Exception):
    """The reader hit a refusal retrying cannot fix, or ran out of attempts."""


class WriterGaveUp(Exception):
    """An append was refused for good, or ran out of attempts."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff from ``initial`` to ``maximum`` seconds, reset after a
    success; ``Retry-After`` is honoured up to ``retry_after_cap``; after
    ``max_attempts`` failures in a row the client gives up. The SDK's reconnect
    engine runs it (``_reconnect_policy``), with no jitter so a seeded run replays."""

    initial: float = 0.005
    maximum: float = 0.25
    multiplier: float = 2.0
    retry_after_cap: float = 1.0
    max_attempts: int = 200


def event_id(message: Any) -> str:
    """An event's id: its ``"id"`` field, else its compact JSON."""
    if isinstance(message, dict) and "id" in message:
        return str(message["id"])
    return json.dumps(message, separators=(",", ":"), sort_keys=True)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def new_client(**options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` sharing one TLS context: loading the CA store
    costs about 40 ms, too much to pay for every client of a chaos run."""
    return httpx.AsyncClient(verify=_ssl_context(), **options)


def stream_url(base_url: str, path: str) -> str:
    return f"{base_url.rstrip('/')}{P.STREAM_PATH_PREFIX}{path.lstrip('/')}"


_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


async def _sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event type, data) per complete SSE event; an unterminated last event is dropped."""
    kind, data = "", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield kind or "message", "\n".join(data)
            kind, data = "", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


class ProtocolReader:
    """Follows the JSON stream at ``{base_url}/v1/stream/{path}`` until it is closed.

    After :meth:`run`, :attr:`seen` holds each event kept, with the offset the
    reader was at after it, and :meth:`history` gives it to the checker.
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        *,
        transport: Transport = "sse",
        name: str | None = None,
        offset: str = P.OFFSET_BEGINNING,
        dedupe: bool = True,
        idle_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = stream_url(base_url, path)
        self.stream = P.STREAM_PATH_PREFIX + path.lstrip("/")
        self.ws_url = "ws" + base_url.rstrip("/").removeprefix("http") + WS_PATH
        self.transport = transport
        self.name = name or f"{transport}-reader"
        self.offset = offset
        self.dedupe = dedupe
        self.idle_timeout = idle_timeout
        self.retry = retry or RetryPolicy()
        self._client = client
        self.seen: list[Seen] = []
        self.gaps: list[tuple[str, str]] = []
        self.closed = False
        self.requests = 0
        self.reconnects = 0
        self.duplicates_dropped = 0
        self.failures: Counter[str] = Counter()
        self._ids: set[str] = set()
        self._changed = asyncio.Event()

    def history(self) -> SubscriberHistory:
        return SubscriberHistory.model_construct(
            name=self.name, seen=list(self.seen), reported_gaps=list(self.gaps)
        )

    async def wait_seen(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` events were kept (or the stream closed)."""
        async with asyncio.timeout(timeout):
            while len(self.seen) < count and not self.closed:
                self._changed.clear()
                await self._changed.wait()

    async def run(self, timeout: float | None = 60.0) -> None:
        """Read until the stream is closed. Raises :class:`ReaderGaveUp`, ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            if self._client is not None:
                await self._loop(self._client)
            else:
                async with new_client() as client:
                    await self._loop(client)

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.idle_timeout, connect=self.idle_timeout)

    async def _loop(self, client: httpx.AsyncClient) -> None:
        retrying = _reconnect_policy(self.retry).retrying(retry_if=_retryable)
        catching_up = True
        try:
            async for attempt in retrying:
                with attempt:
                    while not self.closed:
                        before = self.offset
                        try:
                            self.requests += 1
                            if self.transport == "sse":
                                progressed = await self._sse(client)
                            elif self.transport == "ws":
                                progressed = await self._ws()
                            else:
                                progressed, catching_up = await self._poll(client, catching_up)
                        except _RETRYABLE as exc:
                            self.failures[_failure_name(exc)] += 1
                            self.reconnects += 1
                            if self.offset != before:
                                retrying.reset()  # it read something first: a new run of failures
                            raise
                        if progressed:
                            retrying.reset()
        except _RETRYABLE as exc:
            raise ReaderGaveUp(
                f"{self.name}: {retrying.failures - 1} failures in a row at {self.offset}"
            ) from exc

    def _status(self, response: httpx.Response) -> None:
        """Handle a refusal: retry, jump over a retention gap, or give up."""
        status = response.status_code
        if status == 410:
            self._gap(response.headers.get(P.STREAM_NEXT_OFFSET) or "")
            return
        if status in _RETRYABLE_STATUS:
            raise _Retry(f"http {status}", response.headers.get("Retry-After"))
        raise ReaderGaveUp(f"{self.name}: {status} {response.text.strip()[:200]}")

    def _keep(self, messages: list[Any], next_offset: str) -> None:
        for message in messages:
            identity = event_id(message)
            if self.dedupe and identity in self._ids:
                self.duplicates_dropped += 1
                continue
            self._ids.add(identity)
            # model_construct: no validation for data we just made (a run keeps many).
            self.seen.append(Seen.model_construct(id=identity, offset=next_offset))
        self.offset = next_offset
        self._changed.set()

    async def _sse(self, client: httpx.AsyncClient) -> bool:
        """One SSE response; True if it delivered anything."""
        params = {P.OFFSET_PARAM: self.offset, P.LIVE_PARAM: P.LIVE_SSE}
        progressed = False
        async with client.stream("GET", self.url, params=params, timeout=self._timeout()) as r:
            if r.status_code != 200:
                await r.aread()
                self._status(r)
                return r.status_code == 410
            pending: list[Any] = []
            async for kind, data in _sse_events(r):
                if kind == "data":
                    pending.extend(_messages(data))
                elif kind == "control":
                    control = _json(data)
                    if not isinstance(control, dict) or P.SSE_NEXT_OFFSET not in control:
                        raise _Garbled(f"control event without {P.SSE_NEXT_OFFSET}")
                    self._keep(pending, str(control[P.SSE_NEXT_OFFSET]))
                    pending = []
                    progressed = True
                    if control.get(P.SSE_CLOSED):
                        self.closed = True
                        self._changed.set()
                        return True
        # The server ended the response (it does so now and then): resume at once.
        return progressed

    async def _ws(self) -> bool:
        """One WebSocket connection with one subscription, until the stream ends
        (True) or the connection does (an exception)."""
        async with ws_connect(
            self.ws_url,
            open_timeout=self.idle_timeout,
            close_timeout=0.5,
            ping_interval=None,  # the read timeout below notices a silent peer
            max_size=None,
        ) as socket:
            subscribe = {
                "op": "subscribe",
                "sub": "r",
                "stream": self.stream,
                "offset": self.offset,
            }
            await socket.send(json.dumps(subscribe))
            while True:
                async with asyncio.timeout(self.idle_timeout):
                    raw = await socket.recv()
                frame = _json(raw)
                if not isinstance(frame, dict):
                    raise _Garbled("a WebSocket frame that is not an object")
                kind = frame.get("type")
                if kind == "data":
                    messages = frame.get("messages")
                    if not isinstance(messages, list) or "offset" not in frame:
                        raise _Garbled("a data frame without messages or offset")
                    self._keep(messages, str(frame["offset"]))
                    if frame.get("closed"):
                        self.closed = True
                        self._changed.set()
                        return True
                elif kind == "error":
                    status = int(frame.get("status", 0))
                    headers = frame.get("headers") or {}
                    if status == 410 and P.STREAM_NEXT_OFFSET in headers:
                        self._gap(str(headers[P.STREAM_NEXT_OFFSET]))
                        return True
                    if status in _RETRYABLE_STATUS:
                        raise _Retry(f"ws error {status}", None)
                    raise ReaderGaveUp(f"{self.name}: {status} {frame.get('message')}")

    def _gap(self, earliest: str) -> None:
        if earliest <= self.offset:
            raise ReaderGaveUp(f"{self.name}: 410 without a later retained offset")
        self.gaps.append((self.offset, earliest))
        self.offset = earliest

    async def _poll(self, client: httpx.AsyncClient, catching_up: bool) -> tuple[bool, bool]:
        """One catch-up or long-poll read; (delivered anything, still catching up)."""
        params = {P.OFFSET_PARAM: self.offset}
        if not catching_up:
            params[P.LIVE_PARAM] = P.LIVE_LONG_POLL
        r = await client.get(self.url, params=params, timeout=self._timeout())
        if r.status_code not in (200, 204):
            self._status(r)
            return r.status_code == 410, catching_up
        next_offset = r.headers.get(P.STREAM_NEXT_OFFSET)
        if next_offset is None:
            raise _Garbled(f"{r.status_code} without {P.STREAM_NEXT_OFFSET}")
        if r.status_code == 200:
            messages = _json(r.content)
            if not isinstance(messages, list):
                raise _Garbled("a JSON stream read that is not an array")
            self._keep(messages, next_offset)
        else:
            self.offset = next_offset
        if P.header_true(r.headers.get(P.STREAM_CLOSED)):
            self.closed = True
            self._changed.set()
        up_to_date = P.header_true(r.headers.get(P.STREAM_UP_TO_DATE))
        return True, catching_up and not up_to_date


def _reconnect_policy(retry: RetryPolicy) -> sdk.RetryPolicy:
    """``retry`` as the SDK's policy, whose engine runs the reader's reconnects:
    without jitter (a seeded run replays the same waits), ``max_attempts``
    counting the first attempt too, ``Retry-After`` a floor."""
    # The SDK refuses a zero delay; a microsecond is the same "at once".
    initial = max(retry.initial, 1e-6)
    return sdk.RetryPolicy(
        initial_delay=initial,
        max_delay=max(retry.maximum, initial),
        multiplier=max(retry.multiplier, 1.0),
        jitter=False,
        max_attempts=retry.max_attempts + 1,
        max_retry_after=retry.retry_after_cap,
    )


def _failure_name(exc: BaseException) -> str:
    if isinstance(exc, _Retry):
        return exc.reason
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd
        return f"ws close {frame.code}" if frame is not None else "ws close 1006"
    return type(exc).__name__


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = _seconds(retry_after)


def _seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` in seconds (``None`` if absent or not a number)."""
    try:
        return max(0.0, float(retry_after)) if retry_after is not None else None
    except ValueError:
        return None


class _Garbled(Exception):
    """The server sent something the protocol does not allow."""


#: What the reader retries: refusals that say "later", broken connections and
#: garbled answers (a fault, not the stream). Anything else ends the run.
_RETRYABLE = (
    _Retry,
    httpx.TransportError,
    httpx.StreamError,
    _Garbled,
    OSError,
    WebSocketException,
)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, _RETRYABLE)


def _json(data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise _Garbled(f"invalid JSON: {exc}") from None


def _messages(data: str) -> list[Any]:
    value = _json(data)
    return value if isinstance(value, list) else [value]


class ProtocolWriter:
    """Appends JSON events to ``{base_url}/v1/stream/{path}`` as an idempotent producer.

    :attr:`published` records every event with the offset it was acknowledged
    at (``acked=False`` if it never was).
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        *,
        producer_id: str = "chaos-writer",
        epoch: int = 0,
        request_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = stream_url(base_url, path)
        self.producer_id = producer_id
        self.epoch = epoch
        self.seq = 0
        self.request_timeout = request_timeout
        self.retry = retry or RetryPolicy()
        self._client = client
        self._own: httpx.AsyncClient | None = None
        self.published: list[Published] = []
        self.attempts = 0
        self.retries = 0
        self.duplicate_acks = 0  # 204: the server already had it (a lost response)
        self.failures: Counter[str] = Counter()

    async def __aenter__(self) -> ProtocolWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own is not None:
            await self._own.aclose()
            self._own = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is not None:
            return self._client
        if self._own is None:
            self._own = new_client()
        return self._own

    def _headers(self) -> dict[str, str]:
        return {
            "Content-Type": P.JSON_CONTENT_TYPE,
            P.PRODUCER_ID: self.producer_id,
            P.PRODUCER_EPOCH: str(self.epoch),
            P.PRODUCER_SEQ: str(self.seq),
        }

    async def _send(self, method: str, headers: dict[str, str], body: bytes) -> httpx.Response:
        """The request, retried on transport failures and retryable statuses by the
        same engine as the readers' reconnects (``max_attempts`` attempts in all)."""
        policy = dataclasses.replace(
            _reconnect_policy(self.retry), max_attempts=self.retry.max_attempts
        )
        retrying = policy.retrying(retry_if=_retryable, on_retry=self._count_retry)
        try:
            async for attempt in retrying:
                with attempt:
                    self.attempts += 1
                    try:
                        response = await self.client.request(
                            method,
                            self.url,
                            headers=headers,
                            content=body,
                            timeout=self.request_timeout,
                        )
                    except httpx.TransportError as exc:
                        self.failures[type(exc).__name__] += 1
                        raise
                    if response.status_code in _RETRYABLE_STATUS:
                        self.failures[f"http {response.status_code}"] += 1
                        raise _Retry(
                            f"http {response.status_code}", response.headers.get("Retry-After")
                        )
                    return response
        except _RETRYABLE as exc:
            raise WriterGaveUp(
                f"{method} {self.url}: {self.retry.max_attempts} attempts failed"
            ) from exc
        raise AssertionError("a retry loop ends with a result or an error")  # pragma: no cover

    def _count_retry(self, attempt: int, delay: float, error: BaseException) -> None:
        self.retries += 1

    async def create(self) -> None:
        """Create the stream (JSON); fine if it exists with the same configuration."""
        response = await self._send("PUT", {"Content-Type": P.JSON_CONTENT_TYPE}, b"")
        if response.status_code not in (200, 201):
            raise WriterGaveUp(f"create: {response.status_code} {response.text.strip()[:200]}")

    async def append(self, message: Any) -> str:
        """Append one event; returns the offset after it once acknowledged."""
        body = json.dumps(message, separators=(",", ":")).encode()
        identity = event_id(message)
        try:
            response = await self._send("POST", self._headers(), body)
        except WriterGaveUp:
            self.published.append(Published(id=identity, acked=False))
            raise
        if response.status_code not in (200, 204):
            self.published.append(Published(id=identity, acked=False))
            raise WriterGaveUp(f"append: {response.status_code} {response.text.strip()[:200]}")
        if response.status_code == 204:
            self.duplicate_acks += 1
        offset = response.headers.get(P.STREAM_NEXT_OFFSET)
        self.published.append(Published(id=identity, offset=offset))
        self.seq += 1
        return offset or ""

    async def close_stream(self) -> None:
        """Close the stream (idempotent: the producer's next sequence number)."""
        headers = {**self._headers(), P.STREAM_CLOSED: "true"}
        del headers["Content-Type"]
        response = await self._send("POST", headers, b"")
        if response.status_code not in (200, 204):
            raise WriterGaveUp(f"close: {response.status_code} {response.text.strip()[:200]}")
        self.seq += 1


def make_event(path: str, n: int, size: int = 60) -> dict[str, Any]:
    """Event ``n`` of a run on ``path``: an id and padding to about ``size`` bytes."""
    identity = f"{path}#{n:05d}"
    pad = max(0, size - len(identity) - 24)
    return {"id": identity, "n": n, "pad": "x" * pad}
