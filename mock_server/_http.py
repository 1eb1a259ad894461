"""The HTTP front end: Durable Streams over a plain ASGI application.

Routes:
- ``{base}/v1/stream/{path}``: PUT create, POST append/close, GET read
  (catch-up, ``live=long-poll``, ``live=sse``), HEAD, DELETE. The protocol
  reserves ``/v1/stream/__ds`` and below for its subscription API: 400.
- ``OPTIONS`` anywhere: CORS preflight.
- ``GET /health``: liveness, as JSON.

Every response carries the CORS and browser-hardening headers, and one about
an existing stream its ``Stream-Incarnation``. Refusals are ``text/plain``
with a one-line message; nothing is written for them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote_to_bytes, urlencode, urlsplit

from durable_client import wire as P
from durable_client.wire import WS_PATH

from ._asgi import App, Message, Receive, Scope, Send
from ._auth import AuthError, bearer, event_items, forbidden, stream_name, unauthorized
from ._model import Record, StreamState, parse_rfc3339
from ._store import (
    AppendRequest,
    AppendResult,
    CreateRequest,
    Producer,
    ProtocolError,
    ReadResult,
    StreamStore,
    check_not_reserved,
)

if TYPE_CHECKING:
    from ._auth import Authority, Grant

log = logging.getLogger("mock_server")

ACCESS_TOKEN_PARAM = "access_token"
_ACCESS_TOKEN_RE = re.compile(r"(^|&)access_token=[^&]*")
# The __ds routes that take the subscription API's own bearer tokens, scoped to one
# subscription and issued by this server (docs/subscriptions.md), not access tokens.
_SUBSCRIPTION_TOKEN_ROUTE = re.compile(
    "^"
    + re.escape(P.STREAM_PATH_PREFIX + P.RESERVED_PREFIX)
    + r"/subscriptions/[^/]+/(callback|ack|release)$"
)

_TTL_RE = re.compile(r"^(0|[1-9]\d{0,11})$")
_INT_RE = re.compile(r"^(0|[1-9]\d{0,15})$")
# Parameters may hold visible ASCII, tab and obs-text, never a control character:
# the value is echoed in every response's Content-Type.
_CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9][\w.+-]*/[\w.+-]+(\s*;[\t\x20-\x7e\x80-\xff]*)?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-_~%]*(\[[0-9A-Fa-f:.]+\])?(:\d{1,5})?$")
# What a Location header's path keeps as is; everything else (non-ASCII) is percent-encoded.
_PATH_SAFE = "/!$&'()*+,;=:@-._~"

_MAX_IDEMPOTENCY_KEY = 256

_CURSOR_EPOCH = 1728432000.0  # 2024-10-09T00:00:00Z
_CURSOR_INTERVAL = 20

_EXPOSED = ", ".join(
    [
        P.STREAM_NEXT_OFFSET,
        P.STREAM_CURSOR,
        P.STREAM_UP_TO_DATE,
        P.STREAM_CLOSED,
        P.STREAM_TTL,
        P.STREAM_EXPIRES_AT,
        P.STREAM_SSE_DATA_ENCODING,
        P.STREAM_INCARNATION,
        P.PRODUCER_EPOCH,
        P.PRODUCER_SEQ,
        P.PRODUCER_EXPECTED_SEQ,
        P.PRODUCER_RECEIVED_SEQ,
        "ETag",
        "Content-Type",
        "Location",
        "Retry-After",
    ]
)
_ALLOWED = ", ".join(
    [
        "Content-Type",
        "Authorization",
        "If-None-Match",
        "Last-Event-ID",
        P.STREAM_SEQ,
        P.STREAM_TTL,
        P.STREAM_EXPIRES_AT,
        P.STREAM_CLOSED,
        P.STREAM_FORKED_FROM,
        P.STREAM_FORK_OFFSET,
        P.STREAM_FORK_SUB_OFFSET,
        P.PRODUCER_ID,
        P.PRODUCER_EPOCH,
        P.PRODUCER_SEQ,
        P.IDEMPOTENCY_KEY,
    ]
)
_COMMON_HEADERS: list[tuple[bytes, bytes]] = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, HEAD, OPTIONS"),
    (b"access-control-allow-headers", _ALLOWED.encode()),
    (b"access-control-expose-headers", _EXPOSED.encode()),
    (b"access-control-max-age", b"600"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
]

CACHEABLE = "public, max-age=60, stale-while-revalidate=300"


SLOW_READER_TIMEOUT = 10.0
"""Seconds a response may go without its reader taking a byte before the connection
is aborted (``_http_protocol``), when neither the config nor the WebSocket endpoint
says otherwise."""

SLOW_READER_STATE = "mock_server.slow_reader_timeout"
"""The lifespan-state key that tells the HTTP protocol the slow-reader timeout."""

SSE_SEND_BYTES = 64 * 1024
"""What one ``send`` of an SSE response carries, about: events are cut to
``SSE_TEXT_PIECE``/``SSE_BINARY_PIECE`` bytes of payload and grouped up to this."""

SSE_TEXT_PIECE = 16 * 1024
"""Text payload bytes per ``data`` event: at most 96 KiB on the wire (every byte a
line break, each its own ``data:`` line), usually about as many bytes as it carries."""

SSE_BINARY_PIECE = 48 * 1024
"""Binary payload bytes per ``data`` event: 64 KiB of base64."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Tunables of the HTTP front end.

    ``slow_reader_timeout``: a response whose reader takes no byte for this long
    is aborted; None means the WebSocket endpoint's ``slow_consumer_timeout``
    (one setting for both), or ``SLOW_READER_TIMEOUT`` without one.
    """

    long_poll_timeout: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    sse_max_duration: float = 60.0
    slow_reader_timeout: float | None = None


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def cursor_for(client_cursor: str | None) -> str:
    """The response cursor (protocol section 8.1): strictly past the client's if it is current."""
    current = int((time.time() - _CURSOR_EPOCH) // _CURSOR_INTERVAL)
    try:
        given = int(client_cursor) if client_cursor else None
    except ValueError:
        given = None
    if given is None or given < current:
        return str(current)
    jitter_seconds = random.randint(1, 3600)
    return str(given + max(1, -(-jitter_seconds // _CURSOR_INTERVAL)))


class Request:
    """The parts of an ASGI HTTP request this server reads."""

    __slots__ = ("grant", "headers", "method", "path", "query", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"].upper()
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        self.query: dict[str, list[str]] = parse_qs(
            scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        self.grant: Grant | None = None  # the verified token, with --auth

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ProtocolError(400, f"more than one {name!r} query parameter")
        return values[0]

    async def body(self, limit: int) -> bytes:
        declared = self.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def base_url(self) -> str:
        """The URL of this server as the client addressed it ("" if its Host is no host)."""
        host = self.header("host") or "127.0.0.1"
        if not _HOST_RE.match(host):
            return ""  # Location then holds a relative reference (RFC 9110 10.2.2)
        return f"{self.scope.get('scheme', 'http')}://{host}"

    def url_of(self, path: str) -> str:
        """The absolute URL of ``path`` on this server, ASCII (a Unicode name percent-encoded)."""
        return self.base_url() + quote(path, safe=_PATH_SAFE)


def strict_path(scope: Scope) -> str:
    """The request's path, percent-decoded as UTF-8; 400 if it is not UTF-8.

    ASGI servers decode ``%ff`` into U+FFFD: two different invalid names would
    name one stream, so the path is decoded again from ``raw_path``, strictly.
    """
    path: str = scope["path"]
    raw = scope.get("raw_path")
    if not raw or (b"%" not in raw and raw.isascii()):
        return path
    root: str = scope.get("root_path", "")
    try:
        return root + unquote_to_bytes(raw[len(root.encode("latin-1")) :]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            400,
            f"path is not UTF-8 once percent-decoded ({exc.reason} at byte {exc.start});"
            " percent-encode a name's UTF-8 bytes",
        ) from None


async def respond(
    send: Send,
    status: int,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> None:
    raw = list(_COMMON_HEADERS)
    raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    if status not in (204, 304):
        raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, error: ProtocolError) -> None:
    headers = [("Content-Type", "text/plain; charset=utf-8"), *error.headers.items()]
    await respond(send, error.status, headers, (error.message + "\n").encode())


async def _auth_error(send: Send, error: AuthError) -> None:
    """A 401/403/429 with ``--auth``: JSON ``{"error": {code, message}}``."""
    headers = [("Content-Type", "application/json"), *error.headers()]
    await respond(send, error.status, headers, error.body())


def _with_cors_origin(message: Message, origin: bytes | None) -> Message:
    """A response head with ``--auth``: CORS granted to ``origin`` only (the allowlist's)."""
    headers = [(k, v) for k, v in message["headers"] if k != b"access-control-allow-origin"]
    if origin is not None:
        headers.append((b"access-control-allow-origin", origin))
    headers.append((b"vary", b"Origin"))
    return {**message, "headers": headers}


def redact_query(query: str) -> str:
    """``query`` for a log line: a token in ``access_token`` shown as ``***``."""
    return _ACCESS_TOKEN_RE.sub(r"\1access_token=***", query)


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_event(event: str, payload: str) -> bytes:
    """One SSE event. Every line break (CR, LF or CRLF) in the payload starts a new
    ``data:`` line, so a payload can never end the event or inject another one."""
    # A reader strips one space after "data:"; keep a payload's own leading space.
    lines = "".join(
        f"data: {line}\n" if line.startswith(" ") else f"data:{line}\n"
        for line in _LINE_BREAK.split(payload)
    )
    return f"event: {event}\n{lines}\n".encode()


def sse_data(content_type: str, payload: bytes) -> bytes:
    """The ``data`` event for a read's payload: text as is, anything else base64."""
    if P.is_text_compatible(content_type):
        return sse_event("data", payload.decode("utf-8"))
    return sse_event("data", base64.b64encode(payload).decode())


def _sse_data_events(content_type: str, records: Sequence[Record]) -> Iterator[bytes]:
    """The ``data`` events of a read, each of at most one piece of payload.

    A reader joins a read's data events before its control event, so a record may
    be cut anywhere but inside a UTF-8 sequence or between a CR and its LF. A JSON
    stream's events are arrays of whole records: one record larger than a piece
    is one event.
    """
    if not records:
        return
    if P.is_json(content_type):
        group: list[bytes] = []
        size = 0
        for record in records:
            group.append(record.data)
            size += len(record.data)
            if size >= SSE_TEXT_PIECE:
                yield sse_event("data", (b"[" + b",".join(group) + b"]").decode("utf-8"))
                group, size = [], 0
        if group:
            yield sse_event("data", (b"[" + b",".join(group) + b"]").decode("utf-8"))
        return
    binary = not P.is_text_compatible(content_type)
    piece = SSE_BINARY_PIECE if binary else SSE_TEXT_PIECE

    def encode(chunk: bytes | bytearray) -> bytes:
        if binary:
            return sse_event("data", base64.b64encode(chunk).decode())
        return sse_event("data", chunk.decode("utf-8"))

    buffer = bytearray()
    for record in records:
        data = memoryview(record.data)
        start = 0
        while start < len(data):
            take = min(piece - len(buffer), len(data) - start)
            buffer += data[start : start + take]
            start += take
            if len(buffer) >= piece:
                cut = len(buffer) if binary else _text_cut(buffer)
                yield encode(buffer[:cut])
                del buffer[:cut]
    if buffer:
        yield encode(buffer)


def _text_cut(buffer: bytearray) -> int:
    """Where a piece of UTF-8 text may end: not inside a character, not after a CR
    (its LF may follow: split, the pair would become two line breaks)."""
    cut = len(buffer)
    for back in range(1, min(4, cut) + 1):
        byte = buffer[cut - back]
        if byte & 0xC0 != 0x80:  # ASCII or the first byte of a sequence
            width = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if width > back:  # incomplete: it goes to the next piece
                cut -= back
            break
    if cut > 1 and buffer[cut - 1] == 0x0D:
        cut -= 1
    return cut


def sse_control(next_offset: str, *, up_to_date: bool, closed: bool, cursor: str) -> bytes:
    """The ``control`` event after a read: where to resume, and the stream's state."""
    data: dict[str, Any] = {P.SSE_NEXT_OFFSET: next_offset}
    if closed:
        data[P.SSE_CLOSED] = True
    else:
        data[P.SSE_CURSOR] = cursor
        if up_to_date:
            data[P.SSE_UP_TO_DATE] = True
    return sse_event("control", json.dumps(data, separators=(",", ":")))


class DurableStreamsApp:
    """The ASGI application. ``store`` holds the streams; ``config`` the tunables."""

    def __init__(
        self,
        store: StreamStore,
        config: ServerConfig | None = None,
        *,
        extra_routes: dict[str, App] | None = None,
    ) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self.shutting_down = asyncio.Event()
        self.started_at = time.time()
        self.websocket_handler: App | None = None
        # The reserved {root}/__ds API (subscriptions, _subscriptions_http.py), when enabled.
        self.control_api: Callable[[Request, Send], Awaitable[None]] | None = None
        self.extra_routes = dict(extra_routes or {})
        # With --auth: who may do what (mock_server/_auth.py); None serves everyone.
        self.authority: Authority | None = None

    def begin_shutdown(self) -> None:
        """Ends live reads (long-poll, SSE) so the server can stop promptly."""
        self.shutting_down.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(Request(scope, receive), send)
        elif kind == "websocket":
            if self.websocket_handler is not None and scope["path"] == WS_PATH:
                await self.websocket_handler(scope, receive, send)
            else:  # before accept: the handshake is refused with 403
                await send({"type": "websocket.close", "code": 1008, "reason": "no WebSocket here"})
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)

    def slow_reader_timeout(self) -> float:
        """Seconds a response may go without its reader taking a byte (``ServerConfig``)."""
        if self.config.slow_reader_timeout is not None:
            return self.config.slow_reader_timeout
        websocket_config = getattr(self.websocket_handler, "config", None)
        timeout = getattr(websocket_config, "slow_consumer_timeout", None)
        return float(timeout) if isinstance(timeout, int | float) else SLOW_READER_TIMEOUT

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state = scope.get("state")
                if isinstance(state, dict):  # the HTTP protocol reads it (_http_protocol)
                    state[SLOW_READER_STATE] = self.slow_reader_timeout()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.begin_shutdown()
                self.store.storage.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, req: Request, send: Send) -> None:
        started = time.perf_counter()
        status_holder: list[int] = []
        query_string: str = req.scope.get("query_string", b"").decode("latin-1")
        grant_origin: bytes | None = None
        if self.authority is not None:
            allowed = self.authority.cors_origin(req.header("origin"))
            grant_origin = allowed.encode("latin-1") if allowed is not None else None

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder.append(message["status"])
                if self.authority is not None:
                    message = _with_cors_origin(message, grant_origin)
            await send(message)

        try:
            if self.authority is not None:
                await self._authorize(self.authority, req)
            await self._route(req, send_logged)
        except AuthError as exc:
            await _auth_error(send_logged, exc)
        except ProtocolError as exc:
            await _error(send_logged, self._about_stream(req, exc))
        except _BodyTooLarge:
            too_large = ProtocolError(413, f"body larger than {self.config.max_body_bytes} bytes")
            await _error(send_logged, self._about_stream(req, too_large))
        except _Disconnected:
            pass
        finally:
            if log.isEnabledFor(logging.DEBUG):
                query = redact_query(query_string)
                log.debug(
                    "%s %s%s -> %s (%.1f ms)",
                    req.method,
                    req.path,
                    f"?{query}" if query else "",
                    status_holder[0] if status_holder else "-",
                    (time.perf_counter() - started) * 1000,
                )

    async def _authorize(self, authority: Authority, req: Request) -> None:
        """With ``--auth``: refuse (``AuthError``) what the request's token does not
        allow, before any route runs. ``/health`` and CORS preflights stay open; the
        body's events are checked once it is read (``_check_body``)."""
        req.path = strict_path(req.scope)
        if req.method == "OPTIONS" or req.path == "/health":
            return
        authority.check_origin(req.header("origin"))
        if self.control_api is not None and _SUBSCRIPTION_TOKEN_ROUTE.match(req.path):
            return  # the subscription API checks its own bearer token (callback or claim)
        token = bearer(req.header("authorization"))
        in_query = req.query.pop(ACCESS_TOKEN_PARAM, None)
        if in_query is not None:
            # Removed before routing, so no handler (or log line) ever sees it.
            req.scope["query_string"] = urlencode(req.query, doseq=True).encode("latin-1")
            if req.method != "GET" or req.query.get(P.LIVE_PARAM) != [P.LIVE_SSE]:
                raise unauthorized(
                    "access_token in the URL is accepted only for live=sse reads;"
                    " send Authorization: Bearer"
                )
            if token is not None or len(in_query) > 1:
                raise unauthorized("send one token, in the header or in access_token")
            token = in_query[0]
        grant = authority.verify(token)
        req.grant = grant
        authority.requests.take(grant.sub)
        name = stream_name(req.path)
        if name is None or name.split("/", 1)[0] == P.RESERVED_PREFIX:
            if not grant.server_admin:
                raise forbidden("this route needs an admin token for every stream ('*')")
            return
        if req.method == "POST":
            # A close needs 'delete'; an append with a body 'append' (checked once read).
            close = P.header_true(req.header(P.STREAM_CLOSED))
            grant.require("delete" if close else "append", req.path)
            return
        capability = {"PUT": "create", "GET": "read", "HEAD": "read", "DELETE": "delete"}
        if req.method in capability:
            grant.require(capability[req.method], req.path)
        else:  # 405 follows, for a token that covers the stream
            grant.require("read", req.path)

    def _check_body(self, req: Request, body: bytes, content_type: str | None) -> None:
        """With ``--auth``: 403 for appended events the token may not write (authors,
        cancel, steer), before the store sees them."""
        grant = req.grant
        if grant is None or not body or self.authority is None:
            return
        if P.header_true(req.header(P.STREAM_CLOSED)):
            grant.require("append", req.path)
        hook = self.authority.authorize_cancel
        if not P.is_json(content_type) or ("admin" in grant.can and hook is None):
            return
        items = event_items(body)
        if items is not None:
            grant.check_events(req.path, items, hook)

    def _live(self, req: Request) -> contextlib.AbstractContextManager[None]:
        """Count a live read against the connection caps (429 over one), with ``--auth``."""
        if self.authority is None or req.grant is None:
            return contextlib.nullcontext()
        client = req.scope.get("client")
        return self.authority.connection(str(client[0]) if client else "", req.grant)

    def _about_stream(self, req: Request, error: ProtocolError) -> ProtocolError:
        """``error``, saying which incarnation answered if it is about an existing stream."""
        state = self.store.peek(req.path)
        if state is not None and error.status != 404:
            error.headers.setdefault(P.STREAM_INCARNATION, state.incarnation_text)
        return error

    async def _route(self, req: Request, send: Send) -> None:
        req.path = strict_path(req.scope)
        if req.method == "OPTIONS":
            await respond(send, 204)
            return
        if req.path in self.extra_routes:
            await self.extra_routes[req.path](req.scope, req.receive, send)
            return
        if req.path == "/health":
            transports = ["http", "sse", "long-poll"]
            if self.websocket_handler is not None:
                transports.append("websocket")
            body = json.dumps(
                {
                    "status": "ok",
                    "streams": len(self.store.paths()),
                    "uptime_s": round(time.time() - self.started_at, 3),
                    "transports": transports,
                }
            ).encode()
            await respond(send, 200, [("Content-Type", "application/json")], body)
            return
        if not req.path.startswith(P.STREAM_PATH_PREFIX) or req.path == P.STREAM_PATH_PREFIX:
            raise ProtocolError(404, "no such route; streams live under /v1/stream/{path}")
        reserved = req.path[len(P.STREAM_PATH_PREFIX) :].split("/", 1)[0] == P.RESERVED_PREFIX
        if reserved and self.control_api is not None:
            await self.control_api(req, send)
            return
        check_not_reserved(req.path)
        handlers = {
            "PUT": self._create,
            "POST": self._append,
            "GET": self._read,
            "HEAD": self._head,
            "DELETE": self._delete,
        }
        handler = handlers.get(req.method)
        if handler is None:
            raise ProtocolError(405, f"method {req.method} is not allowed on a stream")
        await handler(req, send)

    # ------------------------------------------------------------------ PUT

    async def _create(self, req: Request, send: Send) -> None:
        content_type = req.header("content-type")
        if content_type is not None and not content_type.strip():
            content_type = None
        if content_type is not None and not _CONTENT_TYPE_RE.match(content_type.strip()):
            raise ProtocolError(400, f"invalid Content-Type {content_type!r}")
        ttl_text = req.header(P.STREAM_TTL)
        expires_text = req.header(P.STREAM_EXPIRES_AT)
        if ttl_text is not None and expires_text is not None:
            raise ProtocolError(400, "send Stream-TTL or Stream-Expires-At, not both")
        ttl: int | None = None
        if ttl_text is not None:
            if not _TTL_RE.match(ttl_text):
                raise ProtocolError(
                    400, "Stream-TTL must be a plain non-negative integer of seconds"
                )
            ttl = int(ttl_text)
        if expires_text is not None:
            try:
                parse_rfc3339(expires_text)
            except ValueError:
                raise ProtocolError(
                    400, "Stream-Expires-At must be an RFC 3339 timestamp"
                ) from None
        forked_from = req.header(P.STREAM_FORKED_FROM)
        if forked_from is not None:
            forked_from = self._stream_path(forked_from)
        fork_offset = req.header(P.STREAM_FORK_OFFSET)
        sub_text = req.header(P.STREAM_FORK_SUB_OFFSET)
        sub_offset: int | None = None
        if sub_text is not None:
            if forked_from is None:
                raise ProtocolError(400, "Stream-Fork-Sub-Offset needs Stream-Forked-From")
            if not _INT_RE.match(sub_text):
                raise ProtocolError(400, "Stream-Fork-Sub-Offset must be a non-negative integer")
            sub_offset = int(sub_text)
        if fork_offset is not None and forked_from is None:
            raise ProtocolError(400, "Stream-Fork-Offset needs Stream-Forked-From")
        idempotency_key = req.header(P.IDEMPOTENCY_KEY)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY:
            raise ProtocolError(
                400, f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters"
            )
        if forked_from is not None and req.grant is not None:
            req.grant.require("read", forked_from)
        body = await req.body(self.config.max_body_bytes)
        self._check_body(req, body, content_type)
        state, created = self.store.create(
            req.path,
            CreateRequest(
                content_type=content_type.strip() if content_type else None,
                ttl_seconds=ttl,
                expires_at=expires_text,
                closed=P.header_true(req.header(P.STREAM_CLOSED)),
                body=body,
                forked_from=forked_from,
                fork_offset=fork_offset,
                fork_sub_offset=sub_offset,
                idempotency_key=idempotency_key,
            ),
        )
        headers = [
            ("Content-Type", state.content_type),
            (P.STREAM_NEXT_OFFSET, state.tail_offset),
            (P.STREAM_INCARNATION, state.incarnation_text),
        ]
        if created:
            headers.append(("Location", req.url_of(req.path)))
        if state.closed:
            headers.append((P.STREAM_CLOSED, "true"))
        await respond(send, 201 if created else 200, headers)

    @staticmethod
    def _stream_path(value: str) -> str:
        """The stream a ``Stream-Forked-From`` header names: a path or URL, its name
        percent-encoded (or raw UTF-8) as in a request line."""
        try:
            raw = urlsplit(value.strip()).path.encode("latin-1")
            path = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(
                400, "Stream-Forked-From is not UTF-8 once percent-decoded"
            ) from None
        if not path.startswith("/"):
            path = P.STREAM_PATH_PREFIX + path
        if not path.startswith(P.STREAM_PATH_PREFIX) or path == P.STREAM_PATH_PREFIX:
            raise ProtocolError(400, "Stream-Forked-From must name a stream under /v1/stream/")
        check_not_reserved(path)
        return path

    # ------------------------------------------------------------------ POST

    async def _append(self, req: Request, send: Send) -> None:
        producer = self._producer(req)
        body = await req.body(self.config.max_body_bytes)
        self._check_body(req, body, req.header("content-type"))
        result: AppendResult = self.store.append(
            req.path,
            AppendRequest(
                body=body,
                content_type=req.header("content-type"),
                close=P.header_true(req.header(P.STREAM_CLOSED)),
                stream_seq=req.header(P.STREAM_SEQ),
                producer=producer,
            ),
        )
        headers = [
            (P.STREAM_NEXT_OFFSET, result.next_offset),
            (P.STREAM_INCARNATION, result.incarnation),
        ]
        if result.closed:
            headers.append((P.STREAM_CLOSED, "true"))
        if result.producer is not None:
            headers.append((P.PRODUCER_EPOCH, str(result.producer.epoch)))
            headers.append((P.PRODUCER_SEQ, str(result.producer.seq)))
        await respond(send, result.status, headers)

    @staticmethod
    def _producer(req: Request) -> Producer | None:
        pid = req.header(P.PRODUCER_ID)
        epoch = req.header(P.PRODUCER_EPOCH)
        seq = req.header(P.PRODUCER_SEQ)
        given = [v is not None for v in (pid, epoch, seq)]
        if not any(given):
            return None
        if pid is None or epoch is None or seq is None:
            raise ProtocolError(400, "send Producer-Id, Producer-Epoch and Producer-Seq together")
        if not pid.strip():
            raise ProtocolError(400, "Producer-Id must not be empty")
        numbers = []
        for name, text in ((P.PRODUCER_EPOCH, epoch), (P.PRODUCER_SEQ, seq)):
            if not _INT_RE.match(text) or int(text) > P.MAX_PRODUCER_NUMBER:
                raise ProtocolError(400, f"{name} must be an integer from 0 to 2^53-1")
            numbers.append(int(text))
        return Producer(pid, numbers[0], numbers[1])

    # ------------------------------------------------------------------ HEAD / DELETE

    async def _head(self, req: Request, send: Send) -> None:
        state = self.store.require(req.path)
        headers = [
            ("Content-Type", state.content_type),
            (P.STREAM_NEXT_OFFSET, state.tail_offset),
            (P.STREAM_INCARNATION, state.incarnation_text),
            ("Cache-Control", "no-store"),
            ("ETag", self._etag(state, P.OFFSET_BEGINNING, state.tail_offset, state.closed)),
        ]
        if state.closed:
            headers.append((P.STREAM_CLOSED, "true"))
        if state.ttl_seconds is not None:
            headers.append((P.STREAM_TTL, str(state.ttl_seconds)))
        if state.expires_at is not None:
            headers.append((P.STREAM_EXPIRES_AT, state.expires_at))
        await respond(send, 200, headers)

    async def _delete(self, req: Request, send: Send) -> None:
        self.store.delete(req.path)
        await respond(send, 204)

    # ------------------------------------------------------------------ GET

    @staticmethod
    def _etag(state: StreamState, start: str, end: str, closed: bool) -> str:
        return f'"{state.stream_id}:{start}:{end}{":c" if closed else ""}"'

    @staticmethod
    def _payload(state: StreamState, result: ReadResult) -> bytes:
        if P.is_json(state.content_type):
            return b"[" + b",".join(r.data for r in result.records) + b"]"
        return b"".join(r.data for r in result.records)

    async def _read(self, req: Request, send: Send) -> None:
        if req.grant is not None and req.param(P.LIVE_PARAM) in (P.LIVE_LONG_POLL, P.LIVE_SSE):
            with self._live(req):  # a live read holds a connection: counted for the caps
                await self._read_stream(req, send)
            return
        await self._read_stream(req, send)

    async def _read_stream(self, req: Request, send: Send) -> None:
        state = self.store.require(req.path)
        offset = req.param(P.OFFSET_PARAM)
        live = req.param(P.LIVE_PARAM)
        cursor = req.param(P.CURSOR_PARAM)
        if offset == "":
            raise ProtocolError(400, "empty offset")
        if live not in (None, P.LIVE_LONG_POLL, P.LIVE_SSE):
            raise ProtocolError(400, "live must be long-poll or sse")
        if live is not None and offset is None:
            raise ProtocolError(400, f"live={live} needs an offset (use -1 for the beginning)")
        position = self.store.parse_read_offset(state, offset)
        self.store.touch(state)
        if live == P.LIVE_SSE:
            await self._sse(req, send, state, position, cursor)
            return
        if live == P.LIVE_LONG_POLL:
            await self._long_poll(req, send, state, position, cursor)
            return
        if offset == P.OFFSET_NOW:
            headers = [
                ("Content-Type", state.content_type),
                (P.STREAM_NEXT_OFFSET, state.tail_offset),
                (P.STREAM_INCARNATION, state.incarnation_text),
                (P.STREAM_UP_TO_DATE, "true"),
                ("Cache-Control", "no-store"),
            ]
            if state.closed:
                headers.append((P.STREAM_CLOSED, "true"))
            await respond(send, 200, headers, b"[]" if P.is_json(state.content_type) else b"")
            return
        await self._send_read(
            req,
            send,
            state,
            offset or P.OFFSET_BEGINNING,
            self.store.read(state, position),
            cursor=None,
        )

    async def _send_read(
        self,
        req: Request,
        send: Send,
        state: StreamState,
        start: str,
        result: ReadResult,
        cursor: str | None,
    ) -> None:
        etag = self._etag(state, start, result.next_offset, result.closed)
        headers = [
            ("Content-Type", state.content_type),
            (P.STREAM_NEXT_OFFSET, result.next_offset),
            (P.STREAM_INCARNATION, state.incarnation_text),
            ("ETag", etag),
            # A chunk that stops short of the tail never changes; one that
            # reaches it does as soon as anything is appended.
            ("Cache-Control", "no-cache" if result.up_to_date else CACHEABLE),
        ]
        if result.up_to_date:
            headers.append((P.STREAM_UP_TO_DATE, "true"))
        if result.closed:
            headers.append((P.STREAM_CLOSED, "true"))
        if cursor is not None:
            headers.append((P.STREAM_CURSOR, cursor))
        if req.header("if-none-match") == etag:
            await respond(
                send, 304, [("ETag", etag), (P.STREAM_INCARNATION, state.incarnation_text)]
            )
            return
        await respond(send, 200, headers, self._payload(state, result))

    async def _long_poll(
        self, req: Request, send: Send, state: StreamState, position: int, cursor: str | None
    ) -> None:
        start = state.offset(position)
        tail = self.store.tail(
            state,
            position,
            until=time.monotonic() + self.config.long_poll_timeout,
            idle=self.config.long_poll_timeout,
            stop=(self.shutting_down,),
        )
        last: ReadResult | None = None
        async with contextlib.aclosing(tail) as results:
            async for result in results:
                if result.records:
                    await self._send_read(req, send, state, start, result, cursor_for(cursor))
                    return
                if result.closed:
                    await self._nothing_new(send, state, result, (P.STREAM_CLOSED, "true"))
                    return
                last = result
        assert last is not None  # the tail yields its first read whatever happens
        # Nothing new before the timeout (or the server is stopping).
        await self._nothing_new(send, state, last, (P.STREAM_CURSOR, cursor_for(cursor)))

    @staticmethod
    async def _nothing_new(
        send: Send, state: StreamState, result: ReadResult, last_header: tuple[str, str]
    ) -> None:
        """A long-poll's 204: where the reader is, and the stream's end or a cursor."""
        headers = [
            (P.STREAM_NEXT_OFFSET, result.next_offset),
            (P.STREAM_INCARNATION, state.incarnation_text),
            (P.STREAM_UP_TO_DATE, "true"),
            last_header,
            ("Cache-Control", "no-store"),
        ]
        await respond(send, 204, headers)

    async def _sse(
        self, req: Request, send: Send, state: StreamState, position: int, cursor: str | None
    ) -> None:
        binary = not P.is_text_compatible(state.content_type)
        # Set when the client goes (or is aborted as a slow reader): the tail stops.
        disconnected = asyncio.Event()
        duration = self.config.sse_max_duration
        if req.grant is not None:  # ends when the token does; the reader comes back with a new one
            duration = min(duration, max(1.0, req.grant.exp - time.time()))
        tail = self.store.tail(
            state,
            position,
            until=time.monotonic() + duration,
            idle=self.config.long_poll_timeout,  # an idle tail sends a control event as often
            stop=(self.shutting_down, disconnected),
        )
        async with contextlib.aclosing(tail) as results:
            # The first read comes before the head: a stream SSE cannot carry from
            # here gets its refusal as a status, not as a response that ends at once.
            first = await anext(results)
            self._check_sse_text(state, first)
            headers = [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (P.STREAM_INCARNATION.lower().encode(), state.incarnation_text.encode()),
            ]
            if binary:
                headers.append((P.STREAM_SSE_DATA_ENCODING.lower().encode(), b"base64"))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*_COMMON_HEADERS, *headers],
                }
            )

            async def watch_disconnect() -> None:
                while (await req.receive())["type"] != "http.disconnect":
                    pass
                disconnected.set()

            watcher = asyncio.ensure_future(watch_disconnect())
            try:
                if not self.shutting_down.is_set():
                    await self._sse_events(send, state, first, results, cursor, disconnected)
            finally:
                watcher.cancel()
        if not disconnected.is_set():
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    def _check_sse_text(state: StreamState, result: ReadResult) -> None:
        """409 if a record is not UTF-8 on a text stream (stored by an older server that
        did not check appends): SSE can only carry it as text; a catch-up GET can."""
        if not P.is_text_compatible(state.content_type):
            return
        for record in result.records:
            try:
                record.data.decode("utf-8")
            except UnicodeDecodeError:
                start = state.offset(record.end - len(record.data))
                raise ProtocolError(
                    409,
                    f"the stream's data after offset {start} is not valid UTF-8, so SSE cannot"
                    f" carry it as {P.media_type(state.content_type)} text; read it with a"
                    " catch-up GET (no live=sse)",
                ) from None

    def _sse_sends(
        self, state: StreamState, result: ReadResult, cursor: str | None
    ) -> Iterator[bytes]:
        """One read of the tail as SSE, in ``send``s of about ``SSE_SEND_BYTES``: its
        data events (a read of 1 MiB is many), then its control event in the last."""
        batch: list[bytes] = []
        size = 0
        for event in _sse_data_events(state.content_type, result.records):
            batch.append(event)
            size += len(event)
            if size >= SSE_SEND_BYTES:
                yield b"".join(batch)
                batch, size = [], 0
        batch.append(
            sse_control(
                result.next_offset,
                up_to_date=result.up_to_date,
                closed=result.closed,
                cursor=cursor_for(cursor),
            )
        )
        yield b"".join(batch)

    async def _sse_events(
        self,
        send: Send,
        state: StreamState,
        first: ReadResult,
        results: AsyncIterator[ReadResult],
        cursor: str | None,
        disconnected: asyncio.Event,
    ) -> None:
        """The events of one SSE response: the first read's, then each read of the tail.

        Each ``send`` waits while the transport's buffer is full, so a slow reader
        holds at most that buffer and one send; one that takes nothing is aborted by
        the protocol (``_http_protocol``), which ends the response here.
        """
        try:
            result: ReadResult | None = first
            while result is not None:
                for body in self._sse_sends(state, result, cursor):
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    # A send to a gone client returns at once: let the watcher see it,
                    # and let other connections run between the sends of a backlog.
                    await asyncio.sleep(0)
                    if disconnected.is_set():
                        return
                result = await anext(results, None)
        except (ProtocolError, UnicodeDecodeError):
            # Deleted under us, or data SSE cannot carry: end the response; the
            # reconnect is told why (404/410/409).
            return
