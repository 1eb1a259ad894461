"""The WebSocket session transport at ``{base}/v1/ws`` (our extension; docs/websocket.md).

One socket per client: it subscribes to streams from offsets (several at a
time), appends with producer ids and gets acks, and carries ephemeral
presence. It shares the ``StreamStore`` with the HTTP front end, so streams,
offsets and refusals are the same on both.

Each connection has one writer draining a bounded outbox. Subscription pumps
read from the store only when the outbox has room, so a slow reader lags
behind in the durable log instead of in server memory; a reader whose outbox
stays full for ``slow_consumer_timeout`` (or overflows with acks and presence)
is closed with 4008 and resumes from its offset. A slow client never slows
the others: nothing is shared between connections but the store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from durable_client import wire as P
from durable_client.wire import (
    CLIENT_FRAME,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_MANY_SUBSCRIPTIONS,
    ERROR_CODES,
    Ack,
    Append,
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
from ._model import StreamState
from ._store import (
    AppendRequest,
    Producer,
    ProtocolError,
    ReadResult,
    StreamStore,
    check_not_reserved,
)

log = logging.getLogger("mock_server.ws")

MAX_BAD_FRAMES = 10
MAX_ECHOED_REQ = 128  # a malformed frame's req id is echoed back up to this length (as Id)
SLOW_REASON = "slow consumer: resume from your last offset"


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """Tunables of the WebSocket transport (keepalive lives in the uvicorn config)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_subscriptions: int = 64
    max_queued_frames: int = 256
    slow_consumer_timeout: float = 10.0
    presence_grace: float = 3.0
    live_wait: float = 30.0
    frame_data_bytes: int = 256 * 1024  # batch size of data frames (one larger record still fits)


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
    """A connection's bounded queue of outgoing text frames and the writer that drains it."""

    def __init__(self, send: Send, limit: int) -> None:
        self._send = send
        self._limit = limit
        self._frames: deque[str] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.overflowed = asyncio.Event()

    def put(self, frame: str) -> None:
        if len(self._frames) >= self._limit:
            self.overflowed.set()
            return
        self._frames.append(frame)
        self._ready.set()
        if len(self._frames) >= self._limit // 2:
            self._room.clear()

    async def room(self, timeout: float) -> bool:
        """Wait until the queue is under half full; False if it stays full for ``timeout``."""
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
                frame = self._frames.popleft()
                if len(self._frames) < self._limit // 2:
                    self._room.set()
                await self._send({"type": "websocket.send", "text": frame})
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
    ) -> None:
        self.store = store
        self.hub = hub
        self.config = config
        self.outbox = Outbox(send, config.max_queued_frames)
        self.shutting_down = shutting_down
        self.subscriptions: dict[str, asyncio.Task[None]] = {}
        self.presence: set[tuple[str, str]] = set()
        self.closing = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""

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
        """Handle one client frame; False if it was malformed."""
        try:
            frame = CLIENT_FRAME.validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "frame"
            req = _request_id(text)
            self.send_frame(
                Error(status=400, code="bad_frame", message=f"{where}: {first['msg']}", req=req)
            )
            return False
        if isinstance(frame, Subscribe):
            self._subscribe(frame)
        elif isinstance(frame, Unsubscribe):
            self._unsubscribe(frame.sub)
        elif isinstance(frame, Append):
            self._append(frame)
        elif isinstance(frame, SetPresence):
            self._presence(frame)
        elif isinstance(frame, LeavePresence):
            with contextlib.suppress(ProtocolError):
                self.hub.leave(self, stream_path(frame.stream), frame.client_id)
        elif isinstance(frame, Ping):
            self.send_frame(Pong(req=frame.req))
        return True

    def _presence(self, frame: SetPresence) -> None:
        try:
            path = stream_path(frame.stream)
            self.store.require(path)
        except ProtocolError as exc:
            self.send_frame(error_frame(exc))
            return
        member = Member(
            client_id=frame.client_id, kind=frame.kind, label=frame.label, status=frame.status
        )
        self.hub.set(self, path, member)

    def _append(self, frame: Append) -> None:
        path: str | None = None
        try:
            path = stream_path(frame.stream)
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
            return json.dumps(frame.data, separators=(",", ":"), ensure_ascii=False).encode()
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
            state = self.store.require(path)
            position = self.store.parse_read_offset(state, frame.offset)
        except ProtocolError as exc:
            self.send_frame(error_frame(self._about_stream(path, exc), sub=frame.sub))
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
                        self.outbox.put(frames.encode(result))
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


def _request_id(text: str) -> str | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[...", nested too deep
        return None
    req = value.get("req") if isinstance(value, dict) else None
    if not isinstance(req, str) or len(req) > MAX_ECHOED_REQ:
        return None
    try:
        req.encode("utf-8")  # json.loads takes "\ud800"; no frame can carry it back
    except UnicodeEncodeError:
        return None
    return req


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        conn = Connection(self.store, self.hub, self.config, send, self.shutting_down)
        self.connections.add(conn)
        writer = asyncio.create_task(conn.outbox.run())
        reader = asyncio.create_task(self._read(conn, receive))
        overflow = asyncio.create_task(conn.outbox.overflowed.wait())
        closing = asyncio.create_task(conn.closing.wait())
        stopping = asyncio.create_task(self.shutting_down.wait())
        tasks = [writer, reader, overflow, closing, stopping]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                code, reason = reader.result(), "too many malformed frames"
            elif stopping in done:
                code, reason = 1001, "server shutting down"
            elif overflow in done:
                code, reason = CLOSE_SLOW_CONSUMER, SLOW_REASON
            elif closing in done:
                code, reason = conn.close_code, conn.close_reason
            else:  # the writer failed: the socket is gone
                code, reason = None, ""
        finally:
            for task in tasks:
                task.cancel()
            await conn.close_all()
            self.connections.discard(conn)
        if code is not None:
            # The socket may be full (a slow reader); don't wait for it forever.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await send({"type": "websocket.close", "code": code, "reason": reason})

    async def _read(self, conn: Connection, receive: Receive) -> int | None:
        """Handle frames until the client goes; returns a close code to send, if any."""
        bad = 0
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
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
