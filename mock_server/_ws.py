"""The WebSocket session transport at ``{base}/v1/ws`` (our extension; docs/websocket.md).

One socket per client: it subscribes to streams from offsets (several at a
time), appends with producer ids and gets acks, and carries ephemeral
presence. It shares the ``StreamStore`` with the HTTP front end, so streams,
offsets and refusals are the same on both.

Each connection has one writer draining an outbox bounded in bytes
(``max_queued_bytes``) and frames. Subscription pumps read from the store only
when the outbox has room, so a slow reader lags behind in the durable log
instead of in server memory; the bytes handed to the socket are bounded by
the transport's flow control (``_ws_protocol.py``). A reader that takes no
frame for ``slow_consumer_timeout`` (or overflows the outbox with acks and
presence) is closed with 4008, its socket reset if it cannot even take the
close, and resumes from its offset. A slow client never slows the others:
nothing is shared between connections but the store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import ValidationError

from durable_client import wire as P
from durable_client.wire import (
    CLIENT_FRAME,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_MANY_SUBSCRIPTIONS,
    ERROR_CODES,
    Ack,
    Append,
    Auth,
    AuthOk,
    Error,
    LeavePresence,
    Member,
    Ping,
    Pong,
    Presence,
    SetPresence,
    Subscribe,
    Subscribed,
    Unsubscribe,
)

from ._asgi import Receive, Scope, Send
from ._auth import AuthError, bearer, event_items, forbidden, unauthorized
from ._json_depth import nesting_exceeds
from ._model import StreamState
from ._store import (
    AppendRequest,
    Producer,
    ProtocolError,
    ReadResult,
    StreamStore,
    check_not_reserved,
)

if TYPE_CHECKING:
    from ._auth import Authority, Grant

log = logging.getLogger("mock_server.ws")

ACCESS_TOKEN_PARAM = "access_token"


MAX_BAD_FRAMES = 10
MAX_ECHOED_REQ = 128  # a malformed frame's req id is echoed back up to this length (as Id)
# Client frames (docs/websocket.md, "Limits"). The size limit is uvicorn's (ws_max_size,
# close 1009); everything below is checked before a frame is parsed or handled.
MAX_FRAME_DEPTH = 64  # arrays and objects inside one another, the frame itself included
FRAME_RATE = 1000.0  # frames a socket may send per second, sustained (a token bucket) ...
FRAME_BURST = 500  # ... and at once
RATE_LIMIT_CLOSE = 100  # refused frames within about a second that close the socket (4029)
READ_BUDGET = 8  # frames one socket has handled before its reader lets the others in
CLOSE_RATE_LIMITED = CLOSE_TOO_MANY_SUBSCRIPTIONS  # 4029: the client sends too much
MAX_ERROR_MESSAGE = 300  # characters of an error frame's message about a client's frame
SLOW_REASON = "slow consumer: resume from your last offset"


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """Tunables of the WebSocket transport (keepalive lives in the uvicorn config)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_subscriptions: int = 64
    max_queued_frames: int = 256
    max_queued_bytes: int = 1024 * 1024  # data frames queued per socket (docs/websocket.md)
    slow_consumer_timeout: float = 10.0
    presence_grace: float = 3.0
    live_wait: float = 30.0
    frame_data_bytes: int = 256 * 1024  # batch size of data frames (one larger record still fits)
    frame_rate: float = FRAME_RATE  # frames a socket may send per second, sustained
    frame_burst: int = FRAME_BURST  # ... and at once


def stream_path(name: str) -> str:
    """``sessions/x`` or ``/v1/stream/sessions/x`` as the store's path; 400 otherwise
    (also for the protocol's reserved ``__ds`` names)."""
    if name.startswith(P.STREAM_PATH_PREFIX):
        path = name
    elif name.startswith("/"):
        raise ProtocolError(400, "stream must be a name under /v1/stream/")
    else:
        path = P.STREAM_PATH_PREFIX + name
    if path == P.STREAM_PATH_PREFIX:
        raise ProtocolError(400, "stream name is empty")
    check_not_reserved(path)
    return path


def error_frame(exc: ProtocolError, *, req: str | None = None, sub: str | None = None) -> Error:
    code = ERROR_CODES.get(exc.status, "error")
    if exc.status == 409:
        if P.STREAM_CLOSED in exc.headers:
            code = "stream_closed"
        elif P.PRODUCER_EXPECTED_SEQ in exc.headers:
            code = "sequence_gap"
    return Error(
        status=exc.status, code=code, message=exc.message, req=req, sub=sub, headers=exc.headers
    )


class DataFrames:
    """The ``data`` frames of one subscription, written as JSON text without a model.

    The fast path of every live read: a JSON stream's records are stored as
    compact JSON already, so a frame is spliced from strings instead of
    parsing them into ``Data.messages`` and dumping them again. Its output,
    parsed, equals ``Data(...).model_dump_json(exclude_none=True)`` parsed
    (``tests/server/test_data_frames.py``).
    """

    __slots__ = ("_key", "_sub")

    def __init__(self, sub: str, content_type: str) -> None:
        self._sub = json.dumps(sub)
        self._key = (
            "messages"
            if P.is_json(content_type)
            else "text"
            if P.is_text_compatible(content_type)
            else "data_base64"
        )

    def encode(self, result: ReadResult) -> str:
        """The frame for one read of the tail."""
        head = (
            f'{{"type":"data","sub":{self._sub},"offset":"{result.next_offset}",'
            f'"up_to_date":{"true" if result.up_to_date else "false"},'
            f'"closed":{"true" if result.closed else "false"},'
        )
        if self._key == "messages":
            body = b",".join(r.data for r in result.records).decode()
            return f'{head}"messages":[{body}]}}'
        raw = b"".join(r.data for r in result.records)
        if self._key == "text":
            try:
                payload = json.dumps(raw.decode("utf-8"))
            except UnicodeDecodeError:
                # Stored by an older server that did not check appends: refuse it
                # (as SSE does) rather than deliver U+FFFD in place of the bytes.
                raise ProtocolError(
                    409,
                    f"the stream's data before offset {result.next_offset} is not valid"
                    " UTF-8, so it cannot be sent as text; read it with a catch-up GET",
                ) from None
        else:
            payload = json.dumps(base64.b64encode(raw).decode())
        return f'{head}"{self._key}":{payload}}}'


class Outbox:
    """A connection's bounded queue of outgoing text frames and the writer that drains it.

    Data frames (a subscription's reads of the log) go in only while there is
    room: fewer than ``max_queued_bytes`` of them queued and the queue under
    half of ``max_queued_frames``. A pump waits for room before it reads, so
    what a slow reader has not taken stays in the durable log, not here; the
    batch that crosses the budget still goes in whole, so a record larger
    than the budget is delivered too (data bytes stay under the budget plus
    one batch).
    Other frames (subscribed, acks, errors, presence, pongs) answer the client
    and cannot wait: they go in at once, and if they pass ``max_queued_frames``
    or ``max_queued_bytes`` of their own, ``slow`` is set.

    The writer hands the socket one frame at a time and counts it as queued
    until the socket has taken it (uvicorn's ``send`` returns once it is in the
    transport's buffer, which flow control keeps under its high-water mark).
    A frame the socket does not take within ``slow_consumer_timeout`` sets
    ``slow`` too. Sizes are the frames' memory (``sys.getsizeof``), about
    their length for ASCII JSON.
    """

    def __init__(self, send: Send, config: WebSocketConfig) -> None:
        self._send = send
        self._max_frames = config.max_queued_frames
        self._max_bytes = config.max_queued_bytes
        self._stall_timeout = config.slow_consumer_timeout
        self._frames: deque[tuple[str, int, bool]] = deque()  # text, size, is data
        self.data_bytes = 0
        self.other_bytes = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.slow = asyncio.Event()
        """The client is not taking frames: the queue overflowed or the socket stalled."""

    def put(self, frame: str, *, data: bool = False) -> None:
        """Queue ``frame``; ``data`` frames only after :meth:`room` said yes."""
        size = sys.getsizeof(frame)
        if data:
            self.data_bytes += size
        elif len(self._frames) >= self._max_frames or self.other_bytes + size > self._max_bytes:
            self.slow.set()
            return
        else:
            self.other_bytes += size
        self._frames.append((frame, size, data))
        self._ready.set()
        self._update_room()

    def _update_room(self) -> None:
        if len(self._frames) < self._max_frames // 2 and self.data_bytes < self._max_bytes:
            self._room.set()
        else:
            self._room.clear()

    def clear(self) -> None:
        """Drop what is queued (the connection is over): its memory is free at once."""
        self._frames.clear()
        self.data_bytes = self.other_bytes = 0

    async def room(self, timeout: float) -> bool:
        """Wait until a data frame may go in; False if there is no room for ``timeout``."""
        if self._room.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._room.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            while self._frames:
                frame, size, data = self._frames[0]
                try:
                    # Cancelling uvicorn's send is safe: it waits for the transport to
                    # be writable before it touches any state, then writes at once.
                    async with asyncio.timeout(self._stall_timeout):
                        await self._send({"type": "websocket.send", "text": frame})
                except TimeoutError:
                    self.slow.set()
                    return
                except OSError:  # uvicorn's ClientDisconnected: the socket is gone
                    return
                self._frames.popleft()
                if data:
                    self.data_bytes -= size
                else:
                    self.other_bytes -= size
                self._update_room()
            self._ready.clear()


@dataclass(eq=False)
class _Holding:
    member: Member
    holders: set[Connection] = field(default_factory=set)
    leave_timer: asyncio.TimerHandle | None = None


class PresenceHub:
    """Who is in each session, shared by all connections of one server."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._members: dict[str, dict[str, _Holding]] = {}
        self._listeners: dict[str, set[Connection]] = {}

    def members(self, path: str) -> list[Member]:
        return [h.member for h in self._members.get(path, {}).values()]

    def listen(self, conn: Connection, path: str) -> None:
        self._listeners.setdefault(path, set()).add(conn)
        conn.send_frame(Presence(stream=path, event="snapshot", members=self.members(path)))

    def unlisten(self, conn: Connection, path: str) -> None:
        listeners = self._listeners.get(path)
        if listeners is not None:
            listeners.discard(conn)
            if not listeners:
                del self._listeners[path]

    def set(self, conn: Connection, path: str, member: Member) -> None:
        entries = self._members.setdefault(path, {})
        holding = entries.get(member.client_id)
        event: Literal["join", "update"]
        if holding is None:
            entries[member.client_id] = _Holding(member, {conn})
            event = "join"
        else:
            if holding.leave_timer is not None:  # back before the grace ran out: no flap
                holding.leave_timer.cancel()
                holding.leave_timer = None
            holding.holders.add(conn)
            if holding.member == member:
                return
            holding.member = member
            event = "update"
        conn.presence.add((path, member.client_id))
        if conn not in self._listeners.get(path, set()):
            self.listen(conn, path)
        self._broadcast(path, event, member)

    def leave(self, conn: Connection, path: str, client_id: str) -> None:
        conn.presence.discard((path, client_id))
        holding = self._members.get(path, {}).get(client_id)
        if holding is not None:
            holding.holders.discard(conn)
            if not holding.holders:
                self._remove(path, client_id)

    def drop(self, conn: Connection) -> None:
        """A connection ended: its members leave after the grace period unless they return."""
        for path, client_id in list(conn.presence):
            holding = self._members.get(path, {}).get(client_id)
            if holding is None:
                continue
            holding.holders.discard(conn)
            if not holding.holders and holding.leave_timer is None:
                holding.leave_timer = asyncio.get_running_loop().call_later(
                    self.grace, self._remove, path, client_id
                )
        conn.presence.clear()
        for path in list(self._listeners):
            self.unlisten(conn, path)

    def _remove(self, path: str, client_id: str) -> None:
        entries = self._members.get(path, {})
        holding = entries.pop(client_id, None)
        if not entries:
            self._members.pop(path, None)
        if holding is not None:
            if holding.leave_timer is not None:
                holding.leave_timer.cancel()
            self._broadcast(path, "leave", holding.member)

    def _broadcast(
        self, path: str, event: Literal["join", "update", "leave"], member: Member
    ) -> None:
        frame = Presence(
            stream=path,
            event=event,
            member=member,
            members=self.members(path),
        ).model_dump_json()
        for conn in list(self._listeners.get(path, ())):
            conn.outbox.put(frame)


class Connection:
    """One client socket: its subscriptions, presence and outbox."""

    def __init__(
        self,
        store: StreamStore,
        hub: PresenceHub,
        config: WebSocketConfig,
        send: Send,
        shutting_down: asyncio.Event,
        *,
        authority: Authority | None = None,
        grant: Grant | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.authority = authority
        self.grant = grant  # the token in force, with --auth
        self._expiry: asyncio.TimerHandle | None = None
        self.config = config
        self.outbox = Outbox(send, config)
        self.shutting_down = shutting_down
        self.subscriptions: dict[str, asyncio.Task[None]] = {}
        self.presence: set[tuple[str, str]] = set()
        self.closing = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""

    def watch_expiry(self) -> None:
        """Close with 4001 when the token in force expires (one timer, moved by a refresh)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.grant is not None:
            delay = max(0.0, self.grant.exp - time.time())
            self._expiry = asyncio.get_running_loop().call_later(
                delay, self.request_close, CLOSE_TOKEN_EXPIRED, "token expired"
            )

    def stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _require(self, capability: str, path: str) -> None:
        """403 (``AuthError``) unless the token in force allows ``capability`` on ``path``."""
        if self.grant is not None:
            self.grant.require(capability, path)

    def _refresh(self, frame: Any) -> None:
        """An ``auth`` frame: the new token replaces the one in force if it verifies and
        speaks for the same sub and kind; otherwise the old one stays until it expires."""
        req = frame.req
        if self.authority is None or self.grant is None:
            self.send_frame(
                Error(status=400, code="bad_request", message="this server has no --auth", req=req)
            )
            return
        try:
            grant = self.authority.verify(frame.token)
            if (grant.sub, grant.kind) != (self.grant.sub, self.grant.kind):
                raise forbidden("a refreshed token must have the same sub and kind")
        except AuthError as exc:
            self.send_frame(auth_error_frame(exc, req=req))
            return
        self.grant = grant
        self.watch_expiry()
        self.send_frame(AuthOk(req=req, expires_at=int(grant.exp)))

    def request_close(self, code: int, reason: str) -> None:
        if not self.closing.is_set():
            self.close_code, self.close_reason = code, reason
            self.closing.set()

    def send_frame(self, frame: Any) -> None:
        self.outbox.put(frame.model_dump_json(exclude_none=True))

    def _about_stream(self, path: str | None, exc: ProtocolError) -> ProtocolError:
        """``exc``, with the incarnation of the existing stream it is about (as over HTTP)."""
        state = self.store.peek(path) if path is not None else None
        if state is not None and exc.status != 404:
            exc.headers.setdefault(P.STREAM_INCARNATION, state.incarnation_text)
        return exc

    # ------------------------------------------------------------------ requests

    def handle(self, text: str) -> bool:
        """Handle one client frame; False if it was malformed (it then got a ``bad_frame``)."""
        if nesting_exceeds(text, MAX_FRAME_DEPTH):
            # Refused before any parser sees it, so no parser's recursion limit matters.
            message = f"frame: nested deeper than {MAX_FRAME_DEPTH} arrays and objects"
            self.send_frame(
                Error(status=400, code="bad_frame", message=message, req=_leading_ids(text)[0])
            )
            return False
        try:
            # Strict: no bool or float where an int belongs (``seq: true``, ``epoch: 1.0``),
            # no 1 or "true" for a bool: a mistyped frame is an error, not a guess.
            frame: Any = CLIENT_FRAME.validate_json(text, strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "frame"
            message = f"{where}: {first['msg']}"
            if len(message) > MAX_ERROR_MESSAGE:  # ``where`` may hold a long unknown key
                message = message[: MAX_ERROR_MESSAGE - 3] + "..."
            req = _request_id(text) or _leading_ids(text)[0]  # the second for invalid JSON
            self.send_frame(Error(status=400, code="bad_frame", message=message, req=req))
            return False
        if isinstance(frame, Auth):
            self._refresh(frame)
        elif isinstance(frame, Subscribe):
            self._subscribe(frame)
        elif isinstance(frame, Unsubscribe):
            self._unsubscribe(frame.sub)
        elif isinstance(frame, Append):
            self._append(frame)
        elif isinstance(frame, SetPresence):
            self._presence(frame)
        elif isinstance(frame, LeavePresence):
            try:
                path = stream_path(frame.stream)
                if self.grant is not None:
                    self.grant.require("presence", path)
                    self.grant.check_member(frame.client_id, None)
                self.hub.leave(self, path, frame.client_id)
            except ProtocolError as exc:
                self.send_frame(error_frame(exc))
            except AuthError as exc:
                self.send_frame(auth_error_frame(exc))
        elif isinstance(frame, Ping):
            self.send_frame(Pong(req=frame.req))
        return True

    def refuse_over_rate(self, text: str | None, wait: float) -> None:
        """Answer a frame over the socket's rate with a 429, unhandled (its ids from
        its leading fields, without parsing it: the point is to do little for it)."""
        req, sub = _leading_ids(text) if text is not None else (None, None)
        wait = max(wait, 0.001)  # said in whole milliseconds: never "0.000"
        self.send_frame(
            Error(
                status=429,
                code="rate_limited",
                message=f"more than {FRAME_RATE:g} frames a second (bursts of {FRAME_BURST});"
                f" retry in {wait * 1000:.0f} ms",
                req=req,
                sub=sub,
                headers={"Retry-After": f"{wait:.3f}"},
            )
        )

    def _presence(self, frame: SetPresence) -> None:
        try:
            path = stream_path(frame.stream)
            if self.grant is not None:
                self.grant.require("presence", path)
                self.grant.check_member(frame.client_id, frame.kind)
            self.store.require(path)
        except ProtocolError as exc:
            self.send_frame(error_frame(exc))
            return
        except AuthError as exc:
            self.send_frame(auth_error_frame(exc))
            return
        member = Member(
            client_id=frame.client_id, kind=frame.kind, label=frame.label, status=frame.status
        )
        self.hub.set(self, path, member)

    def _append(self, frame: Append) -> None:
        path: str | None = None
        try:
            path = stream_path(frame.stream)
            if self.grant is not None:
                self._authorize_append(self.grant, path, frame)
            state = self.store.require(path)
            body = self._body(state, frame)
            if len(body) > self.config.max_body_bytes:
                raise ProtocolError(413, f"body larger than {self.config.max_body_bytes} bytes")
            producer = frame.producer
            result = self.store.append(
                path,
                AppendRequest(
                    body=body,
                    content_type=(frame.content_type or state.content_type) if body else None,
                    close=frame.close,
                    stream_seq=frame.stream_seq,
                    producer=Producer(producer.id, producer.epoch, producer.seq)
                    if producer
                    else None,
                ),
            )
        except ProtocolError as exc:
            self.send_frame(error_frame(self._about_stream(path, exc), req=frame.req))
            return
        except AuthError as exc:
            self.send_frame(auth_error_frame(exc, req=frame.req))
            return
        self.send_frame(
            Ack(
                req=frame.req,
                offset=result.next_offset,
                duplicate=result.duplicate,
                closed=result.closed,
                producer_epoch=result.producer.epoch if result.producer else None,
                producer_seq=result.producer.seq if result.producer else None,
            )
        )

    def _authorize_append(self, grant: Grant, path: str, frame: Append) -> None:
        """403 for an append the token may not make: 'append' for data, 'delete' for a
        close, and the events' authors, cancels and steers (``Grant.check_events``)."""
        has_data = frame.data is not None or frame.data_base64 is not None
        if has_data or not frame.close:
            grant.require("append", path)
        if frame.close:
            grant.require("delete", path)
        hook = self.authority.authorize_cancel if self.authority is not None else None
        if "admin" in grant.can and hook is None:
            return
        items: list[Any] | None = None
        if frame.data is not None:
            items = frame.data if isinstance(frame.data, list) else [frame.data]
        elif frame.data_base64 is not None:
            with contextlib.suppress(ValueError):
                items = event_items(base64.b64decode(frame.data_base64, validate=True))
        if items:
            grant.check_events(path, items, hook)

    @staticmethod
    def _body(state: StreamState, frame: Append) -> bytes:
        if frame.data_base64 is not None:
            if frame.data is not None:
                raise ProtocolError(400, "send data or data_base64, not both")
            try:
                return base64.b64decode(frame.data_base64, validate=True)
            except ValueError:
                raise ProtocolError(400, "data_base64 is not valid base64") from None
        if frame.data is None:
            return b""
        if P.is_json(state.content_type):
            try:
                text = json.dumps(
                    frame.data, separators=(",", ":"), ensure_ascii=False, allow_nan=False
                )
            except ValueError:  # 1e400 parses as inf: JSON has no such number
                raise ProtocolError(400, "data holds a number out of range") from None
            return text.encode()
        if isinstance(frame.data, str):
            return frame.data.encode()
        raise ProtocolError(400, "data must be a string for a non-JSON stream (or use data_base64)")

    # ------------------------------------------------------------------ subscriptions

    def _subscribe(self, frame: Subscribe) -> None:
        if frame.sub in self.subscriptions:
            self.send_frame(
                Error(status=409, code="conflict", message="sub id already in use", sub=frame.sub)
            )
            return
        if len(self.subscriptions) >= self.config.max_subscriptions:
            self.request_close(
                CLOSE_TOO_MANY_SUBSCRIPTIONS,
                f"more than {self.config.max_subscriptions} subscriptions",
            )
            return
        path: str | None = None
        try:
            path = stream_path(frame.stream)
            self._require("read", path)
            state = self.store.require(path)
            position = self.store.parse_read_offset(state, frame.offset)
        except ProtocolError as exc:
            self.send_frame(error_frame(self._about_stream(path, exc), sub=frame.sub))
            return
        except AuthError as exc:
            self.send_frame(auth_error_frame(exc, sub=frame.sub))
            return
        self.store.touch(state)
        self.send_frame(
            Subscribed(
                sub=frame.sub,
                stream=path,
                offset=state.offset(position),
                content_type=state.content_type,
                incarnation=state.incarnation_text,
            )
        )
        self.hub.listen(self, path)
        task = asyncio.create_task(self._pump(frame.sub, state, position))
        self.subscriptions[frame.sub] = task
        task.add_done_callback(lambda _: self._ended(frame.sub, task, path))

    def _ended(self, sub: str, task: asyncio.Task[None], path: str) -> None:
        if self.subscriptions.get(sub) is task:
            del self.subscriptions[sub]
        if not any(t for t in self.subscriptions.values()) and not any(
            p == path for p, _ in self.presence
        ):
            self.hub.unlisten(self, path)

    def _unsubscribe(self, sub: str) -> None:
        task = self.subscriptions.pop(sub, None)
        if task is not None:
            task.cancel()

    async def _pump(self, sub: str, state: StreamState, position: int) -> None:
        """Send subscription ``sub`` the stream's tail, reading only when the outbox has room."""
        if self.shutting_down.is_set():
            return
        frames = DataFrames(sub, state.content_type)
        tail = self.store.tail(
            state, position, idle=self.config.live_wait, max_bytes=self.config.frame_data_bytes
        )
        first = True
        try:
            if not await self._room():
                return
            async with contextlib.aclosing(tail) as results:
                async for result in results:
                    # Heartbeats (nothing new, not closed) say nothing a subscriber needs.
                    if first or result.records or result.closed:
                        self.outbox.put(frames.encode(result), data=True)
                    first = False
                    if result.closed or self.shutting_down.is_set() or not await self._room():
                        return
        except ProtocolError as exc:  # deleted under the subscription
            self.send_frame(error_frame(exc, sub=sub))

    async def _room(self) -> bool:
        """Wait for room in the outbox; closes a reader that leaves it full too long."""
        if await self.outbox.room(self.config.slow_consumer_timeout):
            return True
        self.request_close(CLOSE_SLOW_CONSUMER, SLOW_REASON)
        return False

    async def close_all(self) -> None:
        tasks = list(self.subscriptions.values())
        for task in tasks:
            task.cancel()
        # Wait for them: a server whose loop closes next must not leave them pending.
        await asyncio.gather(*tasks, return_exceptions=True)
        self.hub.drop(self)


def _redact_access_token(scope: Scope) -> str | None:
    """Take ``access_token`` out of the handshake's query string, leaving
    ``access_token=***`` (uvicorn logs the path and query of every handshake);
    returns the token ("" if there was more than one: refused)."""
    raw: bytes = scope.get("query_string", b"")
    if b"access_token" not in raw:
        return None
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    tokens = [value for name, value in pairs if name == ACCESS_TOKEN_PARAM]
    if not tokens:
        return None
    kept = [(n, v if n != ACCESS_TOKEN_PARAM else "***") for n, v in pairs]
    scope["query_string"] = urlencode(kept, safe="*").encode("latin-1")
    if len(tokens) > 1:
        return ""  # refused as malformed: one token, please
    return tokens[0]


async def _refuse_handshake(scope: Scope, send: Send, exc: AuthError) -> None:
    """Refuse an upgrade with the HTTP status of ``exc`` (a plain 403 from servers
    without the ASGI ``websocket.http.response`` extension)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": exc.code})
        return
    body = exc.body()
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers()]
    headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


def auth_error_frame(exc: AuthError, *, req: str | None = None, sub: str | None = None) -> Error:
    """A refused frame with ``--auth``: 401 ``unauthorized`` or 403 ``forbidden``."""
    return Error(status=exc.status, code=exc.code, message=exc.message, req=req, sub=sub)


def _request_id(text: str) -> str | None:
    """The ``req`` of a frame that did not validate, if it is one we can echo."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # checked for depth first; RecursionError all the same
        return None
    req = value.get("req") if isinstance(value, dict) else None
    return _echoable(req)


def _echoable(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_ECHOED_REQ:
        return None
    try:
        value.encode("utf-8")  # json.loads takes "\ud800"; no frame can carry it back
    except UnicodeEncodeError:
        return None
    return value


# A frame's leading fields with plain values (``{"op":"append","req":"r7",...``, as
# the SDK writes them): enough to name a refused frame without parsing all of it.
_LEADING_FIELD = re.compile(
    r'\s*"([a-z_]{1,16})"\s*:\s*("(?:[^"\\]|\\.){0,256}"|[-+.\w]{1,64})\s*([,}])'
)
_LEADING_FIELDS = 8


def _leading_ids(text: str) -> tuple[str | None, str | None]:
    """``req`` and (for a ``subscribe``) ``sub`` from the frame's leading plain fields."""
    start = re.match(r"\s*\{", text)
    if start is None:
        return None, None
    fields: dict[str, object] = {}
    position = start.end()
    for _ in range(_LEADING_FIELDS):
        match = _LEADING_FIELD.match(text, position)
        if match is None:
            break
        with contextlib.suppress(ValueError):
            fields.setdefault(match[1], json.loads(match[2]))
        if match[3] == "}":
            break
        position = match.end()
    sub = _echoable(fields.get("sub")) if fields.get("op") == "subscribe" else None
    return _echoable(fields.get("req")), sub


class FrameRate:
    """One socket's budget of incoming frames: a token bucket of ``burst`` tokens
    refilled at ``rate`` a second. Refusals are counted too, in a bucket that
    drains ``close_after`` a second: more than ``close_after`` within about a
    second means the client does not back off, and the socket is closed.
    Sans-I/O: the clock is a parameter."""

    def __init__(
        self,
        rate: float = FRAME_RATE,
        burst: int = FRAME_BURST,
        close_after: int = RATE_LIMIT_CLOSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.close_after, self._clock = rate, burst, close_after, clock
        self._tokens = float(burst)
        self._refusals = 0.0
        self._at = clock()

    def take(self) -> float | None:
        """Take a frame's token: ``None`` if there was one, else the seconds until one."""
        now = self._clock()
        elapsed, self._at = max(0.0, now - self._at), now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._refusals = max(0.0, self._refusals - elapsed * self.close_after)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        self._refusals += 1.0
        return (1.0 - self._tokens) / self.rate

    @property
    def persistent(self) -> bool:
        """The client kept sending over the rate: close it (4029)."""
        return self._refusals > self.close_after


class WebSocketEndpoint:
    """The ASGI handler for ``/v1/ws``."""

    def __init__(
        self, store: StreamStore, config: WebSocketConfig, shutting_down: asyncio.Event
    ) -> None:
        self.store = store
        self.config = config
        self.hub = PresenceHub(config.presence_grace)
        self.shutting_down = shutting_down
        self.connections: set[Connection] = set()
        self.authority: Authority | None = None  # with --auth (mock_server/_auth.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        token_in_url = _redact_access_token(scope)
        if self.authority is None:
            await self._serve(scope, receive, send, None)
            return
        try:
            grant = self._handshake(self.authority, scope, token_in_url)
            client = scope.get("client")
            lease = self.authority.connection(str(client[0]) if client else "", grant)
            lease.__enter__()  # 429 over a cap, before the upgrade
        except AuthError as exc:
            await _refuse_handshake(scope, send, exc)
            return
        try:
            await self._serve(scope, receive, send, grant)
        finally:
            lease.__exit__(None, None, None)

    @staticmethod
    def _handshake(authority: Authority, scope: Scope, token_in_url: str | None) -> Grant:
        """The grant of a handshake's token (``Authorization`` or ``access_token``);
        ``AuthError`` for a foreign Origin or a token that does not verify."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        authority.check_origin(headers.get("origin"))
        token = bearer(headers.get("authorization"))
        if token_in_url is not None:
            if token is not None or not token_in_url:
                raise unauthorized("send one token, in the header or in access_token")
            token = token_in_url
        return authority.verify(token)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, grant: Grant | None) -> None:
        await send({"type": "websocket.accept"})
        conn = Connection(
            self.store,
            self.hub,
            self.config,
            send,
            self.shutting_down,
            authority=self.authority,
            grant=grant,
        )
        conn.watch_expiry()
        self.connections.add(conn)
        writer = asyncio.create_task(conn.outbox.run())
        reader = asyncio.create_task(self._read(conn, receive))
        slow = asyncio.create_task(conn.outbox.slow.wait())
        closing = asyncio.create_task(conn.closing.wait())
        stopping = asyncio.create_task(self.shutting_down.wait())
        tasks = [writer, reader, slow, closing, stopping]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                code, reason = reader.result(), "too many malformed frames"
            elif stopping in done:
                code, reason = 1001, "server shutting down"
            elif slow in done or (writer in done and conn.outbox.slow.is_set()):
                code, reason = CLOSE_SLOW_CONSUMER, SLOW_REASON
            elif closing in done:
                code, reason = conn.close_code, conn.close_reason
            else:  # the writer ended: the socket is gone
                code, reason = None, ""
        finally:
            conn.stop_expiry()
            for task in tasks:
                task.cancel()
            await conn.close_all()
            conn.outbox.clear()
            self.connections.discard(conn)
        if code is not None:
            # Under uvicorn our protocol (mock_server/_ws_protocol.py) writes the close at
            # once, behind what the transport holds, and resets the socket if that has not
            # drained a second later; the timeout is for other servers, whose send may wait
            # for a full socket forever.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await send({"type": "websocket.close", "code": code, "reason": reason})

    async def _read(self, conn: Connection, receive: Receive) -> int | None:
        """Handle frames until the client goes; returns a close code to send, if any.

        Fair to the other sockets: a frame over this socket's rate is answered
        429 and not handled, and after ``READ_BUDGET`` frames the reader yields
        to the loop (frames already queued would otherwise be handled back to
        back, and a flood would hold the loop for as long as it lasts).
        """
        bad = 0
        rate = FrameRate(conn.config.frame_rate, conn.config.frame_burst)
        handled = 0
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return None
            handled += 1
            if handled >= READ_BUDGET:
                handled = 0
                await asyncio.sleep(0)
            text = message.get("text")
            wait = rate.take()
            if wait is not None:
                conn.refuse_over_rate(text, wait)
                if rate.persistent:
                    conn.request_close(
                        CLOSE_RATE_LIMITED, "rate limit: the client did not back off"
                    )
                    # The handler sends the close (``conn.closing``); read nothing more meanwhile.
                    await asyncio.get_running_loop().create_future()
                continue
            if text is None:
                conn.send_frame(
                    Error(status=400, code="bad_frame", message="frames must be JSON text")
                )
                ok = False
            else:
                ok = conn.handle(text)
            bad = 0 if ok else bad + 1
            if bad >= MAX_BAD_FRAMES:
                return CLOSE_PROTOCOL_ERROR
